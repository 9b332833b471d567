"""The comparison's plots: quality against peak memory and runtime, loss curves overlaid.

Each point is one finished combination, labelled ``quantizer × adapter``; rows over the
memory budget are drawn hollow, and the budget as a vertical line.
"""
import json
from pathlib import Path

FILES = {"memory": "quality_vs_memory.png", "runtime": "quality_vs_runtime.png", "loss": "loss_curves.png"}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_all(rows: list, run_dirs: list, out_dir: Path, quality_key: str, quality_label: str,
             budget_mb: float | None = None) -> list[str]:
    """Write the three plots under ``out_dir``; returns their file names."""
    out_dir = Path(out_dir)
    quality_vs(rows, "peak_memory_mb", "peak memory (MiB)", quality_key, quality_label,
               out_dir / FILES["memory"], budget_mb)
    quality_vs(rows, "train_seconds", "training time (s)", quality_key, quality_label,
               out_dir / FILES["runtime"])
    loss_curves(rows, run_dirs, out_dir / FILES["loss"])
    return list(FILES.values())


def quality_vs(rows: list, x_key: str, x_label: str, y_key: str, y_label: str, path: Path,
               budget_mb: float | None = None) -> None:
    """A labelled scatter of ``y_key`` against ``x_key`` over the finished rows."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in rows:
        x, y = r.get(x_key), r.get(y_key)
        if r["status"] != "ok" or x is None or y is None:
            continue
        over = r.get("within_budget") is False
        ax.scatter([x], [y], s=40, facecolors="none" if over else "C0", edgecolors="C0")
        ax.annotate(f"{r['quant']} × {r['adapter']}", (x, y), fontsize=7, xytext=(4, 3),
                    textcoords="offset points")
    if budget_mb is not None:
        ax.axvline(budget_mb, color="C3", linestyle="--", label=f"budget {budget_mb:.0f} MiB")
        ax.legend(fontsize=8)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(f"{y_label} vs {x_label}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def read_losses(run_dir: Path) -> list[tuple[int, float]]:
    """``(step, loss)`` from a run's metrics.jsonl (empty if it has none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    points = []
    for line in path.read_text().splitlines():
        record = json.loads(line) if line.strip() else {}
        if "loss" in record and "step" in record:
            points.append((record["step"], record["loss"]))
    return points


def loss_curves(rows: list, run_dirs: list, path: Path) -> None:
    """Training loss against step, one line per finished combination."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r, run_dir in zip(rows, run_dirs):
        points = read_losses(run_dir) if r["status"] == "ok" else []
        if points:
            ax.plot(*zip(*points), marker=".", label=f"{r['quant']} × {r['adapter']}")
    if ax.lines:
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("training loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
