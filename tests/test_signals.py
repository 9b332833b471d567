"""Real processes: SIGINT/SIGTERM checkpoint and exit 130/143; one process per run directory."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(tiny_dir, out, name, *extra):
    cmd = [sys.executable, "-m", "qpeft", "run", "--model", str(tiny_dir), "--quant",
           "none:compute_dtype=float32", "--adapter", "lora:r=4", "--evaluators", "perplexity",
           "--eval-limit", "2", "--batch-size", "2", "--log-every", "1", "--save-every", "1000",
           "--output-dir", str(out), "--name", name, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_steps(metrics: Path, proc, n: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        time.sleep(0.1)
    proc.kill()
    pytest.fail("the run never reached its first steps")


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_finishes_the_step_checkpoints_and_says_how_to_resume(tiny_dir, tmp_path, sig, code):
    run = tmp_path / "r"
    proc = start(tiny_dir, tmp_path, "r", "--steps", "400")
    wait_for_steps(run / "metrics.jsonl", proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"qpeft: {sig.name}: stopped at step ") and f"qpeft run --resume {run}" in last
    step = int(last.split("stopped at step ")[1].split("/")[0])
    assert (run / "checkpoints" / f"step-{step:06d}" / "COMPLETE").is_file()
    assert "Traceback" not in err
    resumed = subprocess.run([sys.executable, "-m", "qpeft", "run", "--resume", str(run), "--steps", str(step + 2)],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, step + 3))


def test_a_second_process_on_the_same_run_gets_one_line_naming_the_holder(tiny_dir, tmp_path):
    first = start(tiny_dir, tmp_path, "r", "--steps", "400")
    try:
        wait_for_steps(tmp_path / "r" / "metrics.jsonl", first, 1)
        second = subprocess.run([sys.executable, "-m", "qpeft", "run", "--model", str(tiny_dir),
                                 "--output-dir", str(tmp_path), "--name", "r", "--overwrite"],
                                env=ENV, capture_output=True, text=True, timeout=120)
        assert second.returncode == 2
        assert second.stderr.strip().splitlines() == [
            f"Error: {tmp_path / 'r'} is in use by process {first.pid}; wait for it to finish or stop it, "
            "or pick another --name"]
        assert first.poll() is None                       # the holder was not disturbed
    finally:
        first.kill()
        first.communicate()


def test_the_lock_is_released_when_its_holder_dies(tmp_path):
    from qpeft.core.base.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qpeft.core.base.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}, 'r').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from qpeft.core.base.errors import QpeftError

    with pytest.raises(QpeftError, match=f"in use by process {holder.pid}"):
        RunLock(tmp_path, "r").acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path, "r"):
        assert (tmp_path / ".r.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".r.lock").exists()


def signal_at_the_final_evaluation(monkeypatch, sig):
    """``sig`` arrives while the evaluators run after training (the adapter is saved by then)."""
    from qpeft.core.run import evaluation

    real = evaluation.evaluate

    def evaluate(evaluators, ctx, say):
        if ctx.stage == "after":
            os.kill(os.getpid(), sig)
            time.sleep(5)                       # the signal's handler acts during the sleep
        return real(evaluators, ctx, say)
    monkeypatch.setattr(evaluation, "evaluate", evaluate)


def run_args(tiny_dir, out, name, *extra):
    return ["run", "--model", str(tiny_dir), "--quant", "none:compute_dtype=float32", "--adapter", "lora:r=4",
            "--evaluators", "perplexity", "--eval-limit", "2", "--steps", "3", "--batch-size", "2",
            "--log-every", "1", "--output-dir", str(out), "--name", name, *extra]


@pytest.mark.parametrize("sig, code, save_every", [(signal.SIGINT, 130, "2"), (signal.SIGTERM, 143, "0")])
def test_a_signal_during_the_final_evaluation_says_how_to_finish(tiny_dir, tmp_path, monkeypatch, sig, code,
                                                                 save_every):
    from click.testing import CliRunner

    from qpeft.core.cli.main import cli

    run = tmp_path / "r"
    with monkeypatch.context() as patched:
        signal_at_the_final_evaluation(patched, sig)
        result = CliRunner().invoke(cli, run_args(tiny_dir, tmp_path, "r", "--save-every", save_every))
    assert result.exit_code == code, result.output
    last = result.stderr.strip().splitlines()[-1]
    assert last == (f"qpeft: {sig.name}: stopped after training finished (step 3/3), before the report was "
                    f"written, with a checkpoint (step-000003); finish with: qpeft run --resume {run} (it does "
                    "not train again: it saves the adapter, evaluates and reports)"), result.stderr[-2000:]
    assert (run / "checkpoints" / "step-000003" / "COMPLETE").is_file()    # written on the way out with 0
    assert not (run / "report.json").exists() and not (tmp_path / ".r.lock").exists()
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()
    resumed = CliRunner().invoke(cli, ["run", "--resume", str(run)])
    assert resumed.exit_code == 0, resumed.output
    assert "restarting" not in resumed.stderr and "after perplexity" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]                                               # not trained again
    report = json.loads((run / "report.json").read_text())
    assert report["training"]["steps"] == 3 and report["training"]["final_loss"] > 0   # the last step's loss
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter


def test_a_signal_in_the_final_evaluation_without_a_checkpoint_points_to_eval(tiny_dir, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from qpeft.core.train import trainer
    from qpeft.core.train.checkpoint import CheckpointError
    from qpeft.core.cli.main import cli

    def full(self):
        raise CheckpointError(f"cannot write checkpoint step-000003 under {run / 'checkpoints'}: No space left "
                              "on device; free space there, or pass --save-every 0 to train without checkpoints")
    run = tmp_path / "r"
    monkeypatch.setattr(trainer.Trainer, "save_checkpoint", full)
    signal_at_the_final_evaluation(monkeypatch, signal.SIGINT)
    result = CliRunner().invoke(cli, run_args(tiny_dir, tmp_path, "r", "--save-every", "0"))
    assert result.exit_code == 130, result.output
    assert result.stderr.strip().splitlines()[-1] == (
        f"qpeft: SIGINT: stopped after training finished (step 3/3), before the report was written; the adapter "
        f"is saved in {run / 'adapter'} but no checkpoint could be written (cannot write checkpoint step-000003 "
        f"under {run / 'checkpoints'}: No space left on device), so qpeft run --resume would train again from "
        f"step 0; evaluate the adapter with: qpeft eval {run}")
    monkeypatch.undo()
    evaluated = CliRunner().invoke(cli, ["eval", str(run)])               # the hint works
    assert evaluated.exit_code == 0 and "after perplexity" in evaluated.stderr, evaluated.output
