"""The study's grid with its caches off and on: wall, training and non-training time per cell.

    python benchmarks/study_grid.py [--quant "none;nf4;hqq:nbits=2"] [--adapter "lora;dora;ia3"]
                                    [--steps 40] [--eval-limit 48] [--model DIR] [--json out.json]

Each cell is the process ``qpeft compare`` starts for it (``python -m qpeft run --name CELL …``
with compare's cell defaults, core/compare/grid.py), run twice, the two passes interleaved cell by cell so that the machine's
drift falls on both alike:

- **off**: ``--no-cache`` (the quantized base and its "before" numbers computed in every cell),
  with a cache directory of its own;
- **on**: the caches used, starting cold (an empty cache directory): the first cell of each
  quantizer writes the quantized base and its baselines, the others read them.

Both cache directories hold a link to the converted embedded model (``models/``), so neither
pass converts the GGUF. Per cell: wall time of the process, ``train_seconds`` and
``quantize_seconds`` from its report.json; non-training = wall − train. Prints a markdown table
and the totals (docs/study.md has the table of one run, with the machine it ran on).
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY_EVALUATORS = "perplexity;accuracy;mmlu;prompts;footprint"


def cache_with_models(root: Path) -> Path:
    """An empty cache directory whose models/ links to the user's converted models."""
    from qpeft.core.base.cache import cache_dir

    root.mkdir(parents=True)
    models = cache_dir() / "models"
    if models.is_dir():
        (root / "models").symlink_to(models, target_is_directory=True)
    return root


def run_cell(quant: str, adapter: str, name: str, out: Path, cache: Path, flags: list) -> dict:
    env = {**os.environ, "QPEFT_CACHE": str(cache)}
    env.pop("QPEFT_BASELINES", None)
    cmd = [sys.executable, "-m", "qpeft", "run", "--name", name, "--output-dir", str(out),
           "--quant", quant, "--adapter", adapter, *flags]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"cell {name} failed:\n{done.stderr[-2000:]}")
    facts = json.loads((out / name / "report.json").read_text())["facts"]
    train = float(facts.get("train_seconds") or 0.0)
    return {"wall": wall, "train": train, "other": wall - train,
            "quantize": float(facts.get("quantize_seconds") or 0.0),
            "before_cached": facts.get("before_cached") or [], "base_cache": facts.get("base_cache"),
            "stages": facts.get("stage_seconds") or {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="none;nf4;hqq:nbits=2")
    ap.add_argument("--adapter", default="lora;dora;ia3")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--eval-limit", type=int, default=48)
    ap.add_argument("--evaluators", default=STUDY_EVALUATORS)
    ap.add_argument("--model", help="the base model (default: the embedded one)")
    ap.add_argument("--json", help="write every measurement here")
    a = ap.parse_args()
    from qpeft.core.compare.grid import grid, grid_defaults

    cells = grid([q for q in a.quant.split(";") if q], [m for m in a.adapter.split(";") if m])
    flags = ["--steps", str(a.steps), "--eval-limit", str(a.eval_limit), "--evaluators", a.evaluators,
             "--save-every", "0", *(["--model", a.model] if a.model else [])]
    flags += grid_defaults(flags)          # what `qpeft compare` adds to every cell (--eval-every 0)
    work = Path(tempfile.mkdtemp(prefix="qpeft-study-grid-"))
    caches = {"off": cache_with_models(work / "cache-off"), "on": cache_with_models(work / "cache-on")}
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
          f"{len(cells)} cells × 2 passes, {a.steps} steps; work in {work}", flush=True)
    rows = []
    for i, cell in enumerate(cells):
        row = {"cell": cell.name}
        for mode in (("off", "on") if i % 2 == 0 else ("on", "off")):      # alternate who goes first
            extra = ["--no-cache"] if mode == "off" else []
            row[mode] = run_cell(cell.quant, cell.adapter, cell.name, work / f"runs-{mode}", caches[mode],
                                 flags + extra)
            stages = " · ".join(f"{k} {v:.0f}" for k, v in row[mode]["stages"].items())
            print(f"{cell.name} [{mode}]: wall {row[mode]['wall']:.1f} s, train {row[mode]['train']:.1f} s, "
                  f"quantize {row[mode]['quantize']:.1f} s; stages {stages}", flush=True)
        rows.append(row)
    print("\n| cell | wall off | wall on | train off | train on | non-training off | non-training on |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cell']} | {r['off']['wall']:.0f} s | {r['on']['wall']:.0f} s | {r['off']['train']:.0f} s | "
              f"{r['on']['train']:.0f} s | {r['off']['other']:.0f} s | {r['on']['other']:.0f} s |")
    total = {m: {k: sum(r[m][k] for r in rows) for k in ("wall", "train", "other")} for m in ("off", "on")}
    for m in ("off", "on"):
        t = total[m]
        print(f"caches {m}: grid {t['wall'] / 60:.1f} min, training {t['train'] / 60:.1f} min, "
              f"non-training {t['other'] / 60:.1f} min ({100 * t['other'] / t['wall']:.0f} % of wall)")
    print(f"speed-up with the caches: {total['off']['wall'] / total['on']['wall']:.2f}×")
    for m in ("off", "on"):
        stages = {}
        for r in rows:
            for k, v in r[m]["stages"].items():
                stages[k] = stages.get(k, 0.0) + v
        start = total[m]["wall"] - sum(stages.values())
        print(f"caches {m}, where the time went: process start {start:.0f} s · "
              + " · ".join(f"{k} {v:.0f} s" for k, v in stages.items()))
    per_cell = total["on"]["wall"] / len(rows)
    print(f"100 cells at this grid's mean cell time with the caches: {100 * per_cell / 3600:.1f} h")
    if a.json:
        Path(a.json).write_text(json.dumps({"rows": rows, "total": total, "argv": sys.argv}, indent=2))


if __name__ == "__main__":
    main()
