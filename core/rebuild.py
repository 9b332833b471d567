"""Rebuilding a finished run's adapted model from its run directory, to evaluate or export it.

    RUN_DIR/config.json ─▶ RunConfig (model, data, template, eval split)
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

from qpeft.core import config as run_config
from qpeft.core import registry, streaming
from qpeft.core.adapter import assemble
from qpeft.core.errors import QpeftError


@dataclasses.dataclass
class Rebuilt:
    """A run's model with its adapter loaded."""

    run_dir: Path
    resolved: dict          # config.json
    cfg: object             # RunConfig
    model: object
    tokenizer: object
    composition: object     # the loaded adapter Composition
    rank: int | None = None


def run_settings(resolved: dict, run_dir) -> run_config.RunConfig:
    """The RunConfig a run was started with (resume/overwrite cleared)."""
    return run_config.build(None, {}, run_config.saved_settings(resolved, run_dir))


def rebuild(run_dir, device: str = "cpu", rank: int | None = None) -> Rebuilt:
    """The run's quantized model with its saved adapter attached (and ``rank`` selected)."""
    run_dir = Path(run_dir)
    resolved = run_config.read_run(run_dir)
    if not (run_dir / "adapter" / "qpeft_adapter.json").is_file():
        raise QpeftError(f"{run_dir} has no saved adapter (adapter/qpeft_adapter.json); "
                         f"finish the run with: qpeft run --resume {run_dir}")
    cfg = run_settings(resolved, run_dir)
    reg = registry.default()
    record = resolved["quantizer"]
    quantizer = reg.get("quantizer", record["name"]).from_values(record["options"])
    adapter = resolved["adapter"]
    composition = assemble([(part["name"], part["options"]) for part in adapter["parts"]], reg, adapter["spec"])
    check_rank(composition, rank, f"this run used '{adapter['spec']}'")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, quantizer, device,
                                                   keep_source=composition.needs_source_weights)
    composition.attach(model)
    composition.method.load(model, run_dir / "adapter")
    model.to(device).eval()
    if rank is not None:
        composition.method.select_rank(model, rank)
    return Rebuilt(run_dir, resolved, cfg, model, tokenizer, composition, rank)


def check_rank(composition, rank: int | None, used: str) -> None:
    """``--rank`` only for a method with the ``select_rank`` hook (checked before loading)."""
    if rank is not None and not composition.method.implements("select_rank"):
        raise QpeftError(f"--rank needs a dynamic-rank adapter such as qdylora; {used}; drop --rank")


def onto_base(cfg, plan, device: str = "cpu", rank: int | None = None) -> Rebuilt:
    """``cfg.model`` quantized by the plan's quantizer, with the adapter directory that
    ``pipeline.plan`` read (``plan.init``: ``cfg.init_adapter``) attached and loaded."""
    from qpeft.core.pipeline import plugin_record
    from qpeft.core.version import __version__

    init = plan.init
    check_rank(plan.adapter, rank, f"{init.directory} holds '{plan.adapter.method.name}'")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, plan.quantizer, device,
                                                   keep_source=plan.adapter.needs_source_weights)
    plan.adapter.attach(model)
    init.load(model)
    model.to(device).eval()
    if rank is not None:
        plan.adapter.method.select_rank(model, rank)
    resolved = {"run": None, "qpeft_version": __version__, "config": cfg.to_dict(),
                "quantizer": plugin_record(plan.quantizer),
                "adapter": {"spec": init.spec, "parts": [plugin_record(a) for a in plan.adapter.parts]}}
    return Rebuilt(Path(init.directory), resolved, cfg, model, tokenizer, plan.adapter, rank)
