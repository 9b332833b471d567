"""Rebuilding finished runs: re-evaluation, export at a rank, and a merged model transformers loads."""
import json
import math

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.cli.main import cli
from qpeft.core.run.rebuild import rebuild


def finished_run(tiny_dir, out, quant, adapter, name):
    cfg = config.build(None, {"model": tiny_dir, "quant": quant, "adapter": adapter, "name": name,
                              "evaluators": "perplexity", "eval_limit": 6, "steps": 3, "batch_size": 4,
                              "lr": 1e-2, "save_every": 0, "output_dir": str(out), "progress": False})
    return pipeline.run(cfg, say=lambda _: None), out / name


def test_loftq_run_rebuilds_to_the_reported_perplexity_and_merges(tiny_dir, tmp_path):
    report, run_dir = finished_run(tiny_dir, tmp_path, "nf4:compute_dtype=float32", "lora:r=4+loftq:iters=2", "lq")
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--evaluators", "perplexity"])
    assert result.exit_code == 0, result.output
    [saved] = run_dir.glob("eval-*.json")
    again = json.loads(saved.read_text())
    assert again["results"]["perplexity"]["perplexity"] == pytest.approx(
        report["after"]["perplexity"]["perplexity"], rel=1e-5)

    out = tmp_path / "merged"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--out", str(out)])
    assert result.exit_code == 0, result.output
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    built = rebuild(run_dir)
    ids = torch.randint(0, 1000, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, built.model(ids).logits, rtol=1e-3, atol=1e-3)
    assert list(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()
    # what --merge --quant re-quantizes for a base LoftQ rewrote: the residual it quantized (its last
    # Eq. 6 argument), whose quantization is exactly the trained base — not the checkpoint's W
    from qpeft.core.compare import base_weights
    from qpeft.core.compare.requant import validation

    _, plan, _, record = validation(run_dir)
    again, pre = base_weights.rebuild(run_dir, record, plan)
    name = "model.layers.1.mlp.up_proj"
    layer = again.model.get_submodule(name)
    linear = torch.nn.Linear(*reversed(pre[name].shape), bias=False)
    with torch.no_grad():
        linear.weight.copy_(pre[name])
    assert torch.equal(plan.quantizer.quantize_linear(linear).dequantize(), layer.base.dequantize())
    from safetensors.torch import load_file

    w = load_file(f"{tiny_dir}/model.safetensors")[name + ".weight"].float()
    assert float((pre[name] - w).norm() / w.norm()) > 0.01          # W − s·B₁·A₁ (iters=2), not W
    refused = CliRunner().invoke(cli, ["export", str(run_dir), "--rank", "2", "--out", str(tmp_path / "r")])
    assert refused.exit_code == 2
    assert "--rank needs a dynamic-rank adapter such as qdylora; this run used 'lora:r=4+loftq:iters=2'" in refused.output


def test_qdylora_exports_at_a_smaller_rank_as_plain_lora(tiny_dir, tmp_path):
    _, run_dir = finished_run(tiny_dir, tmp_path, "none:compute_dtype=float32", "qdylora:r_max=8", "dy")
    out = tmp_path / "rank2"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--rank", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["r"] == 2
    from safetensors.torch import load_file

    shapes = {t.shape[0] for k, t in load_file(out / "adapter_model.safetensors").items() if "lora_A" in k}
    assert shapes == {2}
    again = CliRunner().invoke(cli, ["export", str(run_dir), "--rank", "9", "--out", str(tmp_path / "x")])
    assert again.exit_code == 2 and "pass --rank between 1 and 8" in again.output


def test_merge_and_requant_reports_the_quality_cost_and_reloads_as_what_it_measured(tiny_dir, tmp_path):
    report, run_dir = finished_run(tiny_dir, tmp_path, "nf4:compute_dtype=float32", "lora:r=4", "rq")
    out, spec = tmp_path / "shipped", "nf4:compute_dtype=float32"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--quant", spec, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "merged, re-quantized nf4:compute_dtype=float32 (shipped)" in result.stdout
    saved = json.loads((out / "export_report.json").read_text())
    assert saved["quality"] == {"evaluator": "perplexity", "metric": "perplexity", "higher_is_better": False,
                                "options": {"batch_size": 8}}
    ppl = saved["values"]
    assert ppl["trained"] == pytest.approx(report["after"]["perplexity"]["perplexity"], rel=1e-5)
    assert saved["relative_gap"]["shipped_vs_trained"] == pytest.approx(ppl["shipped"] / ppl["trained"] - 1, abs=1e-6)

    # re-quantized from the checkpoint's W + ΔW (not the merged Ŵ + ΔW, whose update NF4 rounds away):
    # the saved weights are W + ΔW, and the shipped 4-bit model keeps the fine-tune — within 5 % of
    # the trained perplexity (measured +0.03 %), where the untrained base is 16 % off (so it could fail)
    assert saved["requantized_from"]["road"] == "W+ΔW" and saved["saved"] == "shipped"
    before = report["before"]["perplexity"]["perplexity"]
    assert before / ppl["trained"] - 1 > 0.10
    assert abs(ppl["shipped"] / ppl["trained"] - 1) < 0.05
    from safetensors.torch import load_file

    key = "model.layers.1.self_attn.v_proj.weight"
    w = load_file(f"{tiny_dir}/model.safetensors")[key].float()
    delta = rebuild(run_dir).model.get_submodule(key[:-len(".weight")]).delta_weight()
    torch.testing.assert_close(load_file(out / "model.safetensors")[key], w + delta, rtol=0, atol=1e-6)
    assert saved["model_mb"]["shipped"] < saved["model_mb"]["merged"]
    assert json.loads((out / "qpeft_quant.json").read_text())["quant"] == spec
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()

    # `qpeft run --model OUT --quant SPEC` quantizes the saved model into exactly what was measured
    cfg = config.build(None, {"model": str(out), "quant": spec, "adapter": "lora:r=4", "name": "again",
                              "evaluators": "perplexity", "eval_limit": 6, "steps": 1, "batch_size": 4,
                              "save_every": 0, "output_dir": str(tmp_path), "progress": False})
    again = pipeline.run(cfg, say=lambda _: None)
    assert again["before"]["perplexity"]["perplexity"] == pytest.approx(ppl["shipped"], rel=1e-5)

    # any metric of the run's evaluators measures the cost; one it did not run is one line
    by_loss = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--quant", spec, "--quality",
                                       "perplexity:eval_loss", "--out", str(tmp_path / "by-loss")])
    assert by_loss.exit_code == 0, by_loss.output
    loss = json.loads((tmp_path / "by-loss" / "export_report.json").read_text())["values"]
    assert loss["trained"] == pytest.approx(report["after"]["perplexity"]["eval_loss"], rel=1e-5)
    assert loss["shipped"] == pytest.approx(math.log(ppl["shipped"]), rel=1e-5)
    bad = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--quant", spec, "--quality", "accuracy",
                                   "--out", str(tmp_path / "acc")])
    assert bad.exit_code == 2 and not (tmp_path / "acc").exists()
    assert bad.output.strip().splitlines()[-1] == ("Error: --quality 'accuracy': 'accuracy' is not among "
                                                   "--evaluators (perplexity); use one the run measured: perplexity")
    result = CliRunner().invoke(cli, ["eval", str(tmp_path / "again"), "--evaluators", "perplexity"])
    assert result.exit_code == 0, result.output
    check_calibrated(run_dir, tmp_path)


def check_calibrated(run_dir, tmp_path):
    """``--calibrate N``: GPTQ over N of the run's training batches; the saved float32 weights sit on
    NF4's grid, so re-quantizing them on load gives the measured model (its codes, the absmax up to
    double quantization's drift)."""
    out, spec = tmp_path / "gptq", "nf4:compute_dtype=float32"
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--quant", spec, "--calibrate", "2",
                                      "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "GPTQ over 2 batches (shipped)" in result.stdout
    saved = json.loads((out / "export_report.json").read_text())
    cal = saved["calibration"]
    assert saved["saved"] == "calibrated" and cal["batches"] == 2 and cal["layers"] == 14
    assert cal["output_error_gptq"] < 0.5 * cal["output_error_plain"]      # measured 1.9e-3 against 6.1e-3
    ppl = saved["values"]
    assert abs(ppl["calibrated"] / ppl["trained"] - 1) < 0.05 and abs(ppl["shipped"] / ppl["trained"] - 1) < 0.05
    assert saved["relative_gap"]["calibrated_vs_trained"] == pytest.approx(ppl["calibrated"] / ppl["trained"] - 1,
                                                                           abs=1e-6)
    from safetensors.torch import load_file

    from qpeft.core.compare.requant import check_spec

    weight = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    again = check_spec(spec).quantize_linear(linear).dequantize()
    assert float((again - weight).abs().max() / weight.abs().max()) < 5e-4

    refused = CliRunner().invoke(cli, ["export", str(run_dir), "--merge", "--quant", "hqq:nbits=4", "--calibrate",
                                       "2", "--out", str(tmp_path / "h")])
    assert refused.exit_code == 2 and "'hqq:nbits=4' does not have" in refused.output


def test_requant_flags_are_checked_before_the_model_loads(tiny_dir, tmp_path, monkeypatch):
    import qpeft.core.run.rebuild

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.json").write_text("{}")
    monkeypatch.setattr(qpeft.core.run.rebuild, "rebuild", lambda *a, **k: pytest.fail("the model loaded"))
    cases = [(["--merge", "--quant", "bogus"], "unknown quantizer 'bogus'"),
             (["--merge", "--quant", "hqq:nbits=9"], "hqq"),
             (["--quant", "nf4"], "--quant applies to a merged model; add --merge"),
             (["--calibrate", "4"], "--calibrate re-quantizes a merged model with error feedback; add --merge"),
             (["--merge", "--quant", "nf4", "--calibrate", "4", "--dtype", "bfloat16"], "drop --dtype"),
             (["--merge", "--quant", "int8", "--calibrate", "4"], "'int8' does not have"),
             (["--no-merge"], "--no-merge applies to --format gguf"),
             (["--dtype", "bfloat16"], "--dtype applies to a merged model; add --merge")]
    for flags, expected in cases:
        result = CliRunner().invoke(cli, ["export", str(run_dir), *flags, "--out", str(tmp_path / "o")])
        assert result.exit_code == 2 and expected in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_compare_export_columns_show_plain_and_calibrated(tmp_path):
    """``qpeft compare --export-quant``: a cell's kept report gives both re-quantizations' columns;
    a report from before the calibrated column is measured again (here: refused, no run)."""
    from qpeft.core.compare import requant

    values = {"trained": 4.84, "merged": 4.65, "shipped": 4.76, "calibrated": 4.80}
    gaps = {k + "_vs_trained": values[k] / values["trained"] - 1 for k in ("merged", "shipped", "calibrated")}
    kept = {"values": values, "relative_gap": {**gaps, "shipped_vs_merged": 0.0}, "calibration": {"batches": 8},
            "quality": {"evaluator": "perplexity", "metric": "perplexity"}}
    (tmp_path / "export-nf4.json").write_text(json.dumps(kept))
    columns = requant.compare_columns(tmp_path, "nf4", say=lambda _: None)
    assert columns == {"export_trained": 4.84, "export_merged": 4.65, "export_shipped": 4.76,
                       "export_gap_pct": pytest.approx(-1.653, abs=1e-3), "export_calibrated": 4.80,
                       "export_calibrated_gap_pct": pytest.approx(-0.826, abs=1e-3)}
    del kept["calibration"]
    (tmp_path / "export-nf4.json").write_text(json.dumps(kept))
    again = requant.compare_columns(tmp_path, "nf4", say=lambda _: None)
    assert again["export_calibrated"] is None and "config.json" in again["export_error"]
