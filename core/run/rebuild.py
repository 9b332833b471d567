"""Rebuilding a finished run's adapted model from its run directory, to evaluate or export it.

    RUN_DIR/config.json ─▶ run_record.RunRecord ─▶ RunConfig (model, data, template, eval split)
                        ─▶ streaming.load_quantized with the quantizer (recorded name and options)
    RUN_DIR/adapter/    ─▶ assemble the recorded adapter parts, attach, Adapter.load (tensors)

    ADAPTER_DIR (PEFT's format, from any tool; read and checked by pipeline.plan as
    --init-adapter) ─▶ --model, --quant ─▶ attach the spec it amounts to, load its tensors

The quantizer is rebuilt from its recorded options rather than the spec typed, so a
default that changed between versions does not silently change the model. ``--rank``
goes through the optional method hook ``select_rank(model, rank)`` (QDyLoRA has it).
"""
import dataclasses
from pathlib import Path

from qpeft.core.interop import peft_files
from qpeft.core.plugin import registry
from qpeft.core.model import streaming
from qpeft.core.base.errors import QpeftError
from qpeft.core.kinds.peft_format import WEIGHTS
from qpeft.core.run.record import RunRecord


@dataclasses.dataclass
class Rebuilt:
    """A run's model with its adapter loaded."""

    run_dir: Path
    record: RunRecord
    cfg: object             # RunConfig
    model: object
    tokenizer: object
    composition: object     # the loaded adapter Composition (None: the base alone)
    rank: int | None = None
    task: str | None = None


def rebuild(run_dir, device: str = "cpu", rank: int | None = None, record: RunRecord | None = None,
            plan=None, no_adapter: bool = False, task: str | None = None) -> Rebuilt:
    """The run's quantized model with its saved adapter attached (and ``rank`` selected).
    ``record`` (read here when not given) is the one source of the quantizer and adapter;
    ``plan`` — ``pipeline.plan(cfg, record)``, when the caller made one — lends its
    already-built plugins instead of building them again from the same record.
    ``no_adapter``: the run's quantized base alone (what its "before" evaluated), loaded as
    the run loaded it (float32 activations for IA3/DoRA), nothing attached. ``task``: the
    adapter's ``select_task`` (MTLoRA: every row routed to that task, for good)."""
    run_dir = Path(run_dir)
    record = record or RunRecord.read(run_dir)
    if no_adapter:
        reg = registry.default() if plan is None else None
        quantizer = plan.quantizer if plan else record.build_quantizer(reg)
        composition = plan.adapter if plan else record.composition(reg)
        return _base_only(record.settings(run_dir), quantizer, composition, device, rank, run_dir, record)
    if not (run_dir / "adapter" / "qpeft_adapter.json").is_file():
        raise QpeftError(f"{run_dir} has no saved adapter (adapter/qpeft_adapter.json); "
                         f"finish the run with: qpeft run --resume {run_dir}")
    peft_files.header(run_dir / "adapter" / WEIGHTS, f"write it again with: qpeft run --resume {run_dir}")
    cfg = record.settings(run_dir)
    if plan is not None:
        quantizer, composition = plan.quantizer, plan.adapter
    else:
        reg = registry.default()
        quantizer, composition = record.build_quantizer(reg), record.composition(reg)
    check_rank(composition, rank, f"this run used '{record.adapter_spec}'")
    check_task(composition, task, f"this run used '{record.adapter_spec}'")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, quantizer, device,
                                                   keep_source=composition.needs_source_weights,
                                                   float32_activations=composition.needs_float32_activations)
    composition.attach(model)
    composition.method.load(model, run_dir / "adapter")
    model.to(device).eval()
    if rank is not None:
        composition.method.select_rank(model, rank)
    if task is not None:
        composition.method.select_task(model, task)
    return Rebuilt(run_dir, record, cfg, model, tokenizer, composition, rank, task)


def check_rank(composition, rank: int | None, used: str) -> None:
    """``--rank`` only for a method with the ``select_rank`` hook (checked before loading)."""
    if rank is not None and not composition.method.implements("select_rank"):
        raise QpeftError(f"--rank needs a dynamic-rank adapter such as qdylora; {used}; drop --rank")


def check_task(composition, task: str | None, used: str) -> None:
    """``--task`` only for a method with the ``select_task`` hook (checked before loading)."""
    if task is not None and not composition.method.implements("select_task"):
        raise QpeftError(f"--task needs a multi-task adapter such as mtlora; {used}; drop --task")


def onto_base(cfg, plan, device: str = "cpu", rank: int | None = None, no_adapter: bool = False) -> Rebuilt:
    """``cfg.model`` quantized by the plan's quantizer, with the adapter directory that
    ``pipeline.plan`` read (``plan.init``: ``cfg.init_adapter``) attached and loaded
    (``no_adapter``: the quantized base alone, loaded as the adapter would have it)."""
    init = plan.init
    if no_adapter:
        return _base_only(cfg, plan.quantizer, plan.adapter, device, rank, Path(init.directory),
                          RunRecord.started(cfg, plan))
    check_rank(plan.adapter, rank, f"{init.directory} holds '{plan.adapter.method.name}'")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, plan.quantizer, device,
                                                   keep_source=plan.adapter.needs_source_weights,
                                                   float32_activations=plan.adapter.needs_float32_activations)
    plan.adapter.attach(model)
    init.load(model)
    model.to(device).eval()
    if rank is not None:
        plan.adapter.method.select_rank(model, rank)
    return Rebuilt(Path(init.directory), RunRecord.started(cfg, plan), cfg, model, tokenizer, plan.adapter, rank)


def _base_only(cfg, quantizer, composition, device, rank, where: Path, record) -> Rebuilt:
    """The quantized base without the adapter (``composition`` only says how it is loaded:
    float32 activations for IA3/DoRA, as training and the "before" evaluation had them)."""
    if rank is not None:
        raise QpeftError("--rank selects a rank of the adapter; --no-adapter has none; drop one of them")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, quantizer, device,
                                                   float32_activations=composition.needs_float32_activations)
    model.to(device).eval()
    return Rebuilt(where, record, cfg, model, tokenizer, None, None)
