"""Reading a comparison: rows sorted, a summary naming the winners, and the noise of each metric.

A grid of 20 cells is unreadable as a table alone (issue 24). The comparison therefore opens
with a paragraph: the best cell by edge score and the best within the memory budget, the
best cell per compared metric (after training), the least peak memory and the fastest.
Each metric carries its uncertainty where the evaluator reports the size of its sample as
``<metric>_n`` (accuracy over n answers, a pass rate over n cases, perplexity over n tokens):

- a rate p over n cases has the binomial standard error ``se = √(p(1−p)/n)``; two cells
  whose rates differ by less than ``2·√(se₁² + se₂²)`` are marked "not separable";
- any other metric shows its n (for perplexity, the tokens it was measured on): 8
  validation examples of 28 answer tokens cannot tell cells apart that differ by one answer.
"""
import math

from qpeft.core.compare.metrics import heading


def count_key(key: str) -> str:
    """``ev:metric:stage`` → ``ev:metric_n:stage``: the key of its sample size."""
    evaluator, metric, stage = key.rsplit(":", 2)
    return f"{evaluator}:{metric}_n:{stage}"


def is_count(key: str, keys) -> bool:
    """Whether ``key`` is the sample size of another key among ``keys``."""
    evaluator, metric, stage = key.rsplit(":", 2)
    return metric.endswith("_n") and f"{evaluator}:{metric[:-2]}:{stage}" in keys


def sort_rows(rows: list, key: str, higher: bool) -> list:
    """Finished rows with a value of ``key`` best first; the rest after, in grid order."""
    valued = [r for r in rows if isinstance(r.get(key), (int, float))]
    rest = [r for r in rows if not isinstance(r.get(key), (int, float))]
    return sorted(valued, key=lambda r: -r[key] if higher else r[key]) + rest


def standard_error(row: dict, key: str) -> float | None:
    """Binomial standard error of a rate in [0, 1] with its ``_n``; None otherwise."""
    value, n = row.get(key), row.get(count_key(key))
    if not isinstance(value, (int, float)) or not isinstance(n, int) or n <= 0 or not 0 <= value <= 1:
        return None
    return math.sqrt(max(value * (1 - value), 1 / n) / n)   # ≥ 1/n: a rate of 0 or 1 is not exact


def separable(a: dict, b: dict, key: str) -> bool | None:
    """Whether two rows' rates differ by more than twice the standard error of the difference."""
    se_a, se_b = standard_error(a, key), standard_error(b, key)
    if se_a is None or se_b is None:
        return None
    return abs(a[key] - b[key]) > 2 * math.hypot(se_a, se_b)


def name(row: dict) -> str:
    return f"{row['quant']} × {row['adapter']}"


def value_text(row: dict, key: str) -> str:
    """``0.925 (37/40, ±0.042)`` for a rate, ``3.05 (230 n)`` with another count, else the value."""
    value, n = row[key], row.get(count_key(key))
    shown = f"{value:.4g}" if isinstance(value, float) else str(value)
    se = standard_error(row, key)
    if se is not None:
        return f"{shown} ({round(value * n)}/{n}, ±{se:.2g})"
    return f"{shown} (n = {n})" if isinstance(n, int) else shown


def summary(rows: list, meta: dict, directions: dict) -> list[str]:
    """The opening paragraph's lines (see the module doc); ``directions``: {metric key: higher}."""
    done = [r for r in rows if r["status"] == "ok"]
    if not done:
        return ["**Summary.** No combination finished; see the failures below."]
    lines = []
    scored = sort_rows(done, "edge_score", True)
    if scored and scored[0].get("edge_score") is not None:
        budget = meta.get("memory_budget_mb")
        where = f" within the memory budget ({budget:.0f} MiB)" if budget is not None else ""
        lines.append(f"- Best edge score{where}: **{name(scored[0])}** ({scored[0]['edge_score']:.3g}).")
    elif meta.get("memory_budget_mb") is not None:
        lines.append(f"- No finished combination fits the memory budget ({meta['memory_budget_mb']:.0f} MiB).")
    for key, higher in directions.items():
        if not key.endswith(":after"):
            continue
        ranked = sort_rows(done, key, higher)
        if not ranked or not isinstance(ranked[0].get(key), (int, float)):
            continue
        best = ranked[0]
        text = f"- {heading(*key.rsplit(':', 2))}: **{name(best)}** {value_text(best, key)}"
        close = [r for r in ranked[1:] if isinstance(r.get(key), (int, float)) and separable(best, r, key) is False]
        if close:
            text += "; not separable from " + ", ".join(f"{name(r)} {value_text(r, key)}" for r in close)
        elif isinstance(best.get(count_key(key)), int) and standard_error(best, key) is None:
            text += " — compare the sample size before reading a small difference"
        lines.append(text + ".")
    for key, label in (("peak_memory_mb", "least peak memory"), ("train_seconds", "fastest training")):
        ranked = sort_rows(done, key, False)
        if ranked and ranked[0].get(key) is not None:
            lines.append(f"- {label.capitalize()}: {name(ranked[0])} ({ranked[0][key]:.4g}"
                         f"{' MiB' if key == 'peak_memory_mb' else ' s'}).")
    return ["**Summary.**", "", *lines]
