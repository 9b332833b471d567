"""``qpeft export``: a finished run's adapter (at any rank) or its merged full model."""
import click

from qpeft.core.cli import params

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False),
              help="Directory to write (must not exist, unless --overwrite).")
@click.option("--merge", is_flag=True,
              help="Fold the adapter into the dequantized base and save a full model "
                   "(sharded safetensors + tokenizer) that transformers loads.")
@click.option("--rank", type=params.RANK, default=None,
              help="Export a dynamic-rank adapter (qdylora) at this rank ≤ its trained rank.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default="float32", show_default=True,
              help="Weight dtype of a merged model.")
@click.option("--max-shard-size", default="500MB", show_default=True, help="Shard size of a merged model.")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(run_dir, out_dir, merge, rank, dtype, max_shard_size, overwrite):
    """Export RUN_DIR's adapter (PEFT format) or, with --merge, a merged full model.

    \b
    Examples:
      qpeft export runs/nf4-lora --out lora-adapter
      qpeft export runs/nf4-qdylora --rank 4 --out rank4-adapter
      qpeft export runs/nf4-dora --merge --dtype bfloat16 --out merged-model
    """
    from pathlib import Path

    import torch

    from qpeft.core.errors import QpeftError
    from qpeft.core.pipeline import adapter_meta
    from qpeft.core.rebuild import rebuild
    from qpeft.core.rundir import Staged, refuse_overlap

    out = Path(out_dir)
    refuse_overlap(out, run_dir, "the run directory")
    if out.exists() and not overwrite:
        raise QpeftError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    built = rebuild(run_dir, rank=rank)      # checks --rank and loads before --out is touched
    method = built.composition.method
    with Staged(out) as staged:             # the old --out stays until the new one is written
        if merge:
            merged = method.merge(built.model, getattr(torch, dtype))
            merged.save_pretrained(staged.path, max_shard_size=max_shard_size)
            built.tokenizer.save_pretrained(staged.path)
            done = "merged model written to {} (load it with AutoModelForCausalLM.from_pretrained)"
        else:
            method.save(built.model, staged.path, adapter_meta(built.resolved))
            done = "adapter written to {} (PEFT format; qpeft_adapter.json has the rest)"
        staged.commit()
    click.echo(done.format(out), err=True)
