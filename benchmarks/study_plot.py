"""One figure of a quantizer × init grid: perplexity before/after and accuracy after, grouped by init.

    python benchmarks/study_plot.py RUNS_DIR OUT.png [--title TEXT]

RUNS_DIR is a ``qpeft compare --output-dir`` (its comparison.json and each cell's report.json).
Left: perplexity after training per adapter, one bar per quantizer (log scale), the untrained
quantized base as a tick; right: exact-match accuracy after training, the same bars. The
figure of docs/study.md's init study.
"""
import argparse
import json
from pathlib import Path


def cells(runs: Path) -> list[dict]:
    """``{quant, adapter, ppl_before, ppl_after, acc_after}`` per finished cell, grid order."""
    table = json.loads((runs / "comparison.json").read_text())
    out = []
    for row in table["rows"]:
        if row["status"] != "ok":
            continue
        out.append({"quant": row["quant"], "adapter": row["adapter"],
                    "ppl_before": row.get("perplexity:perplexity:before"),
                    "ppl_after": row.get("perplexity:perplexity:after"),
                    "acc_after": row.get("accuracy:accuracy:after")})
    return out


def plot(rows: list[dict], out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    quants = list(dict.fromkeys(r["quant"] for r in rows))
    adapters = list(dict.fromkeys(r["adapter"] for r in rows))
    width = 0.8 / len(quants)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for i, quant in enumerate(quants):
        mine = {r["adapter"]: r for r in rows if r["quant"] == quant}
        xs = [a + (i - (len(quants) - 1) / 2) * width for a in range(len(adapters))]
        ppl = [mine[a]["ppl_after"] if a in mine else float("nan") for a in adapters]
        acc = [mine[a]["acc_after"] if a in mine else float("nan") for a in adapters]
        bars = left.bar(xs, ppl, width, label=quant)
        before = [mine[a]["ppl_before"] if a in mine else float("nan") for a in adapters]
        left.scatter(xs, before, marker="_", s=120, color=bars.patches[0].get_facecolor(), zorder=3)
        right.bar(xs, acc, width, label=quant)
    for ax, label in ((left, "perplexity after (log; ticks: before training)"), (right, "accuracy after")):
        ax.set_xticks(range(len(adapters)))
        ax.set_xticklabels(adapters, rotation=30, ha="right")
        ax.set_ylabel(label)
        ax.grid(axis="y", alpha=0.3)
    left.set_yscale("log")
    right.legend(fontsize=8, ncol=len(quants), loc="upper center", bbox_to_anchor=(0.5, -0.28))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("--title", default="quantizer × LoRA init, 40 steps, SmolLM2-135M-Instruct")
    a = ap.parse_args()
    plot(cells(a.runs), a.out, a.title)
    print(a.out)


if __name__ == "__main__":
    main()
