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
    from qpeft.core.rundir import RunLock

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from qpeft.core.rundir import RunLock; "
                               f"RunLock({str(tmp_path)!r}, 'r').acquire(); print('held', flush=True); "
                               "time.sleep(60)"], env=ENV, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    from qpeft.core.errors import QpeftError

    with pytest.raises(QpeftError, match=f"in use by process {holder.pid}"):
        RunLock(tmp_path, "r").acquire()
    holder.kill()
    holder.wait()
    with RunLock(tmp_path, "r"):
        assert (tmp_path / ".r.lock").read_text() == str(os.getpid())
    assert not (tmp_path / ".r.lock").exists()
