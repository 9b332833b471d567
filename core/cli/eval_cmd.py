"""``qpeft eval``: evaluate a finished run again — other evaluators, another rank, more data —
or an adapter from another tool (a PEFT directory) over a base model and quantizer."""
import click

from qpeft.core.cli import params
from qpeft.core.cli.run_cmd import SETTINGS

# Flags that choose the base model, quantizer and data: an adapter directory only (a run
# directory is evaluated on its own).
BASE_FLAGS = ["--model", "--quant", "--data", "--validation-data", "--data-format", "--template", "--max-length"]
HELP = {"--model": "the base model: Hugging Face id, directory or .gguf [default: embedded SmolLM2-135M-Instruct]",
        "--quant": "quantizer spec of the base, e.g. nf4, hqq:nbits=2, none [default: nf4]",
        "--data": "data whose validation split is evaluated, split as 'qpeft run' splits it "
                  "[default: bundled edge tasks]",
        "--validation-data": "evaluate on this file instead of a split of --data"}


def _base_options(command):
    helps = {flag: (typ, HELP.get(flag, text)) for flag, typ, text in SETTINGS}
    for flag in reversed(BASE_FLAGS):
        typ, text = helps[flag]
        command = click.option(flag, type=typ, default=None, help=f"adapter directory: {text}")(command)
    return command


@click.command("eval")
@click.argument("directory", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--evaluators", multiple=True,
              help="evaluator specs separated by ';', or the flag repeated [default: the run's own]")
@click.option("--rank", type=params.RANK, help="evaluate a dynamic-rank adapter (qdylora) at this rank ≤ its saved rank")
@click.option("--limit", type=params.COUNT, help="at most N examples per split, 0 for all [default: the run's --eval-limit; 0 for an adapter]")
@click.option("--device", default="auto", show_default=True, callback=params.device, help="cpu, cuda, cuda:1 or auto")
@click.option("--out", type=click.Path(dir_okay=False),
              help="write the results as JSON here [default: DIR/eval-<time>.json for a run, none for an adapter]")
@_base_options
def eval_command(directory, evaluators, rank, limit, device, out, **base):
    """Evaluate DIR: a run directory, or an adapter directory from any tool.

    A run directory (written by 'qpeft run') is rebuilt — its quantized model and saved
    adapter — and evaluated; the results go to DIR/eval-<timestamp>.json (eval-rank<K>.json
    with --rank) and print beside the values in the run's report.

    An adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT, Unsloth,
    axolotl, LLaMA-Factory or 'qpeft export' write it) is loaded over --model quantized with
    --quant (LoRA, rsLoRA, DoRA, IA3) and evaluated on --data (defaults as 'qpeft run').

    \b
    Examples:
      qpeft eval runs/nf4-lora --evaluators "NAME;NAME:key=value"   # names: qpeft list evaluator
      qpeft eval runs/nf4-qdylora --rank 4
      qpeft eval runs/nf4-lora --limit 0
      qpeft eval ./peft-lora --model ./base-model --quant nf4
    """
    from pathlib import Path

    say = lambda line: click.echo(line, err=True)  # noqa: E731
    evaluators = evaluators or None     # the flag not given: ()
    given = {k: v for k, v in base.items() if v is not None}
    if (Path(directory) / "adapter_config.json").is_file() or (given and not (Path(directory) / "config.json").is_file()):
        out_record, path = evaluate_adapter(directory, given, evaluators, rank, limit, device, out, say)
        click.echo(table(out_record["results"], {}))
        click.echo(f"\nwritten: {path}" if path else "\n(pass --out FILE to keep the results as JSON)")
        return
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"{flags}: only for an adapter directory; {directory} is a run directory, "
                               f"evaluated on its own model, quantizer and data")
    out_record, path = evaluate_run(directory, evaluators, rank, limit, device, say=say, out=out)
    click.echo(table(out_record["results"], out_record.get("report_after", {})))
    click.echo(f"\nwritten: {path}")


def evaluate_run(run_dir, evaluators=None, rank=None, limit=None, device="auto", say=print, out=None):
    """Rebuild, evaluate, write the JSON (to ``out`` if given); returns ``(record, path)``."""
    import datetime
    import json
    from pathlib import Path

    from qpeft.core import distributed, pipeline, rebuild
    from qpeft.core.run_record import PluginRecord, RunRecord

    record = RunRecord.read(run_dir)
    cfg = record.settings(run_dir)
    if evaluators:
        from qpeft.core.spec import join_list

        cfg.evaluators = join_list(evaluators)
    if limit is not None:
        cfg.eval_limit = limit
    cfg.init_adapter = None             # the run's own saved adapter is evaluated
    plan = pipeline.plan(cfg, record)   # checks the evaluator specs before the model loads
    device = distributed.device_for(device)
    say(f"qpeft: rebuilding {Path(run_dir).name} ({record.quantizer.name} × {record.adapter_spec}) on {device}")
    built = rebuild.rebuild(run_dir, device, rank, record, plan)
    report = _read_json(Path(run_dir) / "report.json")
    ctx = pipeline.eval_context(built.cfg, built.model, built.tokenizer, device, plan.validation,
                                plan.test)(stage="after", facts=dict(report.get("facts") or {}))
    results = pipeline.evaluate(plan.evaluators, ctx, say)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_record = {"run": record.run, "evaluated_at": stamp, "rank": rank, "eval_limit": cfg.eval_limit,
                  "evaluators": [PluginRecord.of(e).to_dict() for e in plan.evaluators], "results": results,
                  "report_after": report.get("after", {})}
    path = Path(out) if out else Path(run_dir) / (f"eval-rank{rank}.json" if rank is not None else f"eval-{stamp}.json")
    path.write_text(json.dumps(out_record, indent=2, default=str))
    return out_record, path


def evaluate_adapter(directory, settings: dict, evaluators=None, rank=None, limit=None, device="auto",
                     out=None, say=print):
    """Evaluate an adapter directory over ``settings`` (``model``, ``quant``, ``data``… as
    ``qpeft run`` takes them); writes the JSON to ``out`` if given. Returns ``(record, path)``."""
    import datetime
    import json
    from pathlib import Path

    from qpeft.core import config, distributed, models, pipeline, rebuild
    from qpeft.core.run_record import PluginRecord

    flags = {**settings, "init_adapter": str(directory), "evaluators": evaluators, "eval_limit": limit}
    cfg = config.build(None, {k: v for k, v in flags.items() if v is not None})
    plan = pipeline.plan(cfg)           # reads the adapter directory, evaluators and data first
    device = distributed.device_for(device)
    model = cfg.model or models.EMBEDDED
    say(f"qpeft: loading {Path(directory).name} ({_short(cfg.adapter)}) over {model} × {cfg.quant} on {device}")
    built = rebuild.onto_base(cfg, plan, device, rank)
    ctx = pipeline.eval_context(cfg, built.model, built.tokenizer, device, plan.validation,
                                plan.test)(stage="after", facts={})
    results = pipeline.evaluate(plan.evaluators, ctx, say)
    record = {"adapter": str(directory), "adapter_spec": cfg.adapter, "model": model,
              "quantizer": PluginRecord.of(plan.quantizer).to_dict(), "rank": rank, "eval_limit": cfg.eval_limit,
              "evaluated_at": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
              "evaluators": [PluginRecord.of(e).to_dict() for e in plan.evaluators], "results": results}
    if out:
        Path(out).write_text(json.dumps(record, indent=2, default=str))
    return record, (Path(out) if out else None)


def _short(spec: str, width: int = 100) -> str:
    return spec if len(spec) <= width else spec[:width - 3] + "..."


def _read_json(path) -> dict:
    import json

    return json.loads(path.read_text()) if path.is_file() else {}


def table(results: dict, reported: dict) -> str:
    """``evaluator  metric  value  in report`` — numbers only; texts stay in the JSON. Without
    ``reported`` (an adapter directory has no report) the last column is left out."""
    rows = [("evaluator", "metric", "value", "in report")]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if isinstance(value, (int, float)) or metric == "error":
                before = reported.get(name, {}).get(metric, "")
                rows.append((name, metric, _fmt(value), _fmt(before)))
    if not reported:
        rows = [r[:3] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def _fmt(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
