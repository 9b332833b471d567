"""``qpeft export --format gguf``: one merged .gguf file that transformers (and llama.cpp) load.

Tolerances (docs/deploy.md): f16 logits within 1e-3 relative (‖Δ‖/‖logits‖) of the merged
model. A quantized type is checked against its own round trip — the merged weights quantized
and dequantized with gguf.quants, tensor by tensor as the writer types them — which the
loaded file must reproduce to float32 rounding (1e-4); its distance from the unquantized merged
model is that round trip's error, measured on this tiny random model (LoRA over NF4, 3 steps)
at 0.0072 (q8_0) and 0.085 (q4_0), bounded here at 0.03 and 0.25.
"""
import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.interop import gguf_export
from qpeft.core.run import pipeline
from qpeft.core.cli.main import cli
from qpeft.core.run.rebuild import rebuild

SAMPLE = "Which is larger, 9.11 or 9.9? <|im_start|>user\nHello, world!  It's 2024.<|im_end|>\n"
BOUND = {"q8_0": 0.03, "q4_0": 0.25}       # vs the unquantized merged model (tiny random model)


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def finished_run(model_dir, out, name, steps=3, eval_limit=6, batch_size=4):
    cfg = config.build(None, {"model": model_dir, "quant": "nf4:compute_dtype=float32", "adapter": "lora:r=4",
                              "name": name, "evaluators": "perplexity", "eval_limit": eval_limit, "steps": steps,
                              "batch_size": batch_size, "lr": 1e-2, "save_every": 0, "output_dir": str(out),
                              "progress": False})
    return pipeline.run(cfg, say=lambda _: None), out / name


def export(run_dir, out, *flags):
    return CliRunner().invoke(cli, ["export", str(run_dir), "--format", "gguf", "--out", str(out), *flags])


def merged_model(run_dir):
    built = rebuild(run_dir)
    return built.composition.method.merge(built.model, torch.float32), built.tokenizer


def round_trip(model, type_name):
    """``model`` with each tensor quantized and dequantized as the writer types it."""
    from gguf.quants import dequantize, quantize

    state = model.state_dict()
    with torch.no_grad():
        for key, _, kind in gguf_export.tensor_plan(model, type_name):
            w = state[key].float().numpy()
            state[key].copy_(torch.from_numpy(dequantize(quantize(w, kind), kind).reshape(w.shape)))
    return model


def load_gguf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()


@pytest.fixture(scope="module")
def run_dir(tiny_dir, tmp_path_factory):
    return finished_run(tiny_dir, tmp_path_factory.mktemp("runs"), "lq")[1]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 2000, (2, 12), generator=torch.Generator().manual_seed(0))


def test_f16_file_loads_in_transformers_with_the_merged_logits_metadata_and_tokenizer(run_dir, ids, tmp_path):
    out = tmp_path / "model.gguf"
    result = export(run_dir, out)
    assert result.exit_code == 0, result.output
    assert "GGUF (f16) written to" in result.output and not list(tmp_path.glob(".*"))
    merged, tokenizer = merged_model(run_dir)
    with torch.no_grad():
        assert rel(load_gguf(out)(ids).logits, merged(ids).logits) < 1e-3

    import gguf

    reader = gguf.GGUFReader(out)
    fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
    config_ = merged.config
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert (fields["llama.block_count"], fields["llama.embedding_length"], fields["llama.feed_forward_length"],
            fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"],
            fields["llama.rope.dimension_count"], fields["llama.context_length"], fields["llama.vocab_size"]) == (
        2, 64, 128, 4, 2, 16, 512, config_.vocab_size)
    assert fields["tokenizer.chat_template"] == tokenizer.chat_template
    assert reader.fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert reader.fields["tokenizer.ggml.add_bos_token"].contents() is False
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types                          # tied embeddings
    assert types["blk.0.attn_norm.weight"] == "F32" and types["output_norm.weight"] == "F32"
    assert types["blk.1.attn_q.weight"] == types["token_embd.weight"] == "F16"

    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert again(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]
    assert again.decode(again(SAMPLE)["input_ids"]) == SAMPLE


@pytest.mark.parametrize("type_name", ["q8_0", "q4_0"])
def test_quantized_file_reproduces_its_own_round_trip(run_dir, ids, tmp_path, type_name):
    out = tmp_path / f"model-{type_name}.gguf"
    result = export(run_dir, out, "--gguf-type", type_name)
    assert result.exit_code == 0, result.output
    merged, _ = merged_model(run_dir)
    with torch.no_grad():
        exact = merged(ids).logits
        expected = round_trip(merged, type_name)(ids).logits
        loaded = load_gguf(out)(ids).logits
    assert rel(loaded, expected) < 1e-4
    print(f"{type_name}: vs merged {rel(loaded, exact):.4f}, round trip vs merged {rel(expected, exact):.4f}")
    assert rel(loaded, exact) < BOUND[type_name]


def test_rows_that_do_not_split_into_blocks_fall_back_to_f16_and_the_head_stays_q8_0(tokenizer):
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(hidden=48, heads=4, kv_heads=2, intermediate=96, tokenizer=tokenizer)
    types = {name: kind.name for _, name, kind in gguf_export.tensor_plan(model, "q4_0")}
    assert types["token_embd.weight"] == "F16"                 # rows of 48: not a multiple of 32
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_up.weight"] == "F16"
    assert types["blk.0.ffn_down.weight"] == "Q4_0"            # rows of 96
    assert types["blk.0.ffn_norm.weight"] == "F32"
    tiny = tiny_model(tokenizer=tokenizer)
    types = {name: kind.name for _, name, kind in gguf_export.tensor_plan(tiny, "q4_0")}
    assert types["token_embd.weight"] == "Q8_0" and types["blk.0.attn_k.weight"] == "Q4_0"
    assert {kind.name for _, _, kind in gguf_export.tensor_plan(tiny, "q8_0")} == {"Q8_0", "F32"}


def test_rotary_permute_is_what_transformers_reverses():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    processor = LlamaTensorProcessor({"num_attention_heads": 8, "num_key_value_heads": 2})
    back = processor.process(gguf_export.rotary_permute(w, 8), "blk.0.attn_q.weight").weights
    assert np.array_equal(back, w)
    k = w[:32]
    assert np.array_equal(processor.process(gguf_export.rotary_permute(k, 2), "blk.0.attn_k.weight").weights, k)


def test_bad_inputs_are_one_line_before_the_model_loads(run_dir, tmp_path, monkeypatch):
    import qpeft.core.run.rebuild

    monkeypatch.setattr(qpeft.core.run.rebuild, "rebuild", lambda *a, **k: pytest.fail("the model loaded"))
    cases = [
        (["--out", str(tmp_path / "m.bin")], "--out must end in .gguf"),
        (["--out", str(tmp_path / "m.gguf"), "--gguf-type", "q3_k"], "Invalid value for '--gguf-type'"),
        (["--out", str(tmp_path / "m.gguf"), "--quant", "nf4"], "--quant does not apply to --format gguf"),
        (["--out", str(tmp_path / "m.gguf"), "--dtype", "bfloat16"], "--dtype does not apply to --format gguf"),
        (["--out", str(run_dir / "m.gguf")], "overlaps the run directory"),
    ]
    for flags, expected in cases:
        result = CliRunner().invoke(cli, ["export", str(run_dir), "--format", "gguf", *flags])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--gguf-type", "q8_0", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2 and "--gguf-type sets the tensor type of a GGUF file; add --format gguf" in result.output
    (tmp_path / "old.gguf").write_text("keep me")
    result = export(run_dir, tmp_path / "old.gguf")
    assert result.exit_code == 2 and "exists; pass --overwrite" in result.output
    assert (tmp_path / "old.gguf").read_text() == "keep me"

    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    other = tmp_path / "other-run"
    other.mkdir()
    resolved = json.loads((run_dir / "config.json").read_text())
    resolved["config"]["model"] = str(gpt2)
    (other / "config.json").write_text(json.dumps(resolved))
    result = export(other, tmp_path / "g.gguf")
    assert result.exit_code == 2, result.output
    assert "GGUF export writes Llama-architecture models" in result.output and "'gpt2'" in result.output


def test_overwrite_replaces_the_file_whole(run_dir, tmp_path):
    out = tmp_path / "model.gguf"
    out.write_text("old")
    result = export(run_dir, out, "--gguf-type", "q8_0", "--overwrite")
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"GGUF"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


@pytest.mark.slow
def test_embedded_model_f16_export_matches_the_merged_model(tmp_path):
    _, run_dir = finished_run(None, tmp_path / "runs", "emb", steps=2, eval_limit=2, batch_size=2)
    out = tmp_path / "smollm2.gguf"
    result = export(run_dir, out)
    assert result.exit_code == 0, result.output
    merged, tokenizer = merged_model(run_dir)
    ids = tokenizer(SAMPLE, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert rel(load_gguf(out)(ids).logits, merged(ids).logits) < 1e-3
    from transformers import AutoTokenizer

    again = AutoTokenizer.from_pretrained(out.parent, gguf_file=out.name)
    assert again(SAMPLE)["input_ids"] == tokenizer(SAMPLE)["input_ids"]


# -- the adapter alone, for llama.cpp's --lora ------------------------------------------------
def gguf_tensors(path) -> dict:
    """Every tensor of a GGUF file as float32 in numpy's order (gguf's reader)."""
    import gguf
    from gguf.quants import dequantize

    return {t.name: dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
            for t in gguf.GGUFReader(path).tensors}


def test_lora_adapter_over_the_unmerged_base_is_the_merged_model(run_dir, tmp_path):
    """llama.cpp's formula W + alpha/r·B·A over the base that --no-merge writes gives the merged
    model's tensors (GGUF layout, q/k permuted): to float32 rounding over an f32 base, within
    q8_0's own error over a q8_0 one."""
    import gguf

    from qpeft.core.interop import gguf_lora

    adapter = tmp_path / "adapter.gguf"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--format", "gguf-lora", "--out", str(adapter)])
    assert result.exit_code == 0, result.output
    assert "14 layers, rank 4, alpha 32" in result.output
    for type_name in ("f32", "q8_0"):
        result = export(run_dir, tmp_path / f"base-{type_name}.gguf", "--no-merge", "--gguf-type", type_name)
        assert result.exit_code == 0, result.output
    merged, _ = merged_model(run_dir)
    expected = {name: array for name, array, _ in gguf_export._arrays(merged, gguf_export.tensor_plan(merged, "f32"))}

    alpha, pairs = gguf_lora.read(adapter)
    assert alpha == 32.0 and len(pairs) == 14                  # lora:r=4, α=32 on every linear layer
    a, b = pairs["blk.0.attn_q.weight"]
    assert a.shape == (4, 64) and b.shape == (64, 4)
    fields = {k: f.contents() for k, f in gguf.GGUFReader(adapter).fields.items()}
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == ("adapter", "lora", "llama")
    names = {t.name for t in gguf.GGUFReader(adapter).tensors}
    assert {"blk.1.ffn_down.weight.lora_a", "blk.1.ffn_down.weight.lora_b", "blk.0.attn_k.weight.lora_b"} <= names

    for type_name, bound in (("f32", 1e-6), ("q8_0", 0.03)):
        base = gguf_tensors(tmp_path / f"base-{type_name}.gguf")
        worst = max(rel(torch.from_numpy(gguf_lora.apply(base[name], a, b, alpha)), torch.from_numpy(expected[name]))
                    for name, (a, b) in pairs.items())
        assert worst < bound, (type_name, worst)                # measured: f32 0 (exact), q8_0 4.4e-3
        alone = rel(torch.tensor(base["blk.0.attn_q.weight"]), torch.tensor(expected["blk.0.attn_q.weight"]))
        assert alone > 10 * bound or type_name == "q8_0"       # the base alone is not the merged model


def test_gguf_lora_refuses_a_method_that_is_not_low_rank_before_loading(run_dir, tmp_path, monkeypatch):
    import qpeft.core.run.rebuild

    monkeypatch.setattr(qpeft.core.run.rebuild, "rebuild", lambda *a, **k: pytest.fail("the model loaded"))
    dora = tmp_path / "dora-run"
    dora.mkdir()
    resolved = json.loads((run_dir / "config.json").read_text())
    resolved["adapter"]["spec"], resolved["adapter"]["parts"][0]["name"] = "dora:r=4", "dora"
    (dora / "config.json").write_text(json.dumps(resolved))
    cases = [(dora, ["--format", "gguf-lora"], "'dora' is not one: ship it merged with --format gguf"),
             (run_dir, ["--format", "gguf-lora", "--gguf-type", "q4_0"], "--gguf-type q4_0 is not one"),
             (run_dir, ["--format", "gguf-lora", "--no-merge"], "does not apply to --format gguf-lora"),
             (run_dir, ["--format", "gguf", "--no-merge", "--gguf-type", "q4_0", "--calibrate", "2"],
              "an adapter and an unmerged base have none to round"),
             (run_dir, ["--format", "gguf", "--gguf-type", "f16", "--calibrate", "2"], "--gguf-type f16 is not one")]
    for where, flags, expected in cases:
        result = CliRunner().invoke(cli, ["export", str(where), *flags, "--out", str(tmp_path / "a.gguf")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1


def test_calibrated_q4_0_file_holds_gptqs_rounding(run_dir, tmp_path):
    """--calibrate N: each Q4_0 layer rounded by GPTQ over N training batches; the file holds
    exactly that rounding (gguf.quants derives the same d again), not the plain round trip."""
    from qpeft.core.compare import calibrate
    from qpeft.core.run.record import RunRecord

    out = tmp_path / "gptq-q4_0.gguf"
    result = export(run_dir, out, "--gguf-type", "q4_0", "--calibrate", "2")
    assert result.exit_code == 0, result.output
    assert "GPTQ over 2 training batches" in result.output
    stored = gguf_tensors(out)
    tuned, _, stats = calibrate.gguf_merged(run_dir, RunRecord.read(run_dir), "q4_0", None, 2)
    assert stats["layers"] == 14 and stats["output_error_gptq"] < 0.5 * stats["output_error_plain"]
    merged, _ = merged_model(run_dir)
    plan = gguf_export.tensor_plan(merged, "q4_0")
    gptq = {name: array for name, array, kind in gguf_export._arrays(tuned, plan) if kind.name == "Q4_0"}
    plain = {name: array for name, array, _ in gguf_export._arrays(round_trip(merged, "q4_0"), plan)}
    assert len(gptq) == 14
    for name, array in gptq.items():
        assert np.array_equal(stored[name], array), name
        assert not np.array_equal(stored[name], plain[name]), name
