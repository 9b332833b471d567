"""``qpeft eval``: evaluate a finished run again — other evaluators, another rank, more data."""
import click

from qpeft.core.cli import params


@click.command("eval")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option("--evaluators", help="comma-separated evaluator specs [default: the run's own]")
@click.option("--rank", type=params.RANK, help="evaluate a dynamic-rank adapter (qdylora) at this rank ≤ its saved rank")
@click.option("--limit", type=params.COUNT, help="at most N examples per split, 0 for all [default: the run's --eval-limit]")
@click.option("--device", default="auto", show_default=True, callback=params.device, help="cpu, cuda, cuda:1 or auto")
def eval_command(run_dir, evaluators, rank, limit, device):
    """Rebuild RUN_DIR's quantized model and saved adapter, and evaluate it.

    Writes RUN_DIR/eval-<timestamp>.json (eval-rank<K>.json with --rank) and prints a
    table beside the values in the run's report.

    \b
    Examples:
      qpeft eval runs/nf4-lora --evaluators mmlu,prompts
      qpeft eval runs/nf4-qdylora --rank 4
      qpeft eval runs/nf4-lora --evaluators perplexity --limit 0
    """
    out, path = evaluate_run(run_dir, evaluators, rank, limit, device,
                             say=lambda line: click.echo(line, err=True))
    click.echo(table(out["results"], out.get("report_after", {})))
    click.echo(f"\nwritten: {path}")


def evaluate_run(run_dir, evaluators=None, rank=None, limit=None, device="auto", say=print):
    """Rebuild, evaluate, write the JSON; returns ``(record, path)``."""
    import datetime
    import json
    from pathlib import Path

    from qpeft.core import config, distributed, pipeline, rebuild

    resolved = config.read_run(run_dir)
    cfg = rebuild.run_settings(resolved, run_dir)
    if evaluators:
        cfg.evaluators = evaluators
    if limit is not None:
        cfg.eval_limit = limit
    plan = pipeline.plan(cfg)           # checks the evaluator specs before the model loads
    device = distributed.device_for(device)
    say(f"qpeft: rebuilding {Path(run_dir).name} ({resolved['quantizer']['name']} × "
        f"{resolved['adapter']['spec']}) on {device}")
    built = rebuild.rebuild(run_dir, device, rank)
    report = _read_json(Path(run_dir) / "report.json")
    ctx = pipeline.eval_context(built.cfg, built.model, built.tokenizer, device, plan.validation,
                                plan.test)(stage="after", facts=dict(report.get("facts") or {}))
    results = pipeline.evaluate(plan.evaluators, ctx, say)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    record = {"run": resolved["run"], "evaluated_at": stamp, "rank": rank, "eval_limit": cfg.eval_limit,
              "evaluators": [pipeline.plugin_record(e) for e in plan.evaluators], "results": results,
              "report_after": report.get("after", {})}
    path = Path(run_dir) / (f"eval-rank{rank}.json" if rank is not None else f"eval-{stamp}.json")
    path.write_text(json.dumps(record, indent=2, default=str))
    return record, path


def _read_json(path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def table(results: dict, reported: dict) -> str:
    """``evaluator  metric  value  in report`` — numbers only; texts stay in the JSON."""
    rows = [("evaluator", "metric", "value", "in report")]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) or metric == "error":
                before = reported.get(name, {}).get(metric, "")
                rows.append((name, metric, _fmt(value), _fmt(before)))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
