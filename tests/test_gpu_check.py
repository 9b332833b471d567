"""benchmarks/gpu_check.sh, the script run the first time a GPU is lent (issue 20 item 6), run
end to end on CPU at a tiny size (``--device cpu``): every stage passes, the tables are printed,
and a failing stage makes the script exit non-zero.

Slow (about three minutes here: some twenty qpeft processes on a 2-layer model); it is the only test
of the script's logic before it meets a GPU.
"""
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
RUNS = ("nf4-lora", "nf4-dora", "nf4-lora-paged8", "nf4-lora-eva", "nf4-adalora", "nf4icq-lora-iec",
        "nf4-mtlora", "nf4-lora-corda", "ddp1-nf4-lora", "none-lora", "big-nf4-lora", "hqq-lora", "int8-lora")


def check(tmp: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    environ = {**os.environ, "PY": sys.executable, "OUT": str(tmp / "out"), "WORK": str(tmp / "work"),
               "BUDGET": "900", **env}
    return subprocess.run(["bash", str(SCRIPT), *args], env=environ, capture_output=True, text=True, timeout=1200)


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gpu_check")
    return tmp, check(tmp, "--device", "cpu")


def test_every_stage_passes_on_cpu_and_the_tables_are_printed(checked):
    tmp, done = checked
    assert done.returncode == 0, done.stdout[-3000:]
    assert "STAGE FAILED" not in done.stdout and "SKIPPED" not in done.stdout
    summary = (tmp / "out" / "summary.md").read_text()
    for run in RUNS:
        row = next(line for line in summary.splitlines() if line.startswith(f"| {run} |"))
        assert "no report.json" not in row and row.split("|")[2].strip() == "2", row   # 2 steps each
    for stage in ("install", "export-nf4", "export-nf4-gptq", "export-gguf", "train-step", "train-step-big", "ddp-1"):
        assert f"| {stage} | " in summary and f"| {stage} | " in done.stdout
    assert (tmp / "work" / "exp-nf4-lora-q8_0.gguf").stat().st_size > 0
    with tarfile.open(tmp / "out" / "results.tgz") as tgz:
        names = tgz.getnames()
    assert "runs/ddp1-nf4-lora/report.json" in names and "ts-small.json" in names


def test_a_failing_stage_makes_it_exit_non_zero(checked):
    tmp, _ = checked        # the installed qpeft and the model of the full run are reused
    done = check(tmp, "--device", "cpu", ONLY="train-step", TS_ROWS="no-such-row")
    assert done.returncode == 1
    assert "=== STAGE FAILED train-step (rc 2)" in done.stdout and "FAILED: train-step" in done.stdout


def test_an_unknown_argument_is_one_line_and_status_2(tmp_path):
    done = check(tmp_path, "--gpu")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "gpu_check.sh: unknown argument '--gpu'; use --device cuda (default) or --device cpu"]
