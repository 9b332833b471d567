"""``qpeft run``: one command from a model to an evaluated, saved adapter."""
import click

from qpeft.core.settings import config as run_config
from qpeft.core.settings.flags import FLAGS, REPEATABLE, SETTINGS, given, options as _options  # noqa: F401


@click.command("run")
@click.argument("run_dir", required=False)
@_options
def run_command(run_dir, config_file, **flags):
    """Quantize a model, attach an adapter, train, evaluate before and after, save.

    \b
    Examples:
      qpeft run                                    # embedded model, nf4 + lora, bundled data
      qpeft run --quant nf4 --adapter dora
      qpeft run --quant hqq:nbits=2 --adapter lora+rslora --data train.jsonl
      qpeft run --adapter "lora:targets=q_proj,v_proj" --evaluators "EVAL;EVAL:key=a,b"
      qpeft run --init-adapter ./my-peft-lora --quant nf4   # continue another tool's adapter
      qpeft run --resume runs/nf4-lora             # continue after an interruption
    """
    from qpeft.core.run import pipeline
    from qpeft.core.base.errors import OptionsError

    base = None
    if run_dir is not None:
        if not flags.get("resume"):
            raise click.UsageError("RUN_DIR is only taken with --resume; use --name to name a new run")
        from qpeft.core.run.record import RunRecord

        base = RunRecord.read(run_dir).flags(run_dir)
    cfg = run_config.build(config_file, given(flags), base)
    problem = run_config.device_problem(cfg.device)   # a resumed run's saved --device, too
    if problem:
        raise OptionsError(problem)
    pipeline.run(cfg, say=lambda line: click.echo(line, err=True))
