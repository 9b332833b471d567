"""``qpeft compare``: a quantizer × adapter grid, one process per cell, tables, plots, edge score."""
import click

# Set per cell by compare itself; refused among the pass-through run flags.
CELL_OWNED = ("quant", "adapter", "name", "output_dir", "resume", "overwrite", "run_dir")


@click.command("compare", context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.option("--quant", default="none,nf4,hqq", show_default=True, help="comma-separated quantizer specs")
@click.option("--adapter", default="lora,lora+rslora,dora", show_default=True, help="comma-separated adapter specs")
@click.option("--model", help="model for every cell [default: embedded SmolLM2-135M-Instruct]")
@click.option("--data", type=click.Path(dir_okay=False), help="training data for every cell [default: bundled]")
@click.option("--output-dir", default="runs/compare", show_default=True, type=click.Path(file_okay=False),
              help="where the cells' run directories and the comparison go")
@click.option("--memory-budget", help="flag rows whose peak memory exceeds this, e.g. 8GB or 6000MiB")
@click.option("--edge-quality", default="perplexity", show_default=True,
              type=click.Choice(["perplexity", "accuracy", "mmlu", "prompts"]), help="quality term of the edge score")
@click.option("--edge-weights", help="weights of quality,memory,disk,time [default: quality=0.4,memory=0.2,disk=0.2,time=0.2]")
@click.option("--export-quant", metavar="SPEC",
              help="after each cell, merge its adapter and re-quantize with this quantizer spec; adds "
                   "columns: perplexity trained vs merged vs shipped (as qpeft export --merge --quant)")
@click.pass_context
def compare_command(ctx, quant, adapter, model, data, output_dir, memory_budget, edge_quality, edge_weights,
                    export_quant):
    """Run every QUANT × ADAPTER combination and compare them.

    Any other 'qpeft run' flag (--steps, --eval-limit, --evaluators, --lr, ...) is passed
    to every cell. Every spec and flag is checked before the first cell starts. Each cell
    runs in its own process; a cell failing at run time is recorded with its error and
    the grid goes on. Rerunning skips cells that have a report.json.

    \b
    Examples:
      qpeft compare --quant none,nf4,hqq --adapter lora,lora+rslora,dora --steps 50
      qpeft compare --quant nf4,hqq:nbits=2 --adapter lora,dora --memory-budget 8GB
      qpeft compare --evaluators perplexity,mmlu,prompts,footprint --edge-quality mmlu
      qpeft compare --quant nf4,hqq --adapter lora,dora --export-quant nf4
    """
    from qpeft.core import compare
    from qpeft.core.spec import split_list

    from qpeft.core import models

    flags = run_flags(list(ctx.args))
    models.check(model)                 # once, not in every cell
    for flag, value in (("--model", model), ("--data", data)):
        if value:
            flags += [flag, value]
    compare.compare(split_list(quant), split_list(adapter), output_dir, flags, memory_budget,
                    edge_quality, edge_weights, model, say=lambda line: click.echo(line, err=True),
                    export_quant=export_quant)


def run_flags(args: list) -> list:
    """The pass-through flags, checked by ``qpeft run``'s own parser and settings (types,
    ranges, --device) before any cell starts."""
    from qpeft.core import config as run_config
    from qpeft.core.cli.run_cmd import run_command

    parsed = run_command.make_context("qpeft run", list(args), resilient_parsing=False).params
    owned = [k for k in CELL_OWNED if parsed.get(k) is not None]
    if owned:
        flag = owned[0].replace("_", "-")
        raise click.UsageError(f"compare sets {'RUN_DIR' if flag == 'run-dir' else '--' + flag} for "
                               "each cell; use --quant/--adapter lists and --output-dir of compare")
    file = parsed.pop("config_file", None)
    run_config.build(file, {k: v for k, v in parsed.items() if v is not None and k != "run_dir"})
    return args
