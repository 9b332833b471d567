"""``qpeft run`` end to end: on a saved tiny model in seconds, on the embedded model briefly."""
import json

import pytest

from qpeft.core.settings import config
from qpeft.core.run import pipeline
from qpeft.core.base.errors import QpeftError

REPORT_FIELDS = {"run", "quantizer", "adapter", "model", "qpeft_version", "before", "after", "facts", "training"}


def settings(tmp_path, **kw):
    base = {"model": None, "quant": "none:compute_dtype=float32", "adapter": "lora:r=4",
            "evaluators": "perplexity;accuracy;footprint", "eval_limit": 8, "steps": 6,
            "batch_size": 4, "lr": 1e-2, "log_every": 1, "save_every": 3, "output_dir": str(tmp_path),
            "progress": False}
    return config.build(None, {**base, **kw})


def test_pipeline_on_the_tiny_model_writes_every_file(tiny_dir, tmp_path):
    cfg = settings(tmp_path, model=tiny_dir, name="tiny", eval_every=3)
    report = pipeline.run(cfg, say=lambda _: None)
    run = tmp_path / "tiny"
    for name in ("config.json", "metrics.jsonl", "report.json", "report.md", "loss.png",
                 "eval_before.json", "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
                 "checkpoints/step-000003/COMPLETE", "checkpoints/step-000006/COMPLETE"):
        assert (run / name).is_file(), name
    assert REPORT_FIELDS <= set(report)
    assert json.loads((run / "report.json").read_text())["training"]["steps"] == 6
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["quantizer"] == {"name": "none", "origin": "qpeft", "version": resolved["qpeft_version"],
                                     "options": {"compute_dtype": "float32", "include_lm_head": False}}
    assert resolved["adapter"]["parts"][0]["options"]["r"] == 4
    assert report["after"]["perplexity"]["perplexity"] < report["before"]["perplexity"]["perplexity"]
    assert report["after"]["footprint"]["trainable_params"] > 0
    assert "| perplexity | perplexity |" in (run / "report.md").read_text()
    records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "eval_loss" in r] == [3, 6]
    stages = report["facts"]["stage_seconds"]      # where a run's wall time went
    assert list(stages) == ["load", "before", "prepare", "train", "save", "after"]
    assert stages["train"] >= report["facts"]["train_seconds"] > 0 and min(stages.values()) >= 0
    assert "- stage_seconds: load " in (run / "report.md").read_text()


def test_cli_resume_continues_a_run_from_its_checkpoint(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from qpeft.core.cli.main import cli

    common = ["--model", tiny_dir, "--quant", "none:compute_dtype=float32", "--adapter", "lora:r=4",
              "--evaluators", "perplexity", "--eval-limit", "4", "--batch-size", "4",
              "--log-every", "1", "--save-every", "2", "--output-dir", str(tmp_path), "--name", "r"]
    first = CliRunner().invoke(cli, ["run", *common, "--steps", "4"])
    assert first.exit_code == 0, first.output
    again = CliRunner().invoke(cli, ["run", *common, "--steps", "4"])
    assert again.exit_code == 2 and "exists; pass --resume" in again.output
    resumed = CliRunner().invoke(cli, ["run", "--resume", str(tmp_path / "r"), "--steps", "6"])
    assert resumed.exit_code == 0, resumed.output
    steps = [json.loads(l)["step"] for l in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert json.loads((tmp_path / "r" / "report.json").read_text())["training"]["steps"] == 6


def test_qdylora_report_shows_quality_per_rank(tiny_dir, tmp_path):
    cfg = settings(tmp_path, model=tiny_dir, name="dy", adapter="qdylora:r_max=8:r_min=2",
                   evaluators="perplexity", steps=4)
    after = pipeline.run(cfg, say=lambda _: None)["after"]
    ranks = [key for key in after if key.startswith("perplexity [rank=")]
    assert ranks == ["perplexity [rank=2]", "perplexity [rank=4]", "perplexity [rank=8]"]
    assert after["perplexity [rank=8]"]["perplexity"] == after["perplexity"]["perplexity"]
    assert after["perplexity [rank=2]"]["perplexity"] != after["perplexity"]["perplexity"]


def test_an_existing_run_directory_is_refused(tiny_dir, tmp_path):
    (tmp_path / "taken").mkdir()
    with pytest.raises(QpeftError, match="exists; pass --resume to continue it, --overwrite"):
        pipeline.run(settings(tmp_path, model=tiny_dir, name="taken"), say=lambda _: None)


def test_names_are_checked_before_the_model_is_loaded(tmp_path):
    with pytest.raises(QpeftError, match="unknown adapter 'doraa'; did you mean 'dora'"):
        pipeline.plan(settings(tmp_path, adapter="doraa", model="/nonexistent"))


@pytest.mark.slow
def test_pipeline_on_the_embedded_model_for_a_few_steps(tmp_path):
    cfg = settings(tmp_path, quant="nf4", adapter="lora", steps=6, lr=1e-3, eval_limit=12,
                   evaluators="perplexity;footprint", name="embedded")
    report = pipeline.run(cfg, say=lambda _: None)
    losses = [json.loads(l)["loss"] for l in (tmp_path / "embedded" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and sum(losses[-2:]) < sum(losses[:2])
    assert report["after"]["perplexity"]["perplexity"] < report["before"]["perplexity"]["perplexity"]
    assert report["facts"]["model_mb_before"] > 500 > report["after"]["footprint"]["model_mb"]
