"""Issue 22 (reliability, second pass): what used to end in a traceback or destroy a user's
files is one line (exit 2) naming the file and what to do; eval's --out and the final
adapter are written atomically. Every test uses the tiny model."""
import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qpeft.core import streaming
from qpeft.core.cli.main import cli


def tiny_run(tiny_dir, out, name, *extra):
    return ["run", "--model", str(tiny_dir), "--quant", "none:compute_dtype=float32",
            "--adapter", "lora:r=4", "--evaluators", "perplexity", "--eval-limit", "4",
            "--steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
            "--output-dir", str(out), "--name", name, *extra]


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, after_progress=False) -> str:
    """The single error line on stderr (the last line, when progress lines came first)."""
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    lines = result.stderr.strip().splitlines()
    if after_progress:
        assert sum("Error" in line for line in lines) == 1, lines
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("Error: "), lines
    return lines[0]


def snapshot(directory: Path) -> dict:
    return {p.relative_to(directory): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """Two finished tiny runs: (output_dir, run 'ev', run 'ev2')."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("ev", "ev2"):
        result = invoke(*tiny_run(tiny_dir, out, name))
        assert result.exit_code == 0, result.output
    return out, out / "ev", out / "ev2"


@pytest.fixture
def no_load(monkeypatch):
    """Fail the test if a model is loaded: each check below must come first."""
    def fail(*a, **k):
        raise AssertionError("the model was loaded before the check")
    monkeypatch.setattr(streaming, "load_quantized", fail)


# -- item 2: qpeft eval --out ----------------------------------------------------------
@pytest.mark.parametrize("target", ["ev/config.json", "ev2/adapter/adapter_model.safetensors",
                                    "ev/report.json", "ev/checkpoints/step-000002/COMPLETE", "ev/notes.json"])
def test_eval_out_inside_a_run_directory_is_refused_and_the_run_kept(finished, no_load, target):
    out, run, _ = finished
    before = snapshot(out)
    line = one_line_error(invoke("eval", run, "--out", out / target, "--overwrite"))
    assert "lies inside the run or adapter directory" in line and "eval-NAME.json" in line
    assert snapshot(out) == before


def test_eval_out_needs_overwrite_for_an_existing_file_and_writes_atomically(finished, tmp_path, monkeypatch):
    out, run, _ = finished
    mine = tmp_path / "results.json"
    mine.write_text("my own notes")
    monkeypatch.setattr(streaming, "load_quantized", _no_load)
    line = one_line_error(invoke("eval", run, "--out", mine))
    assert line == f"Error: --out {mine} exists; pass --overwrite to replace it, or choose another --out"
    assert mine.read_text() == "my own notes"
    monkeypatch.undo()

    own = run / "eval-mine.json"   # the evaluation's own file name, inside the run: allowed
    result = invoke("eval", run, "--limit", "2", "--out", own)
    assert result.exit_code == 0, result.output
    assert json.loads(own.read_text())["run"] == "ev"

    import os
    real = os.replace

    def full(src, dst):   # the disk fills while the new file is renamed in
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "replace", full)
    mine.write_text("my own notes")
    line = one_line_error(invoke("eval", run, "--limit", "2", "--out", mine, "--overwrite"), after_progress=True)
    assert line == f"Error: cannot write {mine}: No space left on device; free some space"
    assert mine.read_text() == "my own notes" and sorted(os.listdir(tmp_path)) == ["results.json"]
    monkeypatch.setattr(os, "replace", real)
    result = invoke("eval", run, "--limit", "2", "--out", mine, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(mine.read_text())["run"] == "ev"


def _no_load(*a, **k):
    raise AssertionError("the model was loaded before the check")


# -- item 3: a full disk while the final adapter is saved ----------------------------------
def _full_disk_for(monkeypatch, *modules):
    """safetensors' save_file fails as on a full disk (its own wrapped error) in ``modules``."""
    import safetensors.torch
    from safetensors import SafetensorError

    def full(tensors, filename, metadata=None):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    for module in modules:
        monkeypatch.setattr(module, "save_file", full)


def test_a_full_disk_at_the_final_save_checkpoints_and_says_how_to_finish(finished, tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch
    from safetensors.torch import load_file

    _full_disk_for(monkeypatch, safetensors.torch)   # the adapter's file; checkpoints still fit
    run = tmp_path / "x"
    result = invoke(*tiny_run(tiny_dir, tmp_path, "x", "--save-every", "0"))
    line = one_line_error(result, after_progress=True)
    kept = run / "checkpoints" / "step-000003"
    assert line.startswith(f"Error: cannot write the adapter {run / 'adapter'}: No space left on device; "
                           f"the trained state is kept in {kept}: free at least 0.")
    assert line.endswith(f"MB on the disk of {run}, then finish the run with: qpeft run --resume {run}")
    assert (kept / "COMPLETE").is_file() and not (run / "adapter").exists()
    assert [p.name for p in run.iterdir() if p.name.startswith(".")] == []   # no half-written adapter
    monkeypatch.undo()   # space freed
    result = invoke("run", "--resume", run)
    assert result.exit_code == 0, result.output
    trained = load_file(finished[1] / "adapter" / "adapter_model.safetensors")   # the same run, not interrupted
    resumed = load_file(run / "adapter" / "adapter_model.safetensors")
    assert trained.keys() == resumed.keys() and all((trained[k] == resumed[k]).all() for k in trained)


def test_a_full_disk_for_adapter_and_checkpoint_says_what_is_lost(tiny_dir, tmp_path, monkeypatch):
    import safetensors.torch

    from qpeft.core import checkpoint

    _full_disk_for(monkeypatch, safetensors.torch, checkpoint)
    run = tmp_path / "x"
    line = one_line_error(invoke(*tiny_run(tiny_dir, tmp_path, "x", "--save-every", "0")), after_progress=True)
    assert line.startswith(f"Error: cannot write the adapter {run / 'adapter'} nor a checkpoint: No space left "
                           "on device; this training is lost: free at least 0.")
    assert line.endswith(f"then train again with: qpeft run --resume {run}")


def test_a_failed_save_over_an_existing_adapter_keeps_it(finished, tiny, monkeypatch, tmp_path):
    import shutil

    import safetensors.torch

    from qpeft.core import peft_format, pipeline
    from qpeft.core.adapter import compose
    from qpeft.core.registry import default

    adapter = tmp_path / "adapter"
    shutil.copytree(finished[1] / "adapter", adapter)
    before = snapshot(adapter)
    pipeline.build_plugin("quantizer", "none:compute_dtype=float32", default()).quantize_model(tiny, progress=False)
    composition = compose("lora:r=4", default())
    composition.attach(tiny)
    _full_disk_for(monkeypatch, safetensors.torch)
    with pytest.raises(peft_format.AdapterWriteError, match="No space left on device"):
        composition.method.save(tiny, adapter, {})
    assert snapshot(adapter) == before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
    monkeypatch.undo()
    composition.method.save(tiny, adapter, {})
    assert snapshot(adapter) != before and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
