"""``qpeft export``: a finished run's adapter (at any rank), its merged model (optionally
re-quantized, with the quality cost measured), or one merged GGUF file for llama.cpp/Ollama."""
import click

from qpeft.core.cli import params
from qpeft.core.interop.gguf_export import TYPES as GGUF_TYPES

DTYPE_CHOICES = ["float32", "bfloat16", "float16"]


@click.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_path", required=True, type=click.Path(),
              help="Directory to write (must not exist, unless --overwrite); a .gguf file with --format gguf.")
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf"]), default="hf", show_default=True,
              help="hf: the adapter in PEFT's format, or with --merge a transformers model directory; "
                   "gguf: one merged .gguf file that llama.cpp and Ollama load.")
@click.option("--merge", is_flag=True,
              help="Fold the adapter into the dequantized base and save a full model "
                   "(sharded safetensors + tokenizer) that transformers loads.")
@click.option("--quant", "quant_spec",
              help="With --merge: re-quantize the merged model with this quantizer (nf4, hqq:nbits=4, ...) "
                   "and report the quality cost on the run's validation set (export_report.json).")
@click.option("--quality", metavar="EVALUATOR[:METRIC]",
              help="With --quant: the metric that measures the cost, one of the run's evaluators "
                   "[default: the first of them with a primary metric, e.g. perplexity]")
@click.option("--gguf-type", type=click.Choice(list(GGUF_TYPES)), default=None,
              help="Tensor type of a --format gguf file [default: f16]; norms stay f32.")
@click.option("--rank", type=params.RANK, default=None,
              help="Export a dynamic-rank adapter (qdylora) at this rank ≤ its trained rank.")
@click.option("--task", default=None,
              help="Export a multi-task adapter (mtlora) as this one task: a plain PEFT LoRA adapter, or merged.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Weight dtype of a merged model [default: float32].")
@click.option("--max-shard-size", default=None, help="Shard size of a merged model [default: 500MB].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(run_dir, out_path, fmt, merge, quant_spec, quality, gguf_type, rank, dtype, max_shard_size,
                   overwrite, task=None):
    """Export RUN_DIR's adapter (PEFT format), a merged full model, or a merged GGUF file.

    \b
    Examples:
      qpeft export runs/nf4-lora --out lora-adapter
      qpeft export runs/nf4-qdylora --rank 4 --out rank4-adapter
      qpeft export runs/nf4-mtlora --task alert --out alert-adapter   # one task, as PEFT LoRA
      qpeft export runs/nf4-dora --merge --dtype bfloat16 --out merged-model
      qpeft export runs/nf4-lora --merge --quant nf4 --out merged-nf4      # + quality cost
      qpeft export runs/nf4-lora --merge --quant nf4 --quality accuracy --out merged-nf4
      qpeft export runs/nf4-lora --format gguf --gguf-type q8_0 --out model-q8_0.gguf
    """
    from pathlib import Path

    from qpeft.core.base.errors import QpeftError
    from qpeft.core.base.rundir import refuse_overlap

    out = Path(out_path)
    here = Path.cwd().resolve()
    if out.name in ("", ".", "..") or out.resolve() == here or out.resolve() in here.parents:
        raise QpeftError(f"--out {out_path} is the current directory or one above it, which an export would "
                         f"replace; pass a new directory, e.g. --out {Path(run_dir).resolve().name}-export")
    check_combination(fmt, merge, quant_spec, gguf_type, dtype, max_shard_size)
    if task is not None and (quant_spec is not None or fmt == "gguf"):
        raise QpeftError("--task exports one task's adapter or merged model (--format hf); "
                         "drop --quant/--format gguf, or export the task first and convert that")
    if quality is not None and quant_spec is None:
        raise QpeftError("--quality measures a re-quantized export; add --merge --quant SPEC, or drop --quality")
    quantizer = checked = None
    if quant_spec is not None:
        from qpeft.core.compare import requant

        quantizer = requant.check_spec(quant_spec)   # a bad spec is one line, before any load
        checked = requant.validation(run_dir, quality)   # the run's record, evaluator and data, too
    if fmt == "gguf":
        from qpeft.core.interop import gguf_export

        gguf_export.check_out(out)
    refuse_overlap(out, run_dir, "the run directory")
    if out.exists() and not overwrite:
        raise QpeftError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if fmt == "gguf":
        export_gguf(run_dir, out, gguf_type or "f16", rank, say)
    elif quantizer is not None:
        from qpeft.core.compare import requant

        report = requant.export(run_dir, out, quantizer, quant_spec, dtype or "float32", rank,
                                max_shard_size or "500MB", say, quality, checked)
        click.echo(requant.table(report))
        say(f"merged model written to {out}, with {requant.QUANT_FILE} and {requant.REPORT_FILE}; "
            f"load it re-quantized with: qpeft run --model {out} --quant '{quant_spec}'")
    else:
        export_hf(run_dir, out, merge, rank, dtype or "float32", max_shard_size or "500MB", say, task)


def check_combination(fmt, merge, quant_spec, gguf_type, dtype, max_shard_size) -> None:
    """Flags that make no sense together, refused before anything loads."""
    from qpeft.core.base.errors import QpeftError

    if fmt == "gguf":
        for flag, value, why in (("--quant", quant_spec, "a GGUF file is quantized by --gguf-type"),
                                 ("--dtype", dtype, "GGUF tensor types come from --gguf-type"),
                                 ("--max-shard-size", max_shard_size, "a GGUF export is one file")):
            if value is not None:
                raise QpeftError(f"{flag} does not apply to --format gguf ({why}); drop {flag}")
        return
    if gguf_type is not None:
        raise QpeftError("--gguf-type sets the tensor type of a GGUF file; add --format gguf, or drop it")
    if not merge:
        for flag, value in (("--quant", quant_spec), ("--dtype", dtype), ("--max-shard-size", max_shard_size)):
            if value is not None:
                raise QpeftError(f"{flag} applies to a merged model; add --merge (an adapter export "
                                 f"keeps the adapter's own tensors)")


def export_hf(run_dir, out, merge, rank, dtype, max_shard_size, say, task=None) -> None:
    """The adapter in PEFT's format, or the merged model as a transformers directory
    (``task``: a multi-task adapter's one task, through its ``select_task``)."""
    import torch

    from qpeft.core.run.rebuild import rebuild
    from qpeft.core.base.rundir import Staged

    built = rebuild(run_dir, rank=rank, task=task)     # checks --rank/--task and loads before --out is touched
    method = built.composition.method
    with Staged(out) as staged:             # the old --out stays until the new one is written
        if merge:
            merged = method.merge(built.model, getattr(torch, dtype))
            merged.save_pretrained(staged.path, max_shard_size=max_shard_size)
            built.tokenizer.save_pretrained(staged.path)
            done = "merged model written to {} (load it with AutoModelForCausalLM.from_pretrained)"
        else:
            method.save(built.model, staged.path, built.record.adapter_meta())
            done = "adapter written to {} (PEFT format; qpeft_adapter.json has the rest)"
            done += "".join(f"\nnote: {part.peft_note}" for part in built.composition.parts
                            if part.peft_note and task is None)
        staged.commit()
    say(done.format(out))


def export_gguf(run_dir, out, gguf_type, rank, say) -> None:
    """The merged model as one GGUF file (adapter folded in, in float32, then typed per tensor)."""
    import torch

    from qpeft.core.interop import gguf_export
    from qpeft.core.run.rebuild import rebuild
    from qpeft.core.run.record import RunRecord

    record = RunRecord.read(run_dir)
    gguf_export.check_source(record.model)   # architecture, before the load
    built = rebuild(run_dir, rank=rank, record=record)
    merged = built.composition.method.merge(built.model, torch.float32)
    name = f"{record.run} ({_base_name(record.base_model)} + {record.adapter_spec}, merged by qpeft)"
    with gguf_export.StagedFile(out) as staged:
        summary = gguf_export.write(merged, built.tokenizer, staged.file, gguf_type, name)
        staged.commit()
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensors"].items(), key=lambda kv: -kv[1]))
    fallback = (f"; {len(summary['f16_fallback'])} tensor(s) kept f16 (rows not a multiple of the "
                f"{gguf_type} block)" if summary["f16_fallback"] else "")
    say(f"GGUF ({gguf_type}) written to {out}: {summary['bytes'] / 2**20:.1f} MiB, tensors {kinds}{fallback}; "
        f"run it with: llama-cli -m {out} -p 'Hello'")


def _base_name(spec: str) -> str:
    from pathlib import Path

    return Path(str(spec)).name or str(spec)
