"""The run report: ``report.json`` for machines, ``report.md`` for people, ``loss.png``.

Before/after evaluation side by side, trainable parameters and %, adapter size,
quantized model size, peak memory, runtime and throughput.
"""
import dataclasses
import json
from pathlib import Path


def brief(metrics: dict) -> str:
    """``loss=2.31 pass_rate=0.5`` for progress lines (numbers only, few of them)."""
    shown = [k for k, v in metrics.items() if isinstance(v, (int, float)) and "/" not in k
             and not (k.endswith("_n") and k[:-2] in metrics)][:4]
    if "error" in metrics:
        return f"error: {metrics['error']}"
    return " ".join(f"{k}={with_count(metrics, k)}" for k in shown)


def build(record, before: dict, after: dict, facts: dict, result, encode_stats, evaluators=(),
          adapter_facts: dict | None = None) -> dict:
    """Everything a comparison needs about one run (``record``: its RunRecord;
    ``higher_is_better`` per evaluator is kept so that ``qpeft compare`` ranks any metric)."""
    recorded = record.to_dict()
    return {
        "run": record.run,
        "quantizer": recorded["quantizer"], "adapter": recorded["adapter"],
        "quant_spec": record.config.get("quant") or recorded["quantizer"]["name"],   # as typed: hqq:nbits=4
        "model": record.base_model,
        "qpeft_version": record.qpeft_version,
        "before": before, "after": after, "facts": facts,
        "training": {"steps": result.steps, "final_loss": result.final_loss,
                     "seconds": round(result.seconds, 2), "tokens": result.tokens,
                     "examples": dataclasses.asdict(encode_stats)},
        "higher_is_better": {e.name: dict(e.higher_is_better) for e in evaluators},
        "adapter_facts": adapter_facts or {},     # the method's report_facts (AdaLoRA: final ranks)
    }


def write(run_dir: Path, report: dict, history: list) -> None:
    """report.json, report.md and loss.png under ``run_dir``."""
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (run_dir / "report.md").write_text(markdown(report))
    loss_plot(history, run_dir / "loss.png", title=f"{title(report)}")


def title(report: dict) -> str:
    """``hqq:nbits=2 × lora+rslora``: the specs as the run was given them (options kept)."""
    return f"{report.get('quant_spec') or report['quantizer']['name']} × {report['adapter']['spec']}"


def markdown(report: dict) -> str:
    """The human-readable report."""
    lines = [f"# qpeft run: {title(report)}", "",
             f"Model: {report['model']} · qpeft {report['qpeft_version']}", "",
             "| evaluator | metric | before | after |", "|---|---|---|---|"]
    for name, after in report["after"].items():
        before = report["before"].get(name, {})
        for metric, value in after.items():
            if metric.endswith("_n") and metric[:-2] in after:
                continue                 # shown beside its rate
            lines.append(f"| {name} | {metric} | {with_count(before, metric)} | {with_count(after, metric)} |")
    t = report["training"]
    lines += ["", "## Training", "",
              f"- steps: {t['steps']}, final loss (mean of the last logging window): {_fmt(t['final_loss'])}, "
              f"tokens: {t['tokens']}, "
              f"time: {t['seconds']} s",
              f"- examples kept/truncated/dropped: {t['examples']['kept']}/"
              f"{t['examples']['truncated']}/{t['examples']['dropped']}", "", "## Footprint", ""]
    lines += [f"- {k}: {_fmt(v)}" for k, v in report["facts"].items()]
    shown = {k: v for k, v in report.get("adapter_facts", {}).items() if isinstance(v, (int, float, str))}
    if shown:
        lines += ["", "## Adapter", "", *(f"- {k}: {_fmt(v)}" for k, v in shown.items()),
                  *(["- per layer: report.json"] if len(shown) < len(report["adapter_facts"]) else [])]
    lines += ["", "![loss](loss.png)", ""]
    return "\n".join(lines)


def _fmt(value) -> str:
    if isinstance(value, dict):                 # stage_seconds: "load 5.04 · before 0.05 · …"
        return " · ".join(f"{k} {_fmt(v)}" for k, v in value.items())
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def with_count(metrics: dict, metric: str) -> str:
    """A rate beside its count, ``0.5 (1/2)``, where the evaluator reports the number of cases
    as ``<metric>_n`` (a pass rate over 2 cases is not read like an accuracy over 160)."""
    value, n = metrics.get(metric, ""), metrics.get(f"{metric}_n")
    if isinstance(value, float) and isinstance(n, int) and not isinstance(n, bool) and n > 0 and 0 <= value <= 1:
        return f"{_fmt(value)} ({round(value * n)}/{n})"
    return _fmt(value)


def loss_plot(history: list, path: Path, title: str = "") -> None:
    """Training loss (each step faintly, window means, EMA) and validation loss against step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    styles = {"loss": ("one step", {"alpha": 0.25, "linestyle": "none", "marker": "."}),
              "loss_mean": ("training (window mean)", {"marker": "."}),
              "loss_ema": ("training (EMA)", {"linestyle": "--"}),
              "eval_loss": ("validation", {"marker": "o"})}
    for key, (label, style) in styles.items():
        points = [(r["step"], r[key]) for r in history if key in r]
        if points:
            ax.plot(*zip(*points), label=label, **style)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
