"""A ``qpeft run`` killed with SIGKILL after a checkpoint, resumed, beside the same run never
stopped: what a method's training state must survive (tests/test_adalora.py, test_mtlora.py)."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def start(out: Path, name: str, flags: list) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qpeft", "run", *flags, "--output-dir", str(out), "--name", name]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed_and_straight(out: Path, flags: list, kill_after_step: int, timeout: float = 240) -> tuple[dict, dict]:
    """Run ``straight`` and ``killed`` side by side; SIGKILL ``killed`` once its checkpoint of
    ``kill_after_step`` is complete, resume it, and return both saved adapters' tensors."""
    from safetensors.torch import load_file

    straight, killed = start(out, "straight", flags), start(out, "killed", flags)
    complete = out / "killed" / "checkpoints" / f"step-{kill_after_step:06d}" / "COMPLETE"
    deadline = time.monotonic() + timeout
    while not complete.is_file():
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[1][-2000:]
        time.sleep(0.05)
    killed.send_signal(signal.SIGKILL)
    killed.communicate()
    assert straight.wait(timeout=300) == 0, straight.communicate()[1][-2000:]
    resumed = subprocess.run([sys.executable, "-m", "qpeft", "run", "--resume", str(out / "killed")],
                             env=ENV, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    return tuple(load_file(str(out / run / "adapter" / "adapter_model.safetensors")) for run in ("straight", "killed"))
