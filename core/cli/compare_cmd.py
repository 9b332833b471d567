"""``qpeft compare``: a quantizer × adapter grid, one process per cell, tables, plots, edge score."""
import click

from qpeft.core.settings import config as run_config

# Set per cell by compare itself; refused among the pass-through run flags.
CELL_OWNED = ("quant", "adapter", "name", "output_dir", "resume", "overwrite", "run_dir")
LIST_HELP = "specs separated by ';', or the flag repeated (commas belong to option values)"


@click.command("compare", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--quant", multiple=True, help=f"quantizer {LIST_HELP} [default: {run_config.DEFAULT_GRID['quant']}]")
@click.option("--adapter", multiple=True, help=f"adapter {LIST_HELP} [default: {run_config.DEFAULT_GRID['adapter']}]")
@click.option("--model", help="model for every cell [default: embedded SmolLM2-135M-Instruct]")
@click.option("--data", type=click.Path(dir_okay=False), help="training data for every cell [default: bundled]")
@click.option("--output-dir", default="runs/compare", show_default=True, type=click.Path(file_okay=False),
              help="where the cells' run directories and the comparison go")
@click.option("--memory-budget", help="flag rows whose peak memory exceeds this, e.g. 8GB or 6000MiB")
@click.option("--edge-quality", metavar="EVALUATOR[:METRIC]",
              help="quality term of the edge score: a metric with a direction in the evaluator's "
                   "higher_is_better; EVALUATOR alone: its primary metric [default: the first of "
                   "--evaluators that has one]")
@click.option("--edge-weights", help="weights of quality,memory,disk,time [default: quality=0.4,memory=0.2,disk=0.2,time=0.2]")
@click.option("--export-quant", metavar="SPEC",
              help="after each cell, merge its adapter and re-quantize with this quantizer spec; adds "
                   "columns: the edge quality's metric trained vs merged vs shipped (as qpeft export --merge --quant)")
@click.option("--sort", metavar="EVALUATOR[:METRIC]",
              help="order of comparison.md's rows, best first [default: the edge score]")
@click.option("--overwrite", is_flag=True,
              help="run again the cells of --output-dir whose recorded settings differ from this grid's "
                   "[default: stop, naming the first difference]")
@click.pass_context
def compare_command(ctx, quant, adapter, model, data, output_dir, memory_budget, edge_quality, edge_weights,
                    export_quant, overwrite, sort):
    """Run every QUANT × ADAPTER combination and compare them.

    Any other 'qpeft run' flag (--steps, --eval-limit, --evaluators, --lr, --config ...) is
    passed to every cell; a --config file may hold the quant and adapter lists. Every spec
    and flag is checked before the first cell starts. Each cell runs in its own process; a
    cell failing at run time is recorded with its error and the grid goes on. Rerunning
    skips the cells finished with the same settings (their run record says so), resumes the
    ones stopped before their report, and stops — naming the setting — at a cell run with
    other settings, unless --overwrite. Columns are the metrics the evaluators report.
    Cells skip the validation loss during training (--eval-every 0: the perplexity after
    training measures the same split) unless --eval-every is given.

    \b
    Examples:
      qpeft compare --quant "none;nf4;hqq" --adapter "lora;lora+rslora;dora" --steps 50
      qpeft compare --quant nf4 --quant hqq:nbits=2 --adapter lora --memory-budget 8GB
      qpeft compare --adapter "lora:targets=q_proj,v_proj;dora" --edge-quality EVALUATOR:METRIC
      qpeft compare --quant "nf4;hqq" --adapter "lora;dora" --export-quant nf4
    """
    from qpeft.core.compare import table as compare
    from qpeft.core.model import models
    from qpeft.core.base.spec import split_list

    args = list(ctx.args)
    file = _config_file(args)
    from_file = run_config.read_file(file) if file else {}
    grid = {key: _specs(key, given or from_file.get(key) or run_config.DEFAULT_GRID[key])
            for key, given in (("quant", quant), ("adapter", adapter))}
    cfg = first_cell_settings(args, grid["quant"][0], grid["adapter"][0], output_dir)
    models.check(model)                 # once, not in every cell
    flags = list(args)
    for flag, value in (("--model", model), ("--data", data)):
        if value:
            flags += [flag, value]
    compare.compare(grid["quant"], grid["adapter"], output_dir, flags, memory_budget,
                    edge_quality, edge_weights, model, say=lambda line: click.echo(line, err=True),
                    export_quant=export_quant, evaluators=split_list(cfg.evaluators), overwrite=overwrite,
                    sort=sort)


def _specs(key: str, value) -> list[str]:
    """The list of specs of ``--quant``/``--adapter`` (flags, a file's list or the default)."""
    from qpeft.core.base.errors import OptionsError
    from qpeft.core.base.spec import split_list

    try:
        return split_list(value)
    except OptionsError as exc:
        raise OptionsError(f"--{key}: {exc}") from None


def _config_file(args: list) -> str | None:
    from qpeft.core.cli.run_cmd import run_command

    return run_command.make_context("qpeft run", list(args), resilient_parsing=True).params.get("config_file")


def first_cell_settings(args: list, quant: str, adapter: str, output_dir: str):
    """The settings the first cell runs with, from the pass-through flags checked by ``qpeft
    run``'s own parser and settings (types, ranges, --device) before any cell starts."""
    from pathlib import Path

    from qpeft.core.compare.grid import Cell, cell_settings, run_flags

    owned = [k for k in CELL_OWNED if k in run_flags(args)]
    if owned:
        flag = owned[0].replace("_", "-")
        raise click.UsageError(f"compare sets {'RUN_DIR' if flag == 'run-dir' else '--' + flag} for "
                               "each cell; use --quant/--adapter lists and --output-dir of compare")
    return cell_settings(Cell(quant, adapter), Path(output_dir), args)
