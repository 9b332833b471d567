"""Nothing a user made is lost: run names, --overwrite, export --out, determinism."""
import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file

from qpeft.core.model import streaming
from qpeft.core.cli.main import cli
from qpeft.core.base.errors import ModelLoadError

MEASURED = {"quantize_seconds", "train_seconds", "stage_seconds", "tokens_per_s", "seconds", "runtime_s",  # timings
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
    assert rb["facts"].pop("before_cached") == "perplexity, accuracy"   # b read a's baseline (same numbers)
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

    from qpeft.core.run import report

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x" / "report.json"))
    monkeypatch.setattr(report, "write", full)
    line = one_line_error(invoke(*tiny_run(tiny_dir, tmp_path, "x")), after_progress=True)
    assert line == f"Error: cannot write {tmp_path / 'x' / 'report.json'}: No space left on device; free some space"
    assert (tmp_path / "x" / "checkpoints" / "step-000003" / "COMPLETE").is_file()   # earlier work kept


def snapshot(directory: Path) -> dict:
    """Every file under ``directory`` (and its siblings' names) with its bytes."""
    files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}
    return {"files": files, "beside": sorted(p.name for p in directory.parent.iterdir())}


def copy_of(run, tmp_path, name="copy") -> Path:
    import shutil

    return Path(shutil.copytree(run, tmp_path / name))


@pytest.mark.parametrize("flags, change", [
    (("--adapter", "dora"), "--adapter was lora, now dora"),
    (("--adapter", "lora:r=8:dropout=0.1"), "--adapter: lora's r was 4, now 8"),
    (("--quant", "none:compute_dtype=bfloat16"), "--quant: none's compute_dtype was float32, now bfloat16"),
    (("--model", "tiny"), "--model was {model}, now tiny"),
    (("--optimizer", "paged_adamw_8bit"), "--optimizer was adamw, now paged_adamw_8bit"),
])
def test_resume_refuses_what_its_checkpoints_cannot_serve_and_leaves_the_run_as_it_was(
        finished, tiny_dir, tmp_path, flags, change):
    _, run = finished
    copy = copy_of(run, tmp_path)
    before = snapshot(copy)
    line = one_line_error(invoke("run", "--resume", str(copy), *flags))
    assert line == (f"Error: cannot resume {copy} with other settings than it was trained with: "
                    f"{change.format(model=tiny_dir)}; its checkpoints hold state for what it was trained "
                    f"with. Resume it as it was with 'qpeft run --resume {copy}' (drop those flags), "
                    "or start a new run with --name copy-2")
    assert snapshot(copy) == before                       # byte for byte, and no lock left beside it
    if flags[0] == "--adapter" and flags[1] == "dora":    # and the run still resumes as it was
        result = invoke("run", "--resume", str(copy))
        assert result.exit_code == 0, result.output
        now, then = (json.loads(t) for t in ((copy / "config.json").read_text(), before["files"]["config.json"]))
        assert (now["adapter"], now["quantizer"]) == (then["adapter"], then["quantizer"])
        assert (copy / "adapter" / "adapter_model.safetensors").is_file()


def test_resume_may_extend_steps_and_change_the_lr(finished, tmp_path):
    _, run = finished
    copy = copy_of(run, tmp_path)
    old = json.loads((copy / "config.json").read_text())
    result = invoke("run", "--resume", str(copy), "--steps", "5", "--lr", "1e-3")
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in lines] == [(1, 3e-4), (2, 3e-4), (3, 3e-4), (4, 1e-3), (5, 1e-3)]
    new = json.loads((copy / "config.json").read_text())
    assert (new["config"]["train"]["steps"], new["config"]["train"]["lr"]) == (5, 1e-3)
    assert (new["run"], new["qpeft_version"]) == (old["run"], old["qpeft_version"])


def test_a_run_reached_through_a_symlink_is_locked_as_its_directory(finished, tmp_path):
    import os

    from qpeft.core.base.rundir import RunLock

    _, run = finished
    real = copy_of(run, tmp_path, "real")
    (tmp_path / "alias").symlink_to("real")
    for held, resumed in (("real", "alias"), ("alias", "real")):
        with RunLock(tmp_path, held):
            line = one_line_error(invoke("run", "--resume", str(tmp_path / resumed)))
        assert line.startswith(f"Error: {tmp_path / resumed} is in use by process {os.getpid()}; ")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alias", "real"]
    assert (real / "checkpoints" / "step-000003").is_dir()


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flipped bit", "no manifest", "both steps"])
def test_a_damaged_checkpoint_is_moved_aside_once_a_good_one_is_written(finished, tmp_path, damage):
    from qpeft.core.train import checkpoint

    _, run = finished
    copy = copy_of(run, tmp_path)
    ckpts = copy / "checkpoints"
    if damage == "no manifest":
        (ckpts / "step-000003" / "manifest.json").unlink()
    else:
        _flip(ckpts / "step-000003" / "state.safetensors")
    if damage == "both steps":
        _flip(ckpts / "step-000002" / "state.safetensors")
    aside = {"step-000003": ckpts / "damaged-step-000003"}
    if damage == "both steps":
        aside["step-000002"] = ckpts / "damaged-step-000002"
    result = invoke("run", "--resume", str(copy))
    assert result.exit_code == 0, result.output
    reason = "manifest.json: missing, and this run was started by a qpeft that writes one" \
        if damage == "no manifest" else "state.safetensors: SHA-256 mismatch"
    assert f"qpeft: checkpoint step-000003 is damaged ({reason}); falling back to step-000002" in result.stderr
    written = "step-000002" if damage == "both steps" else "step-000003"
    for name, where in aside.items():
        assert f"qpeft: damaged checkpoint {name} moved aside to {where} now that {written} is written" \
            in result.stderr
    assert sorted(p.name for p in ckpts.iterdir()) == sorted(["step-000002", "step-000003", *(
        p.name for p in aside.values())])
    notices = []
    found, _ = checkpoint.load_newest(ckpts, say=notices.append)
    assert found == ckpts / "step-000003" and notices == []   # the next resume starts from step 3
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


def test_a_checkpoint_without_manifest_loads_unverified_only_for_a_run_an_older_qpeft_started(finished, tmp_path):
    _, run = finished
    copy = copy_of(run, tmp_path)
    record = json.loads((copy / "config.json").read_text())
    record["qpeft_version"] = "0.0.9"                     # before checkpoints carried a manifest
    (copy / "config.json").write_text(json.dumps(record))
    (copy / "checkpoints" / "step-000003" / "manifest.json").unlink()
    result = invoke("run", "--resume", str(copy), "--steps", "4")
    assert result.exit_code == 0, result.output
    assert ("qpeft: checkpoint step-000003 has no manifest.json (written by an older qpeft); loaded without "
            "verification") in result.stderr and "damaged" not in result.stderr
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]
    assert json.loads((copy / "config.json").read_text())["qpeft_version"] == "0.0.9"


class OtherRank:
    """``distributed.current()`` for process ``rank`` of two, its collectives kept local."""

    def __new__(cls, rank):
        from qpeft.core.train import distributed

        class Local(distributed.World):
            def _reduce(self, value, op):
                return float(value)

            def broadcast(self, tensors):
                pass

            def average_grads(self, params):
                pass

            def barrier(self):
                pass
        return Local(rank, 2)


@pytest.mark.parametrize("rank", [0, 1])
def test_under_data_parallelism_only_rank_0_prints_the_evaluation_lines(tiny_dir, tmp_path, monkeypatch, rank):
    from qpeft.core.train import distributed

    monkeypatch.setattr(distributed, "current", lambda: OtherRank(rank))
    result = invoke(*tiny_run(tiny_dir, tmp_path, "x"))
    assert result.exit_code == 0, result.output
    said = [line.strip() for line in result.stderr.splitlines() if "perplexity" in line or "qpeft:" in line]
    if rank == 0:
        assert [line.split(":")[0] for line in said if "perplexity" in line] == ["before perplexity",
                                                                                 "after perplexity"], said
        assert said[-1].startswith("qpeft: done")
    else:
        assert said == [] and not (tmp_path / "x").exists()    # rank 0 speaks and writes the run


@pytest.mark.parametrize("failing, hint", [
    (1, "there is no checkpoint yet: qpeft run --resume {run} starts it again from step 0"),
    (3, "the run continues from step-000002 with: qpeft run --resume {run}")])
def test_a_full_disk_at_a_metrics_write_names_the_file_and_how_to_continue(tiny_dir, tmp_path, monkeypatch,
                                                                          failing, hint):
    import builtins
    import errno

    from qpeft.core.train import trainer

    appends = []

    class Full:   # a write on a full disk: the OSError names no file
        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, text):
            raise OSError(errno.ENOSPC, "No space left on device")

    def open_(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and mode == "a":
            appends.append(path)
            if len(appends) == failing:
                return Full()
        return builtins.open(path, mode, *a, **k)
    monkeypatch.setattr(trainer, "open", open_, raising=False)
    run = tmp_path / "x"
    line = one_line_error(invoke(*tiny_run(tiny_dir, tmp_path, "x")), after_progress=True)
    assert line == (f"Error: cannot write {run / 'metrics.jsonl'}: No space left on device; free some space; "
                    + hint.format(run=run))
