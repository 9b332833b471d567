"""``qpeft generate``, ``qpeft chat`` and ``--no-adapter`` (issue 24) on a tiny finished run."""
import json
import os
import pty
import re
import select
import subprocess
import sys
import time

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.dataset import templates
from qpeft.core.cli.main import cli
from qpeft.core.dataset.examples import Example
from qpeft.core.model.generation import generate
from qpeft.core.run.rebuild import rebuild

PROMPTS = ["Which number is larger, 9.11 or 9.9?", "Continue: 0, 1, 1, 2, 3, 5, 8,"]


def finished_run(tiny_dir, out, quant, adapter, name, steps=3):
    cfg = config.build(None, {"model": tiny_dir, "quant": quant, "adapter": adapter, "name": name,
                              "evaluators": "perplexity", "eval_limit": 6, "steps": steps, "batch_size": 4,
                              "lr": 1e-2, "save_every": 0, "output_dir": str(out), "progress": False})
    return pipeline.run(cfg, say=lambda _: None), out / name


@pytest.fixture(scope="module")
def lora_run(tiny_dir, tmp_path_factory):
    return finished_run(tiny_dir, tmp_path_factory.mktemp("runs"), "nf4:compute_dtype=float32", "lora:r=4", "lo")


@pytest.fixture(scope="module")
def adapted(lora_run):
    return rebuild(lora_run[1])


def greedy(built, prompts, max_new_tokens):
    """core/model/generation.py over the prompts evaluator's examples (its template, its batches)."""
    examples = [Example(messages=[{"role": "user", "content": p}], instruction=p) for p in prompts]
    ids = [templates.prompt_ids(e, built.tokenizer) for e in examples]
    assert built.tokenizer.decode(ids[0]).startswith("<|im_start|>")    # the model's chat template
    return generate(built.model, built.tokenizer, ids, max_new_tokens, 8, "cpu")


def answers(result) -> list[str]:
    assert result.exit_code == 0, result.output
    return [json.loads(line)["answer"] for line in result.stdout.splitlines()]


def test_generate_prints_what_the_evaluators_generate(lora_run, adapted, tmp_path):
    _, run_dir = lora_run
    listed = tmp_path / "prompts.txt"      # one prompt a line, blank lines skipped
    listed.write_text("\n" + "\n".join(PROMPTS[1:]) + "\n\n")
    got = answers(CliRunner().invoke(cli, ["generate", str(run_dir), "--json", "--max-new-tokens", "12",
                                           "--prompt", PROMPTS[0], "--file", str(listed)]))

    assert got == greedy(adapted, PROMPTS, 12)

    # and qpeft eval's prompts evaluator on the same prompts answers the same text
    cases = tmp_path / "cases.jsonl"
    cases.write_text("".join(json.dumps({"name": f"p{i}", "prompt": p, "expected": "x", "match": "contains"}) + "\n"
                             for i, p in enumerate(PROMPTS)))
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--evaluators",
                                      f"prompts:path={cases}:max_new_tokens=12:output_chars=1000", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from qpeft.plugins.evaluators.prompts import one_line

    evaluated = json.loads(out.read_text())["results"]["prompts"]
    assert [evaluated[f"output/p{i}"] for i in range(len(PROMPTS))] == [one_line(a, 1000) for a in got]
    # and the table is followed by those answers, one line each (issue 24: not only in the JSON)
    shown = result.stdout.split("\nanswers\n", 1)[1].splitlines()
    assert shown[:len(PROMPTS)] == [f"  prompts  output/p{i}: {' '.join(one_line(a, 1000).split())[:110]}"
                                    + ("…" if len(" ".join(one_line(a, 1000).split())) > 110 else "")
                                    for i, a in enumerate(got)]


def test_no_adapter_is_the_quantized_base(lora_run, adapted):
    report, run_dir = lora_run
    base = rebuild(run_dir, no_adapter=True)
    assert base.composition is None
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (adapted.model(ids).logits - base.model(ids).logits).abs().max().item()
    assert diff > 1e-3, "training moved nothing: the test cannot tell the base from the adapted model"

    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--no-adapter"])
    assert result.exit_code == 0, result.output
    [saved] = run_dir.glob("eval-base-*.json")
    record = json.loads(saved.read_text())
    assert record["adapter"] is False
    assert record["results"]["perplexity"]["perplexity"] == pytest.approx(
        report["before"]["perplexity"]["perplexity"], rel=1e-5)     # the run's "before", again
    assert "in report" in result.stdout and saved.name in result.stdout
    # --out inside the run directory: allowed as the evaluation's own names only
    ok = CliRunner().invoke(cli, ["eval", str(run_dir), "--no-adapter", "--out", str(run_dir / "eval-base.json")])
    assert ok.exit_code == 0, ok.output
    refused = CliRunner().invoke(cli, ["eval", str(run_dir), "--no-adapter", "--out", str(run_dir / "base.json")])
    assert refused.exit_code == 2 and "eval-NAME.json" in refused.output

    plain = CliRunner().invoke(cli, ["generate", str(run_dir), "--no-adapter", "--max-new-tokens", "8",
                                     "--prompt", PROMPTS[0]])
    assert plain.exit_code == 0, plain.output
    assert plain.stdout == greedy(base, PROMPTS[:1], 8)[0] + "\n"     # one prompt: its answer alone


def test_no_adapter_loads_dora_as_the_run_did(tiny_dir, tmp_path):
    """DoRA keeps float32 activations in a bf16 run; --no-adapter loads the base the same
    way, so it scores what the run's "before" scored."""
    report, run_dir = finished_run(tiny_dir, tmp_path, "nf4:compute_dtype=bfloat16", "dora:r=4", "do", steps=1)
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--no-adapter", "--evaluators", "perplexity"])
    assert result.exit_code == 0, result.output
    [saved] = run_dir.glob("eval-base-*.json")
    assert json.loads(saved.read_text())["results"]["perplexity"]["perplexity"] == pytest.approx(
        report["before"]["perplexity"]["perplexity"], rel=1e-5)


def read_until(fd, marker: bytes, seen: bytearray, timeout: float = 60) -> bytes:
    """Read the pseudo-terminal until ``marker`` appears after what was ``seen`` so far."""
    start, deadline = len(seen), time.monotonic() + timeout
    while marker not in seen[start:]:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"no {marker!r} within {timeout} s; got {bytes(seen)!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:     # the child closed the terminal
            raise AssertionError(f"the terminal closed before {marker!r}; got {bytes(seen)!r}") from None
        seen += chunk
    return bytes(seen[start:])


def test_chat_through_a_terminal(lora_run, adapted):
    _, run_dir = lora_run
    [expected] = greedy(adapted, ["hello"], 8)      # a first turn is a one-prompt generation
    leader, follower = pty.openpty()
    env = {**os.environ, "TERM": "dumb"}     # no readline escape sequences around the prompt
    child = subprocess.Popen([sys.executable, "-m", "qpeft", "chat", str(run_dir), "--max-new-tokens", "8"],
                             stdin=follower, stdout=follower, stderr=follower, env=env, close_fds=True)
    os.close(follower)
    seen = bytearray()
    try:
        read_until(leader, b"you> ", seen)
        os.write(leader, b"hello\r")
        reply = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", read_until(leader, b"you> ", seen).decode("utf-8", "replace"))
        # the terminal echoes the line, then the streamed answer (\n shown as \r\n)
        streamed = reply.replace("\r\n", "\n").split("hello\n", 1)[1].rsplit("you> ", 1)[0]
        assert streamed.strip() == expected.strip()
        os.write(leader, b"/reset\r")
        assert "(new conversation)" in read_until(leader, b"you> ", seen).decode()
        os.write(leader, b"/quit\r")
        assert child.wait(timeout=30) == 0
    finally:
        if child.poll() is None:
            child.kill()
        os.close(leader)


@pytest.mark.parametrize("command", ["chat", "generate"])
def test_a_bad_run_is_one_line(command, tmp_path):
    extra = ["--prompt", "hi"] if command == "generate" else []
    for target in (tmp_path, tmp_path / "missing"):
        result = CliRunner().invoke(cli, [command, str(target)] + extra)
        assert result.exit_code == 2, result.output
        assert len(result.output.strip().splitlines()) == 1 and result.output.startswith("Error:"), result.output


def test_generate_refusals_are_one_line(lora_run):
    _, run_dir = lora_run
    for args, says in ((["generate", str(run_dir)], "nothing to answer"),
                       (["generate", str(run_dir), "--no-adapter", "--rank", "2", "--prompt", "x"], "--no-adapter"),
                       (["generate", str(run_dir), "--quant", "none", "--prompt", "x"],
                        "only for an adapter directory"),
                       (["eval", str(run_dir), "--no-adapter", "--rank", "2"], "--no-adapter")):
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 2, result.output
        assert says in result.output and len(result.output.strip().splitlines()) == 1, result.output


def test_generation_gives_the_head_contiguous_rows_and_the_same_answers(tiny_dir, tokenizer):
    """Generation's first step hands the head ``hidden[:, -1:, :]``, a strided view, which makes
    CPU matmul copy the head's weight per row (core/model/generation.py). Every loaded model
    gets a pre-hook that makes it contiguous: the head only ever sees contiguous input, and the
    greedy answers equal those of the same model without the hook."""
    import torch

    from qpeft.core.model.generation import contiguous_head_input, generate
    from qpeft.core.model.streaming import load_quantized
    from qpeft.core.plugin import registry

    model = load_quantized(tiny_dir, registry.get("quantizer", "none")())[0]
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12]]
    hooked = generate(model, tokenizer, prompts, max_new_tokens=4, batch_size=2)
    assert seen and all(seen)
    plain = load_quantized(tiny_dir, registry.get("quantizer", "none")())[0]
    plain.get_output_embeddings()._forward_pre_hooks.clear()
    seen.clear()
    plain.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].is_contiguous()))
    assert generate(plain, tokenizer, prompts, max_new_tokens=4, batch_size=2) == hooked
    assert not all(seen)                  # without the hook the first step's rows are strided
    contiguous_head_input(model)          # idempotent: still one pre-hook
    assert len(model.get_output_embeddings()._forward_pre_hooks) == 1
    assert torch.equal(model.get_output_embeddings().weight, plain.get_output_embeddings().weight)
