"""qpeft's training step at two revisions, in one invocation: did a change slow it down?

    python benchmarks/revision_step.py --old REV [--rows none-lora,nf4-lora,nf4-dora] [--rounds 3]
                                       [--steps 3] [--warmup 1] [--json out.json]

REV (a commit, tag or branch of this repository) is checked out into a temporary worktree and
made importable as ``qpeft`` by a throwaway virtual environment that reuses this one's packages
(torch, transformers, …) but not its editable install of qpeft. Each row runs
``train_step.py --child ROW qpeft`` — each revision's own copy of the harness, so its import
paths match — once per round for each revision, in a fresh process, the order alternating per
row and round. Printed: median seconds per step and train peak RSS of each revision, and the
ratio HEAD ÷ REV (above 1: HEAD is slower or larger). Same machine, same batch (8 × 128), same
model; say which CPU a figure came from (the header line names it).
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def old_checkout(rev: str, work: Path) -> tuple[str, Path]:
    """A worktree of ``rev`` and a python that imports qpeft from it."""
    tree = work / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-f", str(tree), rev],
                   check=True, capture_output=True)
    package = work / "pkg" / "qpeft"            # the pyproject's package-dir mapping, as links
    package.mkdir(parents=True)
    for item in (tree / "qpeft").iterdir():
        (package / item.name).symlink_to(item)
    (package / "core").symlink_to(tree / "core", target_is_directory=True)
    (package / "plugins").symlink_to(tree / "plugins", target_is_directory=True)
    venv = work / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    (site / "zz_qpeft_old.pth").write_text(f"{package.parent}\n{sysconfig.get_path('purelib')}\n")
    return str(venv / "bin" / "python"), tree


def child(python: str, harness: Path, row: str, a) -> dict:
    args = [python, str(harness), "--child", row, "qpeft", "--model", a.model, "--device", "cpu"]
    for k in ("steps", "warmup"):
        args += [f"--{k}", str(getattr(a, k))]
    out = subprocess.run(args, capture_output=True, text=True, cwd=tempfile.gettempdir())
    if out.returncode:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        return {"error": (lines or [f"exit status {out.returncode}"])[-1][:200]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="the revision to compare HEAD's working tree with")
    ap.add_argument("--rows", default="none-lora,nf4-lora,nf4-dora")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--model", help="default: the embedded model, converted")
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.model is None:
        from qpeft.core.model import models

        a.model = models.resolve(None)
    work = Path(tempfile.mkdtemp(prefix="qpeft-revision-"))
    try:
        python, tree = old_checkout(a.old, work)
        tools = {"HEAD": (sys.executable, ROOT / "benchmarks" / "train_step.py"),
                 a.old: (python, tree / "benchmarks" / "train_step.py")}
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
              f"HEAD (working tree) against {a.old}", flush=True)
        rows = [r for r in a.rows.split(",") if r]
        runs = {(row, name): [] for row in rows for name in tools}
        for rnd in range(a.rounds):
            for i, row in enumerate(rows):
                order = list(tools) if (rnd + i) % 2 == 0 else list(tools)[::-1]
                for name in order:
                    result = child(*tools[name], row, a)
                    runs[row, name].append(result)
                    shown = result.get("error") or f"{result['step_s']:.2f} s/step, peak {result['train_peak'] / 1e9:.2f} GB"
                    print(f"round {rnd + 1} {row} {name}: {shown}", flush=True)
        print(f"\n| row | HEAD s/step | {a.old} s/step | HEAD ÷ {a.old} time | HEAD ÷ {a.old} peak RSS |")
        print("|---|---|---|---|---|")
        table = []
        for row in rows:
            med = {}
            for name in tools:
                ok = [r for r in runs[row, name] if "error" not in r]
                med[name] = (statistics.median(r["step_s"] for r in ok) if ok else float("nan"),
                             statistics.median(r["train_peak"] for r in ok) / 1e9 if ok else float("nan"))
            head, old = med["HEAD"], med[a.old]
            table.append({"row": row, "head": head, "old": old})
            print(f"| {row} | {head[0]:.2f} | {old[0]:.2f} | {head[0] / old[0]:.2f} | {head[1] / old[1]:.2f} |")
        if a.json:
            Path(a.json).write_text(json.dumps({"runs": {f"{r}|{n}": v for (r, n), v in runs.items()},
                                                "table": table, "old": a.old}, indent=2))
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(work / "tree")],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
