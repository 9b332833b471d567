"""Nothing a user made is lost: run names, --overwrite, export --out, determinism."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from qpeft.core import streaming
from qpeft.core.cli.main import cli
from qpeft.core.errors import ModelLoadError

MEASURED = {"quantize_seconds", "train_seconds", "tokens_per_s", "seconds", "runtime_s",  # timings
            "peak_rss_mb", "peak_gpu_reserved_mb", "peak_gpu_allocated_mb", "memory_mb"}


def tiny_run(tiny_dir, out, name, *extra):
    return ["run", "--model", str(tiny_dir), "--quant", "none:compute_dtype=float32",
            "--adapter", "lora:r=4:dropout=0.1", "--evaluators", "perplexity", "--eval-limit", "4",
            "--steps", "3", "--batch-size", "4", "--log-every", "1", "--save-every", "2",
            "--output-dir", str(out), "--name", name, *extra]


def invoke(*args):
    return CliRunner().invoke(cli, list(args))


def one_line_error(result, after_progress=False) -> str:
    """The single error line on stderr (after the progress lines, when the error came late)."""
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    if after_progress:   # progress lines and bars come first; the error is the last line, alone
        assert sum("Error" in line for line in lines) == 1, lines
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("Error: ") and "Traceback" not in result.output, lines
    return lines[0]


@pytest.fixture(scope="module")
def finished(tiny_dir, tmp_path_factory):
    """A finished tiny run: (output_dir, run_dir)."""
    out = tmp_path_factory.mktemp("runs")
    result = invoke(*tiny_run(tiny_dir, out, "done"))
    assert result.exit_code == 0, result.output
    return out, out / "done"


@pytest.mark.parametrize("name", ["..", ".", "/tmp/elsewhere", "../x", "a/b", ".hidden", "-rf", "x\0y"])
def test_a_run_name_that_is_not_one_plain_component_is_refused(tiny_dir, tmp_path, monkeypatch, name):
    out = tmp_path / "runs"
    (out / "kept").mkdir(parents=True)
    (tmp_path / "sentinel").write_text("mine")
    monkeypatch.chdir(out)
    line = one_line_error(invoke(*tiny_run(tiny_dir, out, name, "--overwrite")))
    assert "is not a plain run name" in line and "--name" in line
    assert (tmp_path / "sentinel").read_text() == "mine" and (out / "kept").is_dir()


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_load(finished, tiny_dir, monkeypatch):
    out, run = finished
    before = sorted(p.relative_to(run) for p in run.rglob("*"))

    def fail(*a, **k):
        raise ModelLoadError("could not load the model (simulated)")
    monkeypatch.setattr(streaming, "load_quantized", fail)
    line = one_line_error(invoke(*tiny_run(tiny_dir, out, "done", "--overwrite")), after_progress=True)
    assert "simulated" in line
    line = one_line_error(invoke("run", "--resume", str(run), "--overwrite", "--lr", "-1"))
    assert "--lr must be > 0" in line
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_overwrite_swaps_the_new_run_in_only_after_loading(tiny_dir, tmp_path, monkeypatch):
    run = tmp_path / "keep"
    run.mkdir()
    (run / "old-notes.txt").write_text("old run")
    seen = []
    real = streaming.load_quantized

    def watch(*a, **k):
        seen.append((run / "old-notes.txt").is_file())   # the old run is still whole while loading
        return real(*a, **k)
    monkeypatch.setattr(streaming, "load_quantized", watch)
    result = invoke(*tiny_run(tiny_dir, tmp_path, "keep", "--overwrite"))
    assert result.exit_code == 0, result.output
    assert seen == [True]
    assert not (run / "old-notes.txt").exists() and (run / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]   # no staging, no lock left


@pytest.mark.parametrize("where", ["run", "run/adapter", "parent"])
def test_export_refuses_an_out_that_overlaps_the_run(finished, where):
    out, run = finished
    target = {"run": run, "run/adapter": run / "adapter", "parent": out}[where]
    line = one_line_error(invoke("export", str(run), "--out", str(target), "--overwrite"))
    assert "overlaps the run directory" in line
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_export_with_a_bad_rank_leaves_out_untouched(finished, tmp_path):
    _, run = finished
    dest = tmp_path / "export"
    dest.mkdir()
    (dest / "mine.txt").write_text("keep me")
    line = one_line_error(invoke("export", str(run), "--out", str(dest), "--overwrite", "--rank", "2"))
    assert "--rank needs a dynamic-rank adapter" in line
    assert (dest / "mine.txt").read_text() == "keep me"
    ok = invoke("export", str(run), "--out", str(dest), "--overwrite")
    assert ok.exit_code == 0, ok.output
    assert not (dest / "mine.txt").exists() and (dest / "adapter_model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_an_unwritable_output_dir_is_one_line(tiny_dir, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    line = one_line_error(invoke(*tiny_run(tiny_dir, blocker / "runs", "x")))
    assert "cannot write" in line and "a-file" in line


def _facts_without_timings(value):
    if isinstance(value, dict):
        return {k: _facts_without_timings(v) for k, v in value.items() if k not in MEASURED}
    if isinstance(value, list):
        return [_facts_without_timings(v) for v in value]
    return value


def test_the_same_seed_gives_bit_identical_adapters_and_reports(tiny_dir, tmp_path):
    for name in ("a", "b"):
        result = invoke(*tiny_run(tiny_dir, tmp_path, name, "--evaluators", "perplexity;accuracy",
                                  "--seed", "7"))
        assert result.exit_code == 0, result.output
    a, b = (load_file(tmp_path / n / "adapter" / "adapter_model.safetensors") for n in ("a", "b"))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / n / "report.json").read_text()) for n in ("a", "b"))
    for r in (ra, rb):
        r.pop("run", None)
    assert _facts_without_timings(ra) == _facts_without_timings(rb)
    other = invoke(*tiny_run(tiny_dir, tmp_path, "c", "--seed", "8"))
    assert other.exit_code == 0, other.output
    c = load_file(tmp_path / "c" / "adapter" / "adapter_model.safetensors")
    assert any(not a[k].equal(c[k]) for k in a)          # the seed does reach the adapter


def test_resume_without_a_checkpoint_restarts_in_place(finished, tmp_path):
    import shutil

    _, run = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shutil.rmtree(copy / "checkpoints")
    result = invoke("run", "--resume", str(copy))
    assert result.exit_code == 0, result.output
    assert "restarting this run from step 0 in place" in result.stderr
    steps = [json.loads(l)["step"] for l in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_resume_falls_back_past_a_damaged_checkpoint(finished, tmp_path):
    import shutil

    _, run = finished
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    newest = copy / "checkpoints" / "step-000003" / "state.safetensors"
    data = bytearray(newest.read_bytes())
    data[-5] ^= 0x10
    newest.write_bytes(bytes(data))
    result = invoke("run", "--resume", str(copy))
    assert result.exit_code == 0, result.output
    assert "checkpoint step-000003 is damaged (state.safetensors: SHA-256 mismatch); falling back to " \
           "step-000002" in result.stderr
    a = load_file(run / "adapter" / "adapter_model.safetensors")
    b = load_file(copy / "adapter" / "adapter_model.safetensors")
    assert all(a[k].equal(b[k]) for k in a)               # step 3 redone from step 2: same weights


def test_a_full_disk_anywhere_in_a_run_is_one_line(tiny_dir, tmp_path, monkeypatch):
    import errno

    from qpeft.core import report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "report.json"))
    monkeypatch.setattr(report, "write", full)
    line = one_line_error(invoke(*tiny_run(tiny_dir, tmp_path, "x")), after_progress=True)
    assert line == f"Error: cannot write {tmp_path / 'x' / 'report.json'}: No space left on device; free some space"
    assert (tmp_path / "x" / "checkpoints" / "step-000003" / "COMPLETE").is_file()   # earlier work kept
