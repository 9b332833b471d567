"""The "before" numbers of a quantized base are measured once (core/run/baselines.py): a second
run of the same model, quantizer and data reads them — equal to what it would have measured —
and says so; another quantizer, other data or --no-cache measures again; a damaged entry is
measured again; footprint (not reproducible) is always measured."""
import json
import os
import subprocess
import sys

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(tiny_dir, out, name, *extra, baselines):
    cmd = [sys.executable, "-m", "qpeft", "run", "--model", str(tiny_dir), "--adapter", "lora:r=2", "--steps", "1",
           "--batch-size", "2", "--eval-limit", "4", "--eval-every", "0", "--evaluators", "perplexity;footprint",
           "--output-dir", str(out), "--name", name, *extra]
    done = subprocess.run(cmd, env={**ENV, "QPEFT_BASELINES": str(baselines)}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((out / name / "report.json").read_text())
    return done.stdout + done.stderr, report


def test_the_baseline_is_measured_once_and_reused_exactly(tiny_dir, tmp_path):
    cache = tmp_path / "baselines"
    text, first = run(tiny_dir, tmp_path, "a", "--quant", "nf4", baselines=cache)
    assert "cached" not in text and "before_cached" not in first["facts"]
    entries = [f for f in cache.glob("*.json") if f.name != "file-hashes.json"]
    assert len(entries) == 1                                    # perplexity only: footprint is not reproducible
    text, second = run(tiny_dir, tmp_path, "b", "--quant", "nf4", "--adapter", "lora:r=4+rslora", baselines=cache)
    assert "before perplexity" in text and "(cached: same model, quantizer and data)" in text
    assert second["facts"]["before_cached"] == "perplexity"
    assert second["before"]["perplexity"] == first["before"]["perplexity"]
    assert second["before"]["footprint"]                        # measured again, as always
    _, fresh = run(tiny_dir, tmp_path, "c", "--quant", "nf4", "--no-cache", baselines=cache)
    assert "before_cached" not in fresh["facts"]
    assert fresh["before"]["perplexity"] == first["before"]["perplexity"]    # what the cache served
    _, other = run(tiny_dir, tmp_path, "d", "--quant", "hqq", baselines=cache)
    assert "before_cached" not in other["facts"]
    assert other["before"]["perplexity"] != first["before"]["perplexity"]


def test_a_damaged_entry_is_measured_again(tiny_dir, tmp_path):
    cache = tmp_path / "baselines"
    _, first = run(tiny_dir, tmp_path, "a", "--quant", "nf4", baselines=cache)
    (entry,) = [f for f in cache.glob("*.json") if f.name != "file-hashes.json"]
    entry.write_text('{"key": {"format": 1}, "result": {"perplexity": 1.0')     # cut short
    _, again = run(tiny_dir, tmp_path, "b", "--quant", "nf4", baselines=cache)
    assert "before_cached" not in again["facts"] and again["before"] == first["before"] | {"footprint": again["before"]["footprint"]}
    assert json.loads(entry.read_text())["result"] == first["before"]["perplexity"]


def test_the_model_key_is_its_content_not_its_path(tiny_dir, tmp_path, monkeypatch):
    import shutil

    from qpeft.core.run import baselines

    monkeypatch.setenv("QPEFT_BASELINES", str(tmp_path / "b"))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_dir, copy)
    assert baselines.model_content(str(copy)) == baselines.model_content(str(tiny_dir))
    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = config.get("rms_norm_eps", 1e-6) * 2
    (copy / "config.json").write_text(json.dumps(config))
    assert baselines.model_content(str(copy)) != baselines.model_content(str(tiny_dir))
