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
@click.option("--format", "fmt", type=click.Choice(["hf", "gguf", "gguf-lora"]), default="hf", show_default=True,
              help="hf: the adapter in PEFT's format, or with --merge a transformers model directory; "
                   "gguf: one merged .gguf file that llama.cpp and Ollama load (--no-merge: the base alone); "
                   "gguf-lora: the adapter as a llama.cpp LoRA adapter (llama-cli -m BASE.gguf --lora FILE).")
@click.option("--merge/--no-merge", default=None,
              help="--merge: fold the adapter into the base and save a full model (sharded safetensors + "
                   "tokenizer) that transformers loads. --no-merge with --format gguf: the base the adapter "
                   "was trained on, without it, for --format gguf-lora's adapter.")
@click.option("--quant", "quant_spec",
              help="With --merge: re-quantize with this quantizer (nf4, hqq:nbits=4, ...) the base's "
                   "full-precision weights plus the adapter's update (W+ΔW: NF4 would round the update away "
                   "from the merged Ŵ+ΔW), and report the quality cost on the run's validation set "
                   "(export_report.json).")
@click.option("--quality", metavar="EVALUATOR[:METRIC]",
              help="With --quant: the metric that measures the cost, one of the run's evaluators "
                   "[default: the first of them with a primary metric, e.g. perplexity]")
@click.option("--gguf-type", type=click.Choice(list(GGUF_TYPES)), default=None,
              help="Tensor type of a --format gguf file [default: f16]; norms stay f32. With --format "
                   "gguf-lora: f32, f16, bf16 or q8_0 [default: f32, as llama.cpp's convert_lora_to_gguf].")
@click.option("--calibrate", type=click.IntRange(min=1), default=None, metavar="N",
              help="Round the merged weights with GPTQ (error feedback through the layer inputs' Hessian) "
                   "over N batches of the run's training data: with --merge --quant nf4, or --format gguf "
                   "--gguf-type q4_0/q4_1/q5_0/q5_1/q8_0.")
@click.option("--rank", type=params.RANK, default=None,
              help="Export a dynamic-rank adapter (qdylora) at this rank ≤ its trained rank.")
@click.option("--task", default=None,
              help="Export a multi-task adapter (mtlora) as this one task: a plain PEFT LoRA adapter, or merged.")
@click.option("--dtype", type=click.Choice(DTYPE_CHOICES), default=None,
              help="Weight dtype of a merged model [default: float32].")
@click.option("--max-shard-size", default=None, help="Shard size of a merged model [default: 500MB].")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export_command(run_dir, out_path, fmt, merge, quant_spec, quality, gguf_type, calibrate, rank, dtype,
                   max_shard_size, overwrite, task=None):
    """Export RUN_DIR's adapter (PEFT format), a merged full model, or a merged GGUF file.

    \b
    Examples:
      qpeft export runs/nf4-lora --out lora-adapter
      qpeft export runs/nf4-qdylora --rank 4 --out rank4-adapter
      qpeft export runs/nf4-mtlora --task alert --out alert-adapter   # one task, as PEFT LoRA
      qpeft export runs/nf4-dora --merge --dtype bfloat16 --out merged-model
      qpeft export runs/nf4-lora --merge --quant nf4 --out merged-nf4      # + quality cost
      qpeft export runs/nf4-lora --merge --quant nf4 --quality accuracy --out merged-nf4
      qpeft export runs/nf4-lora --merge --quant nf4 --calibrate 16 --out merged-nf4-gptq
      qpeft export runs/nf4-lora --format gguf --gguf-type q8_0 --out model-q8_0.gguf
      qpeft export runs/nf4-lora --format gguf --gguf-type q4_0 --calibrate 16 --out model-q4_0.gguf
      qpeft export runs/nf4-lora --format gguf --no-merge --gguf-type q8_0 --out base-q8_0.gguf
      qpeft export runs/nf4-lora --format gguf-lora --out adapter.gguf     # llama-cli -m base-q8_0.gguf --lora adapter.gguf
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
    check_calibrate(calibrate, fmt, merge, quant_spec, gguf_type, dtype)
    if task is not None and (quant_spec is not None or fmt != "hf"):
        raise QpeftError("--task exports one task's adapter or merged model (--format hf); "
                         "drop --quant/--format, or export the task first and convert that")
    if quality is not None and quant_spec is None:
        raise QpeftError("--quality measures a re-quantized export; add --merge --quant SPEC, or drop --quality")
    quantizer = checked = None
    if quant_spec is not None:
        from qpeft.core.compare import requant

        quantizer = requant.check_spec(quant_spec)   # a bad spec is one line, before any load
        if calibrate:
            from qpeft.core.compare.calibrate import grids_for

            if grids_for(quantizer) is None:
                raise QpeftError(f"--calibrate rounds onto a fixed 4-bit grid, which '{quant_spec}' does not "
                                 "have (nf4 and nf4:quant_type=fp4 do; HQQ fits its own): use --quant nf4, "
                                 "or --format gguf --gguf-type q4_0 --calibrate N, or drop --calibrate")
        checked = requant.validation(run_dir, quality)   # the run's record, evaluator and data, too
    if fmt in ("gguf", "gguf-lora"):
        from qpeft.core.interop import gguf_export

        gguf_export.check_out(out)
    if fmt == "gguf-lora":
        method = _record_method(run_dir)
        from qpeft.core.interop import gguf_lora

        gguf_lora.check_method(method)                   # DoRA, IA³: one line, before the load
    refuse_overlap(out, run_dir, "the run directory")
    if out.exists() and not overwrite:
        raise QpeftError(f"{out} exists; pass --overwrite to replace it, or choose another --out")
    say = lambda line: click.echo(line, err=True)  # noqa: E731
    if fmt == "gguf-lora":
        export_gguf_lora(run_dir, out, gguf_type or "f32", rank, say)
    elif fmt == "gguf":
        export_gguf(run_dir, out, gguf_type or "f16", rank, say, calibrate, no_merge=merge is False)
    elif quantizer is not None:
        from qpeft.core.compare import requant

        report = requant.export(run_dir, out, quantizer, quant_spec, dtype or "float32", rank,
                                max_shard_size or "500MB", say, quality, checked, calibrate)
        click.echo(requant.table(report))
        say(f"merged model written to {out}, with {requant.QUANT_FILE} and {requant.REPORT_FILE}; "
            f"load it re-quantized with: qpeft run --model {out} --quant '{quant_spec}'")
    else:
        export_hf(run_dir, out, bool(merge), rank, dtype or "float32", max_shard_size or "500MB", say, task)


def check_combination(fmt, merge, quant_spec, gguf_type, dtype, max_shard_size) -> None:
    """Flags that make no sense together, refused before anything loads."""
    from qpeft.core.base.errors import QpeftError

    if fmt == "gguf-lora":
        from qpeft.core.interop.gguf_lora import TYPES

        for flag, value, why in (("--merge/--no-merge", merge, "it writes the adapter alone; the base comes from "
                                  "--format gguf --no-merge"), ("--quant", quant_spec, "its tensor type is --gguf-type"),
                                 ("--dtype", dtype, "its tensor type is --gguf-type"),
                                 ("--max-shard-size", max_shard_size, "it is one file")):
            if value is not None:
                raise QpeftError(f"{flag} does not apply to --format gguf-lora ({why}); drop it")
        if gguf_type not in (None, *TYPES):
            raise QpeftError(f"--format gguf-lora writes {', '.join(TYPES)} (as llama.cpp's convert_lora_to_gguf); "
                             f"--gguf-type {gguf_type} is not one: use --gguf-type f16")
        return
    if fmt == "gguf":
        for flag, value, why in (("--quant", quant_spec, "a GGUF file is quantized by --gguf-type"),
                                 ("--dtype", dtype, "GGUF tensor types come from --gguf-type"),
                                 ("--max-shard-size", max_shard_size, "a GGUF export is one file")):
            if value is not None:
                raise QpeftError(f"{flag} does not apply to --format gguf ({why}); drop {flag}")
        return
    if gguf_type is not None:
        raise QpeftError("--gguf-type sets the tensor type of a GGUF file; add --format gguf, or drop it")
    if merge is False:
        raise QpeftError("--no-merge applies to --format gguf (the base without the adapter); an hf export "
                         "without --merge already keeps the adapter apart: drop --no-merge")
    if not merge:
        for flag, value in (("--quant", quant_spec), ("--dtype", dtype), ("--max-shard-size", max_shard_size)):
            if value is not None:
                raise QpeftError(f"{flag} applies to a merged model; add --merge (an adapter export "
                                 f"keeps the adapter's own tensors)")


def check_calibrate(calibrate, fmt, merge, quant_spec, gguf_type, dtype) -> None:
    """``--calibrate`` only where something is rounded onto a grid, refused before anything loads."""
    from qpeft.core.base.errors import QpeftError
    from qpeft.core.compare.gptq import GGUF_GRIDS

    if calibrate is None:
        return
    if fmt == "gguf-lora" or merge is False:
        raise QpeftError("--calibrate rounds merged weights; an adapter and an unmerged base have none to round: "
                         "drop --calibrate")
    if fmt == "gguf":
        if (gguf_type or "f16").upper() not in GGUF_GRIDS:
            raise QpeftError(f"--calibrate rounds onto a block type; --gguf-type {gguf_type or 'f16'} is not one: "
                             "add --gguf-type q4_0 (or q4_1, q5_0, q5_1, q8_0), or drop --calibrate")
        return
    if quant_spec is None:
        raise QpeftError("--calibrate re-quantizes a merged model with error feedback; add --merge --quant nf4 "
                         "(or --format gguf --gguf-type q4_0), or drop --calibrate")
    if dtype not in (None, "float32"):
        raise QpeftError(f"--calibrate saves float32 weights that sit exactly on the quantizer's grid "
                         f"(--dtype {dtype} would move them off it); drop --dtype")


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


def export_gguf(run_dir, out, gguf_type, rank, say, calibrate=None, no_merge=False) -> None:
    """The merged model as one GGUF file (adapter folded in, in float32, then typed per tensor);
    with ``calibrate``, its block-typed layers rounded by GPTQ first (compare/calibrate.py);
    ``no_merge``: the base the adapter was trained on, without it."""
    import torch

    from qpeft.core.interop import gguf_export
    from qpeft.core.run.rebuild import rebuild
    from qpeft.core.run.record import RunRecord

    record = RunRecord.read(run_dir)
    gguf_export.check_source(record.model)   # architecture, before the load
    if calibrate:
        from qpeft.core.compare import calibrate as calibrating

        merged, tokenizer, stats = calibrating.gguf_merged(run_dir, record, gguf_type, rank, calibrate)
        say(f"GPTQ over {calibrate} training batches: relative output error of {stats['layers']} layers "
            f"{stats['output_error_plain']:.2e} (nearest level) → {stats['output_error_gptq']:.2e}")
    elif no_merge:
        from qpeft.core.interop import gguf_lora

        built = rebuild(run_dir, rank=rank, record=record)
        merged, tokenizer = gguf_lora.unmerged(built.model), built.tokenizer
    else:
        built = rebuild(run_dir, rank=rank, record=record)
        merged, tokenizer = built.composition.method.merge(built.model, torch.float32), built.tokenizer
    name = (f"{record.run} base ({_base_name(record.base_model)}, {record.quantizer.name}-dequantized, without "
            f"its {record.adapter_spec} adapter)" if no_merge else
            f"{record.run} ({_base_name(record.base_model)} + {record.adapter_spec}, merged by qpeft)")
    with gguf_export.StagedFile(out) as staged:
        summary = gguf_export.write(merged, tokenizer, staged.file, gguf_type, name)
        staged.commit()
    kinds = ", ".join(f"{n} {k}" for k, n in sorted(summary["tensors"].items(), key=lambda kv: -kv[1]))
    fallback = (f"; {len(summary['f16_fallback'])} tensor(s) kept f16 (rows not a multiple of the "
                f"{gguf_type} block)" if summary["f16_fallback"] else "")
    say(f"GGUF ({gguf_type}) written to {out}: {summary['bytes'] / 2**20:.1f} MiB, tensors {kinds}{fallback}; "
        f"run it with: llama-cli -m {out} -p 'Hello'")


def export_gguf_lora(run_dir, out, gguf_type, rank, say) -> None:
    """The adapter as a llama.cpp LoRA adapter GGUF (interop/gguf_lora.py)."""
    from qpeft.core.interop import gguf_export, gguf_lora
    from qpeft.core.run.rebuild import rebuild
    from qpeft.core.run.record import RunRecord

    record = RunRecord.read(run_dir)
    gguf_export.check_source(record.model)
    built = rebuild(run_dir, rank=rank, record=record)
    name = f"{record.run} ({record.adapter_spec} adapter of {_base_name(record.base_model)}, by qpeft)"
    with gguf_export.StagedFile(out) as staged:
        summary = gguf_lora.write(built.model, staged.file, gguf_type, name)
        staged.commit()
    say(f"GGUF LoRA adapter ({gguf_type}) written to {out}: {summary['layers']} layers, rank {summary['rank']}, "
        f"alpha {summary['alpha']:g}, {summary['bytes'] / 2**20:.2f} MiB; pair it with the base from "
        f"qpeft export {run_dir} --format gguf --no-merge --out BASE.gguf and run: "
        f"llama-cli -m BASE.gguf --lora {out}")


def _record_method(run_dir):
    """The adapter method a run recorded, built without loading the model."""
    from qpeft.core.plugin import registry
    from qpeft.core.run.record import RunRecord

    return RunRecord.read(run_dir).composition(registry.default()).method


def _base_name(spec: str) -> str:
    from pathlib import Path

    return Path(str(spec)).name or str(spec)
