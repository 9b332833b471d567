"""``qpeft eval``: evaluate a finished run again — other evaluators, another rank, more data —
or an adapter from another tool (a PEFT directory) over a base model and quantizer."""
import re

import click

from qpeft.core.cli import params
from qpeft.core.cli.run_cmd import SETTINGS
from qpeft.core.base.errors import QpeftError
from qpeft.core.run.report import with_count

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
@click.option("--task", default=None,
              help="evaluate a multi-task adapter (mtlora) as this one task, on that task's examples only")
@click.option("--limit", type=params.COUNT, help="at most N examples per split, 0 for all [default: the run's --eval-limit; 0 for an adapter]")
@click.option("--device", default="auto", show_default=True, callback=params.device, help="cpu, cuda, cuda:1 or auto")
@click.option("--out", type=click.Path(dir_okay=False),
              help="write the results as JSON here (inside a run or adapter directory only as "
                   "eval-NAME.json) [default: DIR/eval-<time>.json for a run, none for an adapter]")
@click.option("--overwrite", is_flag=True, help="replace the --out file if it exists")
@click.option("--no-adapter", is_flag=True,
              help="score the quantized base alone (the run's model and quantizer, no adapter attached); "
                   "a run's results go to DIR/eval-base-<time>.json beside the report's 'before'")
@_base_options
def eval_command(directory, evaluators, rank, limit, device, out, overwrite, no_adapter, task=None, **base):
    """Evaluate DIR: a run directory, or an adapter directory from any tool.

    A run directory (written by 'qpeft run') is rebuilt — its quantized model and saved
    adapter — and evaluated; the results go to DIR/eval-<timestamp>.json (eval-rank<K>.json
    with --rank) and print beside the values in the run's report. With --no-adapter the
    quantized base is evaluated instead (DIR/eval-base-<timestamp>.json, beside the report's
    "before").

    An adapter directory (adapter_config.json + adapter_model.safetensors, as PEFT, Unsloth,
    axolotl, LLaMA-Factory or 'qpeft export' write it) is loaded over --model quantized with
    --quant (LoRA, rsLoRA, DoRA, IA3) and evaluated on --data (defaults as 'qpeft run').

    \b
    Examples:
      qpeft eval runs/nf4-lora --evaluators "NAME;NAME:key=value"   # names: qpeft list evaluator
      qpeft eval runs/nf4-qdylora --rank 4
      qpeft eval runs/nf4-mtlora --task alert       # one task's adapter, on its examples
      qpeft eval runs/nf4-lora --limit 0
      qpeft eval runs/nf4-lora --no-adapter          # the quantized base, as the run's "before"
      qpeft eval ./peft-lora --model ./base-model --quant nf4
    """
    from pathlib import Path

    say = lambda line: click.echo(line, err=True)  # noqa: E731
    evaluators = evaluators or None     # the flag not given: ()
    given = {k: v for k, v in base.items() if v is not None}
    if (Path(directory) / "adapter_config.json").is_file() or (given and not (Path(directory) / "config.json").is_file()):
        if task is not None:
            raise QpeftError("--task evaluates a run of a multi-task adapter (mtlora); an adapter directory has "
                             "one task already: drop --task")
        out_record, path = evaluate_adapter(directory, given, evaluators, rank, limit, device, out, say,
                                            overwrite=overwrite, no_adapter=no_adapter)
        click.echo(table(out_record["results"], {}))
        if answers(out_record["results"]):
            click.echo("\n" + answers(out_record["results"]))
        click.echo(f"\nwritten: {path}" if path else "\n(pass --out FILE to keep the results as JSON)")
        return
    if task is not None and no_adapter:
        raise QpeftError("--task selects a task of the adapter; --no-adapter has none; drop one of them")
    if given:
        flags = ", ".join("--" + k.replace("_", "-") for k in given)
        raise click.UsageError(f"{flags}: only for an adapter directory; {directory} is a run directory, "
                               f"evaluated on its own model, quantizer and data")
    out_record, path = evaluate_run(directory, evaluators, rank, limit, device, say=say, out=out,
                                    overwrite=overwrite, no_adapter=no_adapter, task=task)
    reported = out_record.get("report_before" if no_adapter else "report_after", {})
    click.echo(table(out_record["results"], reported))
    if answers(out_record["results"]):
        click.echo("\n" + answers(out_record["results"]))
    click.echo(f"\nwritten: {path}")


def evaluate_run(run_dir, evaluators=None, rank=None, limit=None, device="auto", say=print, out=None,
                 overwrite=False, no_adapter=False, task=None):
    """Rebuild, evaluate, write the JSON (to ``out`` if given: see :func:`check_out`);
    returns ``(record, path)``. ``no_adapter``: the quantized base alone, evaluated as the
    run's "before" stage, written as eval-base-<time>.json. ``task``: the adapter's one task
    (``select_task``), evaluated on that task's examples only."""
    import datetime
    from pathlib import Path

    from qpeft.core.train import distributed
    from qpeft.core.run import pipeline, rebuild
    from qpeft.core.run.record import PluginRecord, RunRecord

    check_out(out, run_dir, overwrite)
    if no_adapter and rank is not None:
        raise QpeftError("--rank selects a rank of the adapter; --no-adapter has none; drop one of them")
    record = RunRecord.read(run_dir)
    report = _read_json(Path(run_dir) / "report.json", f"finish the run again with: qpeft run --resume {run_dir}")
    cfg = record.settings(run_dir)
    if evaluators:
        from qpeft.core.base.spec import join_list

        cfg.evaluators = join_list(evaluators)
    if limit is not None:
        cfg.eval_limit = limit
    cfg.init_adapter = None             # the run's own saved adapter is evaluated
    plan = pipeline.plan(cfg, record)   # checks the evaluator specs before the model loads
    if task is not None:
        plan.validation, plan.test = ([e for e in split if e.task == task] for split in (plan.validation, plan.test))
        if not plan.validation and not plan.test:
            raise QpeftError(f"no evaluation example of {Path(run_dir).name} has task '{task}'; "
                             f"tasks: {', '.join(sorted({e.task for e in plan.test if e.task})) or 'none'}")
    device = distributed.device_for(device)
    what = "no adapter" if no_adapter else record.adapter_spec
    say(f"qpeft: rebuilding {Path(run_dir).name} ({record.quantizer.name} × {what}) on {device}")
    built = rebuild.rebuild(run_dir, device, rank, record, plan, no_adapter=no_adapter, task=task)
    stage = "before" if no_adapter else "after"
    plugins = [] if no_adapter else [plan.quantizer, *plan.adapter.parts, *plan.evaluators]
    ctx = pipeline.eval_context(built.cfg, built.model, built.tokenizer, device, plan.validation,
                                plan.test, plugins)(stage=stage, facts=dict(report.get("facts") or {}))
    results = pipeline.evaluate(plan.evaluators, ctx, say)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    out_record = {"run": record.run, "evaluated_at": stamp, "rank": rank, "task": task, "eval_limit": cfg.eval_limit,
                  "adapter": not no_adapter,
                  "evaluators": [PluginRecord.of(e).to_dict() for e in plan.evaluators], "results": results,
                  f"report_{stage}": report.get(stage, {})}
    safe = re.sub(r"[^\w.-]", "_", task or "")
    name = (f"eval-base-{stamp}.json" if no_adapter else f"eval-rank{rank}.json" if rank is not None
            else f"eval-task-{safe}-{stamp}.json" if task is not None else f"eval-{stamp}.json")
    path = Path(out) if out else Path(run_dir) / name
    write_json(path, out_record)
    return out_record, path


def evaluate_adapter(directory, settings: dict, evaluators=None, rank=None, limit=None, device="auto",
                     out=None, say=print, overwrite=False, no_adapter=False):
    """Evaluate an adapter directory over ``settings`` (``model``, ``quant``, ``data``… as
    ``qpeft run`` takes them), or with ``no_adapter`` the quantized base alone; writes the
    JSON to ``out`` if given. Returns ``(record, path)``."""
    import datetime
    from pathlib import Path

    from qpeft.core.settings import config
    from qpeft.core.train import distributed
    from qpeft.core.model import models
    from qpeft.core.interop import peft_files
    from qpeft.core.run import pipeline, rebuild
    from qpeft.core.run.record import PluginRecord

    check_out(out, directory, overwrite)
    flags = {**settings, "init_adapter": str(directory), "evaluators": evaluators, "eval_limit": limit}
    cfg = config.build(None, {k: v for k, v in flags.items() if v is not None})
    plan = pipeline.plan(cfg)           # reads the adapter directory, evaluators and data first
    peft_files.check_fits(Path(directory), cfg.model, plan.init.base_model)   # shapes against the base's config
    device = distributed.device_for(device)
    model = cfg.model or models.EMBEDDED
    if no_adapter:
        say(f"qpeft: loading {model} × {cfg.quant} on {device}, without {Path(directory).name}")
    else:
        say(f"qpeft: loading {Path(directory).name} ({_short(cfg.adapter)}) over {model} × {cfg.quant} on {device}")
    built = rebuild.onto_base(cfg, plan, device, rank, no_adapter=no_adapter)
    plugins = [] if no_adapter else [plan.quantizer, *plan.adapter.parts, *plan.evaluators]
    ctx = pipeline.eval_context(cfg, built.model, built.tokenizer, device, plan.validation,
                                plan.test, plugins)(stage="before" if no_adapter else "after", facts={})
    results = pipeline.evaluate(plan.evaluators, ctx, say)
    record = {"adapter": str(directory), "adapter_attached": not no_adapter, "adapter_spec": cfg.adapter,
              "model": model,
              "quantizer": PluginRecord.of(plan.quantizer).to_dict(), "rank": rank, "eval_limit": cfg.eval_limit,
              "evaluated_at": datetime.datetime.now().strftime("%Y%m%d-%H%M%S"),
              "evaluators": [PluginRecord.of(e).to_dict() for e in plan.evaluators], "results": results}
    if out:
        write_json(Path(out), record)
    return record, (Path(out) if out else None)


def _short(spec: str, width: int = 100) -> str:
    return spec if len(spec) <= width else spec[:width - 3] + "..."


def _read_json(path, fix: str) -> dict:
    """The JSON mapping in ``path`` ({} when there is none), or one line naming it and ``fix``."""
    import json

    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError, OSError) as exc:
        raise QpeftError(f"{path} is damaged ({str(exc).splitlines()[0][:120]}); {fix}") from None
    if not isinstance(data, dict):
        raise QpeftError(f"{path} is damaged (it holds no JSON object); {fix}")
    return data


# An evaluation's own file name in a run directory: eval-<time>.json, eval-rank<K>.json,
# eval-base-<time>.json (--no-adapter), or any eval-NAME.json given as --out.
EVAL_FILE = re.compile(r"eval-[^/\\]*\.json")
RUN_FILES = ("adapter", "checkpoints", "report.json", "eval_before.json", "metrics.jsonl")


def check_out(out, directory, overwrite: bool) -> None:
    """``--out`` may not write inside a run or adapter directory (``directory``, or any
    directory above ``out`` that is one) except as its own ``eval-NAME.json``, nor replace
    an existing file without ``overwrite``; checked before anything loads."""
    from pathlib import Path

    if out is None:
        return
    target = Path(out).resolve()
    if target.is_dir():
        raise QpeftError(f"--out {out} is a directory; pass a file name such as --out eval.json")
    for above in target.parents:
        if above.resolve() == Path(directory).resolve() or _is_run_or_adapter(above):
            if above != target.parent or not EVAL_FILE.fullmatch(target.name):
                raise QpeftError(f"--out {out} lies inside the run or adapter directory {above}, whose files "
                                 f"qpeft reads; write elsewhere, or there as eval-NAME.json")
            break
    if target.exists() and not overwrite:
        raise QpeftError(f"--out {out} exists; pass --overwrite to replace it, or choose another --out")


def _is_run_or_adapter(path) -> bool:
    """Whether ``path`` holds a qpeft run (config.json beside what a run writes) or an adapter."""
    if (path / "adapter_config.json").is_file() or (path / "qpeft_adapter.json").is_file():
        return True
    return (path / "config.json").is_file() and any((path / name).exists() for name in RUN_FILES)


def write_json(path, data: dict) -> None:
    """``data`` as JSON at ``path``, atomically (a temporary file beside it, fsynced, renamed
    over it): a failed write leaves the old file, or none; a full disk is one line."""
    import contextlib
    import json
    import os

    from qpeft.core.base.rundir import disk_error

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(data, indent=2, default=str))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise disk_error(exc, str(path)) from None


def table(results: dict, reported: dict) -> str:
    """``evaluator  metric  value  in report`` — numbers only; texts stay in the JSON. Without
    ``reported`` (an adapter directory has no report) the last column is left out."""
    rows = [("evaluator", "metric", "value", "in report")]
    for name, metrics in results.items():
        for metric, value in metrics.items():
            if metric.endswith("_n") and metric[:-2] in metrics:
                continue                 # shown beside its rate
            if isinstance(value, (int, float)) or metric == "error":
                rows.append((name, metric, with_count(metrics, metric), with_count(reported.get(name, {}), metric)))
    if not reported:
        rows = [r[:3] for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows)


def answers(results: dict, first: int = 10, width: int = 110) -> str:
    """The text an evaluator reported (a generation-based one's answers: ``output/NAME``), the
    ``first`` of each evaluator, one line each and cut to ``width``; "" when there are none."""
    lines = []
    for name, metrics in results.items():
        texts = [(m, v) for m, v in metrics.items() if isinstance(v, str) and m != "error"]
        for metric, text in texts[:first]:
            text = " ".join(text.split())
            lines.append(f"  {name}  {metric}: {text if len(text) <= width else text[:width] + '…'}")
        if len(texts) > first:
            lines.append(f"  {name}: {len(texts) - first} more in the JSON")
    return "answers\n" + "\n".join(lines) if lines else ""
