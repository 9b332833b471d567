"""Rebuilding a finished run's adapted model from its run directory, to evaluate it again.

    RUN_DIR/config.json ─▶ RunConfig (model, data, template, eval split)
                        ─▶ load_model ─▶ quantizer (the recorded name and options)
    RUN_DIR/adapter/    ─▶ assemble the recorded adapter parts, attach, Adapter.load (tensors)

The quantizer is rebuilt from its recorded options rather than the spec typed, so a
default that changed between versions does not silently change the model.
"""
import dataclasses
import json
from functools import partial
from pathlib import Path

from qpeft.core import config as run_config
from qpeft.core import models, registry, templates
from qpeft.core.adapter import assemble
from qpeft.core.errors import QpeftError
from qpeft.core.evaluator import EvalContext


@dataclasses.dataclass
class Rebuilt:
    """A run's model with its adapter loaded, and what is needed to evaluate it."""

    run_dir: Path
    resolved: dict          # config.json
    cfg: object             # RunConfig
    model: object
    tokenizer: object
    composition: object     # the loaded adapter Composition
    rank: int | None = None


def read_resolved(run_dir) -> dict:
    """``config.json`` of a run directory, or a one-line error."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise QpeftError(f"{run_dir} has no config.json; pass a directory written by 'qpeft run'")
    return json.loads(path.read_text())


def run_settings(resolved: dict, run_dir) -> run_config.RunConfig:
    """The RunConfig a run was started with (resume/overwrite cleared)."""
    flat = dict(resolved["config"])
    flat.update(flat.pop("train", {}))
    flat.update(resume=False, overwrite=False, name=Path(run_dir).name, output_dir=str(Path(run_dir).parent))
    return run_config.build(None, flat)


def dynamic_layers(model) -> list:
    """Layers whose evaluation rank can be chosen (they have an ``eval_rank``, e.g. qdylora's)."""
    return [m for m in model.modules() if hasattr(m, "eval_rank") and hasattr(m, "lora_A")]


def set_eval_rank(model, rank: int, spec: str) -> None:
    """Evaluate a dynamic-rank adapter at ``rank`` ≤ its saved rank (DyLoRA §3)."""
    layers = dynamic_layers(model)
    if not layers:
        raise QpeftError(f"--rank needs a dynamic-rank adapter such as qdylora; this run used "
                         f"'{spec}'; drop --rank")
    saved = min(layer.eval_rank for layer in layers)
    if not 1 <= rank <= saved:
        raise QpeftError(f"the saved adapter has rank {saved}; pass --rank between 1 and {saved}")
    for layer in layers:
        layer.eval_rank = rank


def rebuild(run_dir, device: str = "cpu", rank: int | None = None) -> Rebuilt:
    """The run's quantized model with its saved adapter attached (and ``rank`` set)."""
    run_dir = Path(run_dir)
    resolved = read_resolved(run_dir)
    if not (run_dir / "adapter" / "qpeft_adapter.json").is_file():
        raise QpeftError(f"{run_dir} has no saved adapter (adapter/qpeft_adapter.json); "
                         f"finish the run with: qpeft run --resume {run_dir}")
    cfg = run_settings(resolved, run_dir)
    reg = registry.default()
    record = resolved["quantizer"]
    quantizer = reg.get("quantizer", record["name"]).from_values(record["options"])
    adapter = resolved["adapter"]
    composition = assemble([(part["name"], part["options"]) for part in adapter["parts"]], reg, adapter["spec"])
    model, tokenizer = models.load_model(cfg.model)
    quantizer.quantize_model(model, device=device, progress=False,
                             keep_source=composition.needs_source_weights)
    composition.attach(model)
    composition.method.load(model, run_dir / "adapter")
    model.to(device).eval()
    if rank is not None:
        set_eval_rank(model, rank, composition.spec)
    return Rebuilt(run_dir, resolved, cfg, model, tokenizer, composition, rank)


def eval_context(rebuilt: Rebuilt, validation: list, test: list, device: str, facts: dict | None = None):
    """The :class:`EvalContext` the pipeline would build "after" training, for this model."""
    cfg, tokenizer = rebuilt.cfg, rebuilt.tokenizer
    template = cfg.template if cfg.template != "auto" else None
    encode = partial(templates.encode, tokenizer=tokenizer, template=template,
                     max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
    return EvalContext(model=rebuilt.model, tokenizer=tokenizer, stage="after", device=device,
                       validation=validation, test=test, encode=lambda e: encode(e)[0],
                       prompt_ids=partial(templates.prompt_ids, tokenizer=tokenizer, template=template),
                       facts=dict(facts or {}))
