"""The ``lm-eval`` evaluator: lm-evaluation-harness tasks from local YAMLs on the tiny model,
with the network cut; its model API against hand computations from the model's logits."""
import json
import math
import os
import socket
import sys

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.cli.main import cli
from qpeft.core.base.errors import QpeftError
from qpeft.core.kinds.evaluator import EvalContext
from qpeft.core.model.generation import generate
from qpeft.plugins.evaluators import lm_eval_harness
from qpeft.plugins.evaluators.lm_eval_harness import LmEval

MC_YAML = """\
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
"""
QUESTIONS = [{"question": "What is 1 plus 1?", "choices": ["2", "3", "11"], "answer": 0},
             {"question": "Which is a colour?", "choices": ["table", "green", "seven"], "answer": 1},
             {"question": "Which is a fruit?", "choices": ["apple", "brick", "river"], "answer": 0}]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model gains nothing from threads, and on a shared CPU they cost several times
    the work (OpenMP threads spin, waiting for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def task_dir(tmp_path, task="my_mc", dataset="json", data="questions.jsonl"):
    """A folder with one multiple-choice task YAML and its data beside it (a relative path)."""
    folder = tmp_path / "tasks"
    folder.mkdir(exist_ok=True)
    (folder / f"{task}.yaml").write_text(MC_YAML.format(task=task, data=data).replace("json", dataset, 1))
    (folder / data).write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return folder


def hand_logprob(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) and greedy?, from one forward pass over the whole text,
    split as lm-eval splits it (the whole text tokenized, the context's tokens first)."""
    whole = tokenizer.encode(context + continuation)
    start = len(tokenizer.encode(context))
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
    rows = range(start, len(whole))
    return (sum(logp[i - 1, whole[i]].item() for i in rows),
            all(logp[i - 1].argmax().item() == whole[i] for i in rows))


def requests(kind, *arguments):
    from lm_eval.api.instance import Instance

    return [Instance(request_type=kind, doc={}, arguments=a, idx=0) for a in arguments]


def harness_lm(model, tokenizer, **kw):
    return lm_eval_harness.import_harness().QpeftLM(model, tokenizer, **kw)


# -- the model API -----------------------------------------------------------------------
def test_loglikelihood_equals_a_direct_computation_from_the_logits(tiny, tokenizer):
    context = "Question: Which planet is closest to the Sun?\nAnswer:"
    pairs = [(context, " Mercury"), (context, " Venus"), (context, " the planet Mercury, of course"),
             ("Short one.", " Yes"), ("Trailing space ", "moves")]
    got = harness_lm(tiny, tokenizer, batch_size=2).loglikelihood(requests("loglikelihood", *pairs))
    want = [hand_logprob(tiny, tokenizer, c.rstrip(" "), c[len(c.rstrip(" ")):] + x) for c, x in pairs]
    assert [g[0] for g in got] == pytest.approx([w[0] for w in want], abs=1e-4)
    assert [g[1] for g in got] == [w[1] for w in want]
    assert all(isinstance(g[1], bool) for g in got)


def test_loglikelihood_keeps_the_last_max_length_tokens(tiny, tokenizer):
    context, continuation = "one two three four five six seven eight nine ten", " eleven twelve"
    whole = tokenizer.encode(context + continuation)
    n = len(whole) - len(tokenizer.encode(context))
    inp = whole[-9:-1]                                      # max_length = 8
    with torch.no_grad():
        logp = torch.log_softmax(tiny(torch.tensor([inp])).logits[0].float(), -1)
    want = sum(logp[len(inp) - n + i, whole[len(whole) - n + i]].item() for i in range(n))
    got = harness_lm(tiny, tokenizer, max_length=8).loglikelihood(requests("loglikelihood", (context, continuation)))
    assert got[0][0] == pytest.approx(want, abs=1e-4)


def test_rolling_loglikelihood_scores_every_token_once_in_windows(tiny, tokenizer):
    text = "The river rose after three days of rain, and the bridge was closed by the morning."
    tokens = tokenizer.encode(text)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def scored(inp, targets):   # Σ log p of targets at the last len(targets) positions of inp
        with torch.no_grad():
            logp = torch.log_softmax(tiny(torch.tensor([inp])).logits[0].float(), -1)
        return sum(logp[len(inp) - len(targets) + i, t].item() for i, t in enumerate(targets))

    whole = harness_lm(tiny, tokenizer, max_length=256).loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert whole[0] == pytest.approx(scored([prefix] + tokens[:-1], tokens), abs=1e-4)
    m = len(tokens) // 2 + 1                                # two windows: m tokens, then the rest
    want = scored([prefix] + tokens[:m - 1], tokens[:m]) + scored(tokens[-m - 1:-1], tokens[m:])
    got = harness_lm(tiny, tokenizer, max_length=m).loglikelihood_rolling(requests("loglikelihood_rolling", (text,)))
    assert got[0] == pytest.approx(want, abs=1e-4)


def test_generation_is_qpeft_greedy_generation_cut_at_the_stop_string(tiny, tokenizer):
    contexts = ["Question: What is the capital of France?\nAnswer:", "Say: hello", "Count: 1, 2,"]
    contexts.sort(key=lambda c: -len(tokenizer.encode(c)))   # the order QpeftLM batches them in
    kwargs = {"until": ["\n", "."], "max_gen_toks": 12}
    got = harness_lm(tiny, tokenizer, batch_size=4).generate_until(
        requests("generate_until", *[(c, kwargs) for c in contexts]))
    full = generate(tiny, tokenizer, [tokenizer.encode(c) for c in contexts], max_new_tokens=12, batch_size=4)
    assert got == [f.split("\n")[0].split(".")[0] for f in full]


# -- the evaluator -----------------------------------------------------------------------
def test_bundled_tasks_run_end_to_end_offline(tiny, tokenizer, tmp_path, monkeypatch, no_network):
    """The bundled YAMLs over their JSONL files, from another working directory, network
    cut: numbers in range, the accuracy that the logits give by hand, the switches restored."""
    monkeypatch.chdir(tmp_path)                         # data paths are relative to the YAMLs
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    evaluator = LmEval(tasks=["qpeft_mc", "qpeft_gen", "qpeft_text"], limit=0, batch_size=4)
    rng = torch.get_rng_state()
    out = evaluator.evaluate(EvalContext(model=tiny, tokenizer=tokenizer, stage="after"))
    assert torch.equal(rng, torch.get_rng_state())       # lm-eval's seeding undone
    assert (out["tasks"], out["documents"]) == (3, 22)
    assert (out["qpeft_mc/n"], out["qpeft_gen/n"], out["qpeft_text/n"]) == (10, 8, 4)
    for key in ("qpeft_mc/acc", "qpeft_mc/acc_norm", "qpeft_gen/exact_match", "qpeft_mc/acc_stderr"):
        assert 0.0 <= out[key] <= 1.0, key
    assert out["qpeft_text/bits_per_byte"] == pytest.approx(math.log2(out["qpeft_text/byte_perplexity"]), abs=1e-3)
    assert out["qpeft_text/word_perplexity"] > 1
    questions = [json.loads(l) for l in (lm_eval_harness.bundled_tasks() / "qpeft_mc.jsonl").read_text().splitlines()]
    right = 0
    for q in questions:
        scores = [hand_logprob(tiny, tokenizer, f"Question: {q['question']}\nAnswer:", f" {c}")[0] for c in q["choices"]]
        right += scores.index(max(scores)) == q["answer"]
    assert out["qpeft_mc/acc"] == pytest.approx(right / len(questions))
    assert evaluator.higher_is_better["qpeft_mc/acc"] and not evaluator.higher_is_better["qpeft_text/bits_per_byte"]
    assert "HF_HUB_OFFLINE" not in os.environ
    import datasets
    assert datasets.config.HF_HUB_OFFLINE is False


def test_a_task_that_needs_the_hub_or_a_missing_file_is_one_line(tiny, tokenizer, tmp_path, no_network):
    ctx = EvalContext(model=tiny, tokenizer=tokenizer, stage="after")
    folder = task_dir(tmp_path, task="hub_mc", dataset="someone/some_dataset")
    with pytest.raises(QpeftError) as err:
        LmEval(tasks=["hub_mc"], include_path=str(folder)).evaluate(ctx)
    assert str(err.value) == ("task hub_mc needs data from the hub (someone/some_dataset); give a local dataset "
                              "path via a task YAML in include_path (dataset_path: json, dataset_kwargs: "
                              "{data_files: FILE})")
    (folder / "gone.yaml").write_text(MC_YAML.format(task="gone", data="gone.jsonl"))
    with pytest.raises(QpeftError, match=r"^lm-eval failed \(FileNotFoundError\): .*gone.jsonl") as err:
        LmEval(tasks=["gone"], include_path=str(folder)).evaluate(ctx)
    assert "\n" not in str(err.value)


def test_options_are_checked_before_anything_loads(tmp_path, monkeypatch):
    with pytest.raises(QpeftError, match="include_path '.*nowhere' is not a folder"):
        LmEval.from_values({"include_path": str(tmp_path / "nowhere")})
    with pytest.raises(QpeftError, match="batch_size and max_gen_toks must be ≥ 1"):
        LmEval.from_values({"batch_size": "0"})
    assert LmEval.from_values({"tasks": "a,b"}).options.tasks == ["a", "b"]
    monkeypatch.setitem(sys.modules, "lm_eval", None)       # as if it were not installed
    result = CliRunner().invoke(cli, ["run", "--evaluators", "perplexity;lm-eval:tasks=qpeft_mc"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "Error: evaluator 'lm-eval': lm_eval is not installed: pip install 'qpeft[lm-eval]'"]


def test_a_run_reports_lm_eval_metrics_before_and_after(tiny_dir, tmp_path, no_network):
    folder = task_dir(tmp_path)
    result = CliRunner().invoke(cli, [
        "run", "--model", tiny_dir, "--quant", "none:compute_dtype=float32", "--adapter", "lora:r=4",
        "--evaluators", f"perplexity;lm-eval:tasks=my_mc:include_path={folder}", "--eval-limit", "4",
        "--steps", "2", "--batch-size", "4", "--output-dir", str(tmp_path / "runs"), "--name", "r"])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "runs" / "r" / "report.json").read_text())
    for stage in ("before", "after"):
        metrics = report[stage]["lm-eval"]
        assert metrics["my_mc/n"] == 3 and 0.0 <= metrics["my_mc/acc"] <= 1.0, metrics
        assert "perplexity" in report[stage]["perplexity"]
    assert "| lm-eval | my_mc/acc |" in (tmp_path / "runs" / "r" / "report.md").read_text()
