"""Issue 22 (reliability, second pass): what used to end in a traceback or destroy a user's
files is one line (exit 2) naming the file and what to do; eval's --out and the final
adapter are written atomically. Every test uses the tiny model."""
import errno
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from qpeft.core.model import streaming
from qpeft.core.cli.main import cli
from test_models import tiny_gguf


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

    from qpeft.core.train import checkpoint

    _full_disk_for(monkeypatch, safetensors.torch, checkpoint)
    run = tmp_path / "x"
    line = one_line_error(invoke(*tiny_run(tiny_dir, tmp_path, "x", "--save-every", "0")), after_progress=True)
    assert line.startswith(f"Error: cannot write the adapter {run / 'adapter'} nor a checkpoint: No space left "
                           "on device; this training is lost: free at least 0.")
    assert line.endswith(f"then train again with: qpeft run --resume {run}")


def test_a_failed_save_over_an_existing_adapter_keeps_it(finished, tiny, monkeypatch, tmp_path):
    import shutil

    import safetensors.torch

    from qpeft.core.kinds import peft_format
    from qpeft.core.run import pipeline
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.plugin.registry import default

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


# -- item 6: damaged or foreign inputs, refused in one line before the model loads --------
@pytest.fixture(scope="module")
def narrow_dir(tmp_path_factory):
    """Another tiny model (hidden 32, not 64): the adapters of the runs above do not fit it."""
    from qpeft.core.kit.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("narrow"), hidden=32)


@pytest.mark.parametrize("kind", ["qpeft", "peft"])
def test_an_adapter_made_for_another_model_is_refused_before_loading(finished, tiny_dir, narrow_dir, no_load,
                                                                     tmp_path, kind):
    import shutil

    adapter = tmp_path / "adapter"
    shutil.copytree(finished[1] / "adapter", adapter)
    if kind == "peft":   # a plain PEFT directory: its base model is in adapter_config.json
        (adapter / "qpeft_adapter.json").unlink()
    line = one_line_error(invoke("eval", adapter, "--model", narrow_dir, "--quant", "none"))
    layer = "model.layers.0.mlp.down_proj"
    assert line == (f"Error: {adapter / 'adapter_model.safetensors'}: {layer}.lora_B.weight is [64, 4], but "
                    f"{narrow_dir}'s {layer} needs [32, 4] (in 128, out 32); the adapter was made for "
                    f"'{tiny_dir}' (its metadata): pass that one with --model")


def test_a_truncated_adapter_file_is_one_line_before_loading(finished, tiny_dir, no_load, tmp_path):
    import shutil

    out, run, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    fix = f"it may be truncated: write it again with: qpeft run --resume {copy}"
    for args in (["eval", copy], ["export", copy, "--out", tmp_path / "exported"],
                 ["export", copy, "--merge", "--out", tmp_path / "merged"]):
        line = one_line_error(invoke(*args), after_progress=True)
        assert line.startswith(f"Error: {weights} is not a readable safetensors file (") and line.endswith(fix), line
    line = one_line_error(invoke("eval", copy / "adapter", "--model", tiny_dir, "--quant", "none"))
    assert line.startswith(f"Error: {weights} is not a readable safetensors file (")
    assert line.endswith("it may be truncated: save or download the adapter again")
    assert not (tmp_path / "exported").exists() and not (tmp_path / "merged").exists()


def test_a_truncated_report_or_eval_before_is_one_line_naming_it(finished, tmp_path, monkeypatch):
    import shutil

    out, run, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    report = copy / "report.json"
    report.write_bytes(report.read_bytes()[:50])
    monkeypatch.setattr(streaming, "load_quantized", _no_load)
    line = one_line_error(invoke("eval", copy))
    assert line.startswith(f"Error: {report} is damaged (") and line.endswith(f"qpeft run --resume {copy}")
    monkeypatch.undo()

    before = copy / "eval_before.json"
    before.write_bytes(before.read_bytes()[:20])
    line = one_line_error(invoke("run", "--resume", copy), after_progress=True)
    assert line.startswith(f"Error: {before} is damaged (Expecting property name enclosed in double quotes: ")
    assert line.endswith(f"); delete it (it is measured again) and resume: qpeft run --resume {copy}")


def test_every_single_bit_flip_in_a_gguf_header_passes_or_is_one_line(tmp_path):
    from qpeft.core.model import models
    from qpeft.core.base.errors import ModelLoadError

    whole = tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    header = len(whole) - 64 * 16 * 4   # everything before the tensor data
    bad = tmp_path / "flipped.gguf"
    refused = 0
    for at in range(header):
        for bit in range(8):
            flipped = bytearray(whole)
            flipped[at] ^= 1 << bit
            bad.write_bytes(flipped)
            try:
                models.check_gguf(bad)
            except ModelLoadError as exc:
                assert "\n" not in str(exc) and str(exc).startswith(str(bad)), exc
                refused += 1
    assert refused > header   # most flips in the header are caught here, before any conversion


def test_a_yaml_alias_bomb_is_refused_at_once_in_a_short_line(tmp_path):
    import time

    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 7)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("\n".join(levels) + "\nadapter: *a6\nsteps: *a6\n")
    started = time.perf_counter()
    line = one_line_error(invoke("run", "--config", bomb))
    assert time.perf_counter() - started < 10 and len(line) < 300, line[:300]
    assert line == (f"Error: {bomb} is not valid YAML: line 2: an alias (*name) refers to an anchor; qpeft does "
                    "not expand aliases in config files: write the value out")


@pytest.mark.parametrize("out", [".", "..", "./", "here/.."])
def test_export_out_dot_is_refused(finished, tmp_path, monkeypatch, no_load, out):
    (tmp_path / "here").mkdir()
    (tmp_path / "mine.txt").write_text("kept")
    monkeypatch.chdir(tmp_path)
    for extra in ([], ["--overwrite"], ["--merge", "--overwrite"]):
        line = one_line_error(invoke("export", finished[1], "--out", out, *extra))
        assert line == (f"Error: --out {out} is the current directory or one above it, which an export would "
                        "replace; pass a new directory, e.g. --out ev-export")
    assert (tmp_path / "mine.txt").read_text() == "kept"


# -- item 7 --------------------------------------------------------------------------------
def test_sigterm_while_the_model_loads_ends_with_a_line(tiny_dir, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = ("import sys, time\n"
              "from qpeft.core.model import streaming\n"
              "streaming.load_quantized = lambda *a, **k: time.sleep(60)   # a slow load\n"
              "from qpeft.core.cli.main import cli\n"
              "cli.main(sys.argv[1:])\n")
    proc = subprocess.Popen([sys.executable, "-c", script, *tiny_run(tiny_dir, tmp_path, "x")],
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        lines.append(proc.stderr.readline())
        if lines[-1].startswith("qpeft: loading") or not lines[-1]:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    rest = proc.stderr.read()
    assert proc.wait(30) == 143, lines + [rest]
    assert rest.strip().splitlines()[-1:] == ["Aborted (SIGTERM)."], rest
    assert not (tmp_path / ".x.lock").exists()
