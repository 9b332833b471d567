"""MTLoRA against LoRA of the same trainable size on the bundled edge tasks: per-task accuracy.

    python benchmarks/mtlora_vs_lora.py [--steps 40] [--quant nf4] [--eval-limit 0] [--out runs/bench-mtlora]

Two ``qpeft run``s on the embedded model, each step seeing 10 training examples:

- ``mtlora:r=6:task_r=2`` with ``--task-sampling per-task --batch-size 2`` (a mini-batch of 2
  from each of the 5 tasks; loss Σ_t L_t, Agiza et al. 2024, Algorithm 2): 6 + 5·2 = 16 ranks;
- ``lora:r=16`` with ``--batch-size 10`` (mixed batches): 16 ranks, the same trainable size.

Prints accuracy before and after, overall and per task, on the 160 held-out test examples
(or the first --eval-limit of them; docs/adapters.md has the numbers). One run each: not a quality claim.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

RUNS = {"mtlora": ["--adapter", "mtlora:r=6:task_r=2", "--task-sampling", "per-task", "--batch-size", "2"],
        "lora": ["--adapter", "lora:r=16", "--batch-size", "10"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quant", default="nf4")
    ap.add_argument("--eval-limit", default="0", help="test examples evaluated (0: all 160)")
    ap.add_argument("--out", default="runs/bench-mtlora")
    a = ap.parse_args()
    reports = {}
    for name, flags in RUNS.items():
        cmd = [sys.executable, "-m", "qpeft", "run", "--quant", a.quant, *flags, "--steps", str(a.steps),
               "--evaluators", "accuracy", "--eval-limit", a.eval_limit, "--save-every", "0", "--eval-every", "0", "--log-every", "5",
               "--output-dir", a.out, "--name", name, "--overwrite"]
        subprocess.run(cmd, check=True)
        reports[name] = json.loads((Path(a.out) / name / "report.json").read_text())
    tasks = sorted(k.split("/", 1)[1] for k in reports["lora"]["after"]["accuracy"] if k.startswith("accuracy/"))
    print("| | before | " + " | ".join(f"after {n}" for n in reports) + " |")
    print("|---|---|" + "---|" * len(reports))
    for metric in ["accuracy", *(f"accuracy/{t}" for t in tasks)]:
        before = reports["lora"]["before"]["accuracy"][metric]
        print(f"| {metric} | {before} | " + " | ".join(str(r["after"]["accuracy"][metric]) for r in reports.values()) + " |")
    for name, r in reports.items():
        t = r["training"]
        print(f"{name}: final loss {t['final_loss']:.4g}, {t['seconds']} s training, {t['tokens']} tokens, "
              f"adapter {r['facts'].get('adapter_disk_mb')} MB")


if __name__ == "__main__":
    main()
