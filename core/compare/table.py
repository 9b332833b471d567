"""Comparing quantizer × adapter combinations: run a grid, tabulate it, score it for the edge.

    --quant "none;nf4" × --adapter "lora;dora" ─▶ one `qpeft run` PROCESS per cell
        (core/compare/grid.py: a crash or OOM costs one cell; a cell whose run record holds
         this grid's settings is skipped when it has its report.json and resumed when it has
         not; one with other settings stops the grid unless --overwrite)
    ─▶ rows from each run's report.json ─▶ edge score ─▶ comparison.{md,csv,json} + plots

Columns come from what the evaluators report: every metric an evaluator declares in
``higher_is_better`` (``<evaluator>:<metric>:<stage>``, for the stages it declares), beside
the run's own facts (disk, peak memory, time). No evaluator is known here by name.

Edge score (docs/evaluators.md): a weighted geometric mean of four ratios to the best
row of the grid, each in (0, 1] (1 = the best row in that respect)::

    E = Q^wq · M^wm · D^wd · T^wt        wq + wm + wd + wt = 1 (default .4 .2 .2 .2)
    Q = best / value  for a lower-is-better quality metric (--edge-quality EVALUATOR:METRIC),
        value / best  for a higher-is-better one (the evaluator's higher_is_better says which)
    M = least peak memory / peak memory
    D = least disk / disk                disk = quantized model MB + adapter MB on disk
    T = least train seconds / train seconds

Only finished rows within the memory budget are scored and taken as references; a row
over the budget is flagged and gets no score.

With ``--export-quant SPEC`` each finished cell is also merged and re-quantized with SPEC
(:mod:`qpeft.core.compare.requant`, kept as ``<cell>/export-<SPEC>.json``), adding the columns of
:data:`EXPORT_COLUMNS`: what the merge for shipping costs.
"""
import csv
import io
import json
import math
import re
from pathlib import Path

from qpeft.core.compare import metrics as compare_metrics, summary as compare_summary
from qpeft.core.compare.grid import Cell, cell_modes, grid, grid_defaults, run_grid, spec_errors
from qpeft.core.base.errors import QpeftError

WEIGHTS = {"quality": 0.4, "memory": 0.2, "disk": 0.2, "time": 0.2}
HEAD = {"quant": "quantizer", "adapter": "adapter", "status": "status"}   # then the metrics
COSTS = {  # row key → heading, from the run's facts
    "disk_mb": "disk MB", "peak_memory_mb": "peak memory MB", "memory_kind": "memory",
    "train_seconds": "train s", "tokens_per_s": "tokens/s", "within_budget": "within budget",
    "edge_score": "edge score",
}
EXPORT_COLUMNS = {  # only with --export-quant; measured by the edge quality's metric
    "export_trained": "export: trained (adapter on quantized base)", "export_merged": "export: merged",
    "export_shipped": "export: shipped (merged + re-quantized)", "export_gap_pct": "shipped vs trained %",
    "export_calibrated": "export: calibrated (GPTQ re-quantization)", "export_calibrated_gap_pct": "calibrated vs trained %",
}


def parse_memory(text: str | None) -> float | None:
    """``"8GB"`` → MiB. GB/MB are decimal (10⁹, 10⁶ bytes), GiB/MiB binary; a bare number is MiB."""
    if text in (None, ""):
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]i?[bB]?)?\s*", str(text))
    if not m:
        raise QpeftError(f"cannot read memory budget '{text}'; write e.g. 8GB, 8GiB or 6000MB")
    number, unit = float(m.group(1)), (m.group(2) or "MiB").upper().rstrip("B")
    power = "KMGT".index(unit[0]) + 1
    size = number * (1024 ** power if unit.endswith("I") else 1000 ** power)
    return size / 2**20


def row(cell: Cell, error: str | None, run_dir: Path, reg) -> dict:
    """One table row from a run's report.json (or the cell's error): the cell, the metrics
    its evaluators declare (:mod:`qpeft.core.compare.metrics`) and the run's facts."""
    out = {**dict.fromkeys(HEAD), **dict.fromkeys(COSTS), "error": error or ""}
    out.update(quant=cell.quant, adapter=cell.adapter, status="ok" if error is None else "failed")
    report_file = run_dir / "report.json"
    if error is not None or not report_file.is_file():
        out["status"], out["error"] = "failed", error or "no report.json"
        return out
    report = json.loads(report_file.read_text())
    facts = report.get("facts") or {}
    out.update(compare_metrics.metrics(report, reg))
    model, adapter = facts.get("quantized_model_mb"), facts.get("adapter_disk_mb")
    out.update(disk_mb=None if model is None or adapter is None else round(model + adapter, 3),
               train_seconds=facts.get("train_seconds"), tokens_per_s=facts.get("tokens_per_s"))
    gpu = facts.get("peak_gpu_reserved_mb")
    out["peak_memory_mb"], out["memory_kind"] = (gpu, "gpu reserved") if gpu is not None else (facts.get("peak_rss_mb"), "rss")
    return out


def parse_weights(text: str | None) -> dict:
    """``"quality=0.5,memory=0.5"`` → weights (missing ones 0), normalised to sum 1."""
    if not text:
        return dict(WEIGHTS)
    out = {k: 0.0 for k in WEIGHTS}
    for pair in text.split(","):
        key, _, value = pair.partition("=")
        if key.strip() not in WEIGHTS:
            raise QpeftError(f"unknown edge weight '{key.strip()}'; use {', '.join(WEIGHTS)}, "
                             "e.g. --edge-weights quality=0.4,memory=0.2,disk=0.2,time=0.2")
        try:
            out[key.strip()] = float(value)
        except ValueError:
            raise QpeftError(f"edge weight '{key.strip()}' must be a number, got '{value}'") from None
    total = sum(out.values())
    if total <= 0 or min(out.values()) < 0:
        raise QpeftError("edge weights must be ≥ 0 with a positive sum, e.g. quality=1,memory=1")
    return {k: v / total for k, v in out.items()}


def edge_inputs(r: dict, quality_key: str) -> dict | None:
    """The four raw quantities of a row, or None when one is missing."""
    values = {"quality": r.get(quality_key), "memory": r["peak_memory_mb"], "disk": r["disk_mb"],
              "time": r["train_seconds"]}
    return None if any(v is None for v in values.values()) else values


def edge_scores(rows: list, quality_key: str, higher: bool, weights: dict | None = None,
                budget_mb: float | None = None) -> None:
    """Set ``within_budget`` and ``edge_score`` on each row, in place (see the module doc);
    the quality is the row's ``quality_key``, better when ``higher`` (else when lower)."""
    weights = weights or dict(WEIGHTS)
    for r in rows:
        r["within_budget"] = None if budget_mb is None or r["peak_memory_mb"] is None else r["peak_memory_mb"] <= budget_mb
    scored = [(r, v) for r in rows if r["status"] == "ok" and r["within_budget"] is not False
              and (v := edge_inputs(r, quality_key)) is not None]
    if not scored:
        return
    best = {k: (max if k == "quality" and higher else min)(v[k] for _, v in scored) for k in WEIGHTS}
    for r, v in scored:
        ratios = {k: _ratio(v[k], best[k], higher if k == "quality" else False) for k in WEIGHTS}
        if any(x <= 0 for k, x in ratios.items() if weights[k] > 0):
            r["edge_score"] = 0.0
        else:
            r["edge_score"] = round(math.exp(sum(w * math.log(ratios[k]) for k, w in weights.items() if w > 0)), 4)


def _ratio(value: float, best: float, higher: bool) -> float:
    """value relative to the best row, in (0, 1]; 1 when every row ties at zero."""
    if higher:
        return 1.0 if best == 0 else value / best
    return 1.0 if value == best else (best / value if value > 0 else 0.0)


def columns(rows: list, meta: dict) -> dict:
    """The table's columns: the cell, the metrics the rows hold, the costs, the export
    columns (with --export-quant), the error."""
    fixed = {*HEAD, *COSTS, *EXPORT_COLUMNS, "error", "export_error"}
    keys = {k for r in rows for k in r}
    found = compare_metrics.columns(k for r in rows for k in r if k not in fixed
                                    and not compare_summary.is_count(k, keys))
    extra = EXPORT_COLUMNS if meta.get("export_quant") else {}
    return {**HEAD, **found, **COSTS, **extra, "error": "error"}


def write_tables(rows: list, out_dir: Path, meta: dict, plots: list) -> None:
    """comparison.csv, comparison.json and comparison.md under ``out_dir``, each replaced
    whole (they are rewritten after every cell of a grid)."""
    from qpeft.core.base.durable import replace_text

    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=list(columns(rows, meta)), extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    replace_text(out_dir / "comparison.csv", text.getvalue())
    replace_text(out_dir / "comparison.json", json.dumps({**meta, "columns": columns(rows, meta), "rows": rows}, indent=2))
    replace_text(out_dir / "comparison.md", markdown(rows, meta, plots))


def markdown(rows: list, meta: dict, plots: list) -> str:
    """The comparison for people: the table, the edge-score definition, the plots, failures."""
    heads = columns(rows, meta)
    shown = [k for k in heads if k not in ("error", "memory_kind")
             and (k != "within_budget" or meta.get("memory_budget_mb") is not None)
             and any(r.get(k) is not None for r in rows)]
    order = meta.get("sort_key") or "edge_score"
    progress = (f" ({meta['finished']} of {meta['cells']} finished so far; this table is rewritten after each cell)"
                if meta.get("finished", len(rows)) < meta.get("cells", len(rows)) else "")
    lines = ["# qpeft comparison", "", f"Model: {meta['model']} · grid: {len(rows)} combinations{progress}", "",
             *compare_summary.summary(rows, meta, meta.get("directions") or {}), "",
             f"Rows sorted by {heads.get(order, order)}, best first.", "",
             "| " + " | ".join(heads[k] for k in shown) + " |", "|" + "---|" * len(shown)]
    ranked = compare_summary.sort_rows(rows, order, meta.get("sort_higher", True))
    lines += ["| " + " | ".join(_cell(r.get(k)) for k in shown) + " |" for r in ranked]
    w = meta["edge_weights"]
    lines += ["", f"Peak memory is GPU reserved where a GPU was used, else process RSS "
              f"({', '.join(sorted({r['memory_kind'] for r in rows if r['memory_kind']})) or 'none'}).",
              "", "**Edge score** = Q^{quality:.2f} · M^{memory:.2f} · D^{disk:.2f} · T^{time:.2f}: ".format(**w)
              + f"Q = quality (`{meta['edge_quality']}`: {meta['edge_quality_label']}) relative to the best row, "
              "M, D, T = least peak memory, disk (quantized model MB + adapter MB on disk) and train "
              "seconds over this row's; "
              "1 = best in every respect. Scores compare rows of this grid only."]
    if meta.get("memory_budget_mb") is not None:
        lines.append(f"Memory budget: {meta['memory_budget_mb']:.0f} MiB; rows over it get no edge score.")
    if meta.get("export_quant"):
        lines.append(f"Export columns: each run's adapter merged into its dequantized base and the result "
                     f"re-quantized with `{meta['export_quant']}` (qpeft export --merge --quant); "
                     f"`{meta['edge_quality']}` on the run's validation set, shipped vs trained as a relative gap.")
        lines += [f"Export measurement failed for {r['quant']} × {r['adapter']}: {r['export_error']}"
                  for r in rows if r.get("export_error")]
    lines += [""] + [f"![{p}]({p})" for p in plots]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        lines += ["", "## Failed combinations", ""]
        lines += [f"- {r['quant']} × {r['adapter']}: {r['error'].replace('|', '¦')}" for r in failed]
    return "\n".join(lines) + "\n"


def directions(run_dirs: list, reg) -> dict:
    """``{metric key: higher_is_better}`` over the finished cells' reports."""
    out = {}
    for run_dir in run_dirs:
        report = Path(run_dir) / "report.json"
        if report.is_file():
            out.update(compare_metrics.directions(json.loads(report.read_text()), reg))
    return out


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "¦")


def run_evaluators(flags: list) -> list[str]:
    """The evaluator specs the cells run with: every ``--evaluators`` among ``flags`` (the flag
    may repeat), else the run's default. ``qpeft compare`` passes the resolved ones instead."""
    from qpeft.core.settings.config import DEFAULT_EVALUATORS
    from qpeft.core.base.spec import split_list

    given = [v for flag, v in zip(flags, [*flags[1:], None]) if flag == "--evaluators" and v is not None]
    given += [f.partition("=")[2] for f in flags if f.startswith("--evaluators=")]
    return split_list(given or DEFAULT_EVALUATORS)


def compare(quants: list, adapters: list, output_dir, flags: list, budget: str | None = None,
            quality: str | None = None, weights: str | None = None, model: str | None = None,
            say=print, export_quant: str | None = None, evaluators: list | None = None,
            overwrite: bool = False, sort: str | None = None) -> list:
    """Check every spec, run the grid (resuming), write the tables and plots; returns the rows.

    ``quality`` is ``EVALUATOR[:METRIC]`` (None: the first of ``evaluators`` — the cells'
    evaluator specs, by default read from ``flags`` — with a primary metric)."""
    from qpeft.core.compare import plots as compare_plots
    from qpeft.core.plugin import registry

    reg = registry.default()
    evaluators = run_evaluators(flags) if evaluators is None else list(evaluators)
    edge = compare_metrics.resolve_quality(quality, evaluators, reg)
    order = compare_metrics.resolve_quality(sort, evaluators, reg, flag="--sort") if sort else None
    budget_mb, weight_map = parse_memory(budget), parse_weights(weights)
    output_dir = Path(output_dir)
    flags = [*flags, *grid_defaults(flags)]
    cells = grid(quants, adapters)
    problems = spec_errors(quants, adapters, export_quant)
    if problems:
        raise QpeftError("; ".join(problems) + "; nothing was run: fix or drop the spec"
                         + ("s" if len(problems) > 1 else ""))
    modes = cell_modes(cells, output_dir, flags, overwrite)
    say(f"qpeft: {len(cells)} combinations: " + ", ".join(f"{c.quant} × {c.adapter}" for c in cells))
    exports, finished = {}, {}

    def publish(errors: dict, final: bool) -> list:
        """Rows of the cells finished so far, scored among themselves; the tables rewritten
        (the plots only at the end), so an interrupted grid shows everything done."""
        done = [c for c in cells if c.name in errors]
        rows = [row(c, errors[c.name], output_dir / c.name, reg) for c in done]
        if export_quant:
            for r, c in zip(rows, done):
                r.update(exports.get(c.name) or dict.fromkeys(EXPORT_COLUMNS))
        edge_scores(rows, edge.key, edge.higher, weight_map, budget_mb)
        meta = {"model": model or "SmolLM2-135M-Instruct (embedded)", "quants": quants, "adapters": adapters,
                "evaluators": evaluators, "run_flags": flags, "memory_budget_mb": budget_mb,
                "edge_quality": f"{edge.evaluator}:{edge.metric}", "edge_quality_label": edge.label,
                "edge_quality_key": edge.key, "edge_weights": weight_map, "export_quant": export_quant,
                "sort_key": order.key if order else "edge_score", "sort_higher": order.higher if order else True,
                "directions": directions([output_dir / c.name for c in done], reg),
                "cells": len(cells), "finished": len(done)}
        plots = compare_plots.plot_all(rows, [output_dir / c.name for c in done], output_dir,
                                       edge.key, edge.label, budget_mb) if final else []
        write_tables(rows, output_dir, meta, plots)
        return rows

    def after_cell(cell, error):
        if export_quant and error is None:
            from qpeft.core.compare import requant

            exports[cell.name] = requant.compare_columns(output_dir / cell.name, export_quant,
                                                         f"{edge.evaluator}:{edge.metric}", say)
        finished[cell.name] = error
        if len(finished) < len(cells):
            publish(finished, final=False)
    errors = run_grid(cells, output_dir, flags, say, after_cell, modes)
    rows = publish(errors, final=True)
    say(f"qpeft: compared {len(rows)} combinations; see {output_dir / 'comparison.md'}")
    return rows
