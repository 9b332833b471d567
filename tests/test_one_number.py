"""One model, one number (issue 23): a run's own "after" evaluation, ``qpeft eval RUN``, the merged
float32 export and PEFT over the same dequantized base agree, in bf16 compute, for the methods
whose effect is a rescaling near 1 (IA³, DoRA) beside LoRA.

The run trains in bf16 matmuls; the merged model and PEFT compute in float32. The allowed gap,
0.5 % of perplexity, is bf16's: its inputs are rounded to 8 significant bits (relative error
≤ 0.39 %) in each matmul, and the errors are independent between the two models. The run's
"after" and the rebuild go through the same code and must agree to 1e-5.
(The sharp check that an update survives bf16 at all is the conformance kit's bf16 stage.)
"""
import json

import pytest
import torch
from click.testing import CliRunner

from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.compare import requant
from qpeft.core.model import streaming
from qpeft.core.kinds.adapter_layers import merge_model
from qpeft.core.cli.main import cli
from qpeft.core.run.rebuild import rebuild

peft = pytest.importorskip("peft")


def finished_run(tiny_dir, out, adapter, quant="nf4:compute_dtype=bfloat16"):
    cfg = config.build(None, {"model": tiny_dir, "quant": quant, "adapter": adapter,
                              "name": adapter.split(":")[0], "evaluators": "perplexity", "eval_limit": 6,
                              "steps": 3, "batch_size": 4, "lr": 3e-3, "save_every": 0,
                              "output_dir": str(out), "progress": False})
    report = pipeline.run(cfg, say=lambda _: None)
    return report["after"]["perplexity"]["perplexity"], out / cfg.name


@pytest.mark.parametrize("adapter, quant", [
    ("ia3", "nf4:compute_dtype=bfloat16"), ("dora:r=4", "nf4:compute_dtype=bfloat16"),
    ("lora:r=4", "nf4:compute_dtype=bfloat16")])
def test_after_eval_merged_and_peft_give_one_number(tiny_dir, tmp_path, adapter, quant):
    after, run_dir = finished_run(tiny_dir, tmp_path, adapter, quant)
    result = CliRunner().invoke(cli, ["eval", str(run_dir), "--evaluators", "perplexity"])
    assert result.exit_code == 0, result.output
    [saved] = run_dir.glob("eval-*.json")
    assert json.loads(saved.read_text())["results"]["perplexity"]["perplexity"] == pytest.approx(after, rel=1e-5)

    cfg, plan, quality, record = requant.validation(run_dir)
    built = rebuild(run_dir, record=record, plan=plan)
    value = lambda model: requant.quality_value(cfg, plan, quality, model, built.tokenizer)  # noqa: E731
    merged = value(built.composition.method.merge(built.model, torch.float32))
    assert merged == pytest.approx(after, rel=5e-3)

    base = merge_model(streaming.load_quantized(cfg.model, plan.quantizer,  # the same base the run had
                                                float32_activations=plan.adapter.needs_float32_activations)[0],
                       torch.float32)
    theirs = value(peft.PeftModel.from_pretrained(base, run_dir / "adapter").eval())
    assert theirs == pytest.approx(merged, rel=1e-4)   # both float32, the same weights


def test_a_dora_adapter_export_says_where_peft_cannot_serve_it(tiny_dir, tmp_path):
    _, run_dir = finished_run(tiny_dir, tmp_path, "dora:r=4")
    result = CliRunner().invoke(cli, ["export", str(run_dir), "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "note: PEFT 0.21 computes a trained DoRA adapter over a bitsandbytes 4-bit base wrongly" in result.output
    assert "qpeft export RUN --merge" in result.output
