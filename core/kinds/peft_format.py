"""Saving and loading adapters in Hugging Face PEFT's on-disk format (shared by all methods).

A saved adapter directory holds::

    adapter_config.json         PEFT's config (peft_type LORA or IA3, r, lora_alpha, …)
    adapter_model.safetensors   the trainable tensors under PEFT's key names:
                                  base_model.model.<module path>.lora_A.weight / .lora_B.weight
                                  base_model.model.<module path>.lora_magnitude_vector   (DoRA)
                                  base_model.model.<module path>.ia3_l                   (IA³)
    qpeft_adapter.json          what PEFT does not know: the spec, each part's options,
                                the quantizer and base model, the qpeft version
    qpeft_adapter.safetensors   only where a part's ``peft_tensors`` hook wrote PEFT's file
                                otherwise (CorDA's rank-2r form): the layers' own tensors,
                                which qpeft loads from

so ``PeftModel.from_pretrained(base_model, directory)`` reproduces the adapted model on
the unquantized base, and :func:`load_adapter` reproduces it exactly on a quantized one.
This module starts with ``_``: it is a helper, not a plugin.
"""
import collections
import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from pathlib import Path

from qpeft.core.base.durable import fsync
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.version import __version__

CONFIG, WEIGHTS, MANIFEST = "adapter_config.json", "adapter_model.safetensors", "qpeft_adapter.json"
CALIBRATION = "qpeft_calibration.safetensors"   # what calibrating parts (EVA…) computed from data
OWN = "qpeft_adapter.safetensors"   # the layers' own tensors, where a peft_tensors hook changed PEFT's file
PREFIX = "base_model.model."
# Fields every PEFT config accepts; the method adds its own (LoRA.peft_config, IA3.peft_config).
COMMON = {"task_type": "CAUSAL_LM", "fan_in_fan_out": False, "inference_mode": True,
          "modules_to_save": None, "revision": None}


def target_modules(model, chosen: set[str] | None = None) -> list[str]:
    """PEFT ``target_modules`` selecting exactly ``chosen`` (default: the adapted layers).

    Short leaf names (``q_proj``) when they select nothing else among the model's linear
    layers, else the full module paths.
    """
    from qpeft.core.kinds.quantizer import QuantizedLinear
    from qpeft.core.kinds.adapter_layers import adapter_layers

    adapted = adapter_layers(model)
    chosen = set(adapted) if chosen is None else set(chosen)
    inner = {f"{name}.{child}" for name, layer in adapted.items() for child, _ in layer.named_children()}
    linear = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear) and n not in inner}
    leaves = {n.rsplit(".", 1)[-1] for n in chosen}
    caught = {n for n in linear | set(adapted) if n.rsplit(".", 1)[-1] in leaves}
    return sorted(leaves) if caught == chosen else sorted(chosen)


class AdapterWriteError(QpeftError):
    """The adapter directory could not be written (a full disk, an unwritable directory);
    whatever was at ``directory`` before is untouched."""

    def __init__(self, directory: Path, nbytes: int, reason: str):
        self.directory, self.nbytes, self.reason = directory, nbytes, reason
        super().__init__(f"cannot write the adapter {directory} ({nbytes / 2**20:.2f} MB): {reason}; "
                         f"free some space there, or choose a writable directory")


def save(model, directory, config: dict, parts: list, meta: dict, calibration: dict | None = None) -> Path:
    """Write the three files of a saved adapter (four with ``calibration``, the states of
    calibrating parts, ``{part: {key: tensor}}``) into ``directory``, atomically: they are
    written and fsynced in ``.NAME.new-PID`` beside it, which then replaces ``directory``
    (an old one is set aside first and removed last). On any write error the old directory
    is left as it was and :class:`AdapterWriteError` is raised."""
    from qpeft.core.kinds.adapter_layers import adapter_layers

    directory = Path(directory)
    layers = adapter_layers(model)
    if not layers:
        raise QpeftError("the model has no adapter attached; nothing to save")
    own, tensors, changed = layer_tensors(layers, parts)
    config = keep_scaling(config, tensors, _ranks(own, tensors, changed))
    rerun = isinstance(config.get("init_lora_weights"), str)   # "pissa", "olora": PEFT redoes the rewrite on load
    files = {CONFIG: {**COMMON, "base_model_name_or_path": meta.get("base_model"), **config},
             MANIFEST: manifest(parts, meta, rewritten=not rerun and any(
                 getattr(layer, "base_rewritten", False) for name, layer in layers.items() if name not in changed))}
    weights = {WEIGHTS: tensors, OWN: own if changed else {}, CALIBRATION: flat_calibration(calibration or {})}
    nbytes = sum(t.numel() * t.element_size() for group in weights.values() for t in group.values())
    staged = directory.with_name(f".{directory.name}.new-{os.getpid()}")
    aside = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    try:
        _write_all(staged, weights, files)
        if directory.exists():
            os.replace(directory, aside)
        os.replace(staged, directory)
        fsync(directory.parent)
    except Exception as exc:   # OSError, or safetensors' SafetensorError wrapping one
        if aside.exists() and not directory.exists():
            with contextlib.suppress(OSError):
                os.replace(aside, directory)
        shutil.rmtree(staged, ignore_errors=True)
        if isinstance(exc, OSError) or "os error" in str(exc):
            raise AdapterWriteError(directory, nbytes, _reason(exc)) from None
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return directory


def layer_tensors(layers: dict, parts: list) -> tuple[dict, dict, set]:
    """``(own, written, changed)``: every layer's tensors under PEFT's file keys as the layer
    holds them, as PEFT's file holds them after each part's ``peft_tensors`` hook (the same
    tensors where no hook changed them), and the names of the layers a hook changed."""
    own, written, changed = {}, {}, set()
    for name, layer in layers.items():
        mine = {key: t for key, t in layer.adapter_tensors().items()
                if t.numel() or getattr(layer, "r", 1)}   # a layer EVA left at rank 0 saves nothing
        theirs = mine
        for part in parts:
            theirs = part.peft_tensors(layer, theirs)
        held = {f"{PREFIX}{name}.{key}": t.detach().cpu().contiguous() for key, t in mine.items()}
        own.update(held)
        if theirs is mine:
            written.update(held)
        else:
            changed.add(name)
            written.update({f"{PREFIX}{name}.{key}": t.detach().cpu().contiguous() for key, t in theirs.items()})
    return own, written, changed


def _ranks(own: dict, written: dict, changed: set) -> dict:
    """``{layer: rank}`` of the changed layers whose lora_A PEFT's file holds at another rank."""
    keys = {name: f"{PREFIX}{name}.lora_A.weight" for name in changed}
    return {name: written[key].shape[0] for name, key in keys.items()
            if key in written and key in own and written[key].shape[0] != own[key].shape[0]}


def keep_scaling(config: dict, written: dict, ranks: dict) -> dict:
    """A LoRA ``config`` whose layers in ``ranks`` (``{name: new rank}``) have that rank and an α
    that keeps PEFT's scaling (α/r; α/√r with ``use_rslora``): α·r'/r (α·√(r'/r)), exact for
    r' = 2r. The most common (r, α) of the layers in ``written`` becomes ``r``/``lora_alpha``, the
    others go to ``rank_pattern``/``alpha_pattern`` (their keys: the full module names, as
    ``LowRankMethod.peft_config`` writes them)."""
    if not ranks:
        return config
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    names = sorted({key[len(PREFIX):-len(".lora_A.weight")] for key in written if key.endswith(".lora_A.weight")})
    each = {name: (rank_pattern.get(name, config["r"]), alpha_pattern.get(name, config["lora_alpha"]))
            for name in names}
    for name, rank in ranks.items():
        r, alpha = each[name]
        factor = rank / r
        each[name] = rank, alpha * (math.sqrt(factor) if config.get("use_rslora") else factor)
    (r, alpha), _ = collections.Counter(each.values()).most_common(1)[0]
    out = {k: v for k, v in config.items() if k not in ("rank_pattern", "alpha_pattern")}
    out.update(r=r, lora_alpha=alpha)
    ranks_left = {name: each[name][0] for name in names if each[name][0] != r}
    alphas_left = {name: each[name][1] for name in names if each[name][1] != alpha}
    if ranks_left or alphas_left:
        out.update(rank_pattern=ranks_left, alpha_pattern=alphas_left)
    return out


def _write_all(staged: Path, weights: dict, files: dict) -> None:
    """``weights``: ``{file name: tensors}`` (an empty one is not written), ``files``: JSON files."""
    from safetensors.torch import save_file

    shutil.rmtree(staged, ignore_errors=True)
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.mkdir()
    written = [*files]
    for name, tensors in weights.items():
        if tensors or name == WEIGHTS:
            save_file(tensors, str(staged / name), metadata={"format": "pt"})
            written.append(name)
    for name, data in files.items():
        _write(staged / name, data)
    for name in written:
        with open(staged / name, "rb") as f:
            os.fsync(f.fileno())
    fsync(staged)


def _reason(exc: Exception) -> str:
    """The OS's words for a write error (safetensors wraps them as "... (os error 28)")."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    found = re.search(r"os error (\d+)", str(exc))
    return os.strerror(int(found.group(1))) if found else str(exc).splitlines()[0]


def manifest(parts: list, meta: dict, rewritten: bool = False) -> dict:
    """The content of ``qpeft_adapter.json``."""
    records = [{"name": p.name, "role": p.role, "options": dataclasses.asdict(p.options)} for p in parts]
    known = ("base_model", "quantizer", "spec", "adapter_spec", "qpeft_version")
    extra = {k: v for k, v in meta.items() if k not in known}
    spec = meta.get("spec") or meta.get("adapter_spec") or "+".join(p.name for p in parts)
    out = {"format": 1, "qpeft_version": __version__, "spec": spec, "parts": records,
           "base_model": meta.get("base_model"), "quantizer": meta.get("quantizer"), "meta": extra}
    if rewritten:
        out["note"] = ("an init modifier rewrote the frozen weights; PEFT reproduces this adapter "
                       "only on a base model holding those weights")
    return out


def read_manifest(directory) -> dict:
    """``qpeft_adapter.json`` of a saved adapter, or a one-line error."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise QpeftError(f"{directory} is not a qpeft adapter directory (no {MANIFEST})")
    return json.loads(path.read_text())


def _build(record: dict, registry):
    return registry.get("adapter", record["name"]).from_values(record["options"])


def saved_modifiers(directory, registry=None) -> list:
    """The modifier plugins recorded in a saved adapter, built with their saved options."""
    from qpeft.core.plugin import registry as registries

    registry = registry or registries.default()
    return [_build(r, registry) for r in read_manifest(directory)["parts"] if r["role"] == "modifier"]


def load_adapter(model, directory, registry=None):
    """Attach the saved composition to a (quantized) base model and load its tensors.

    Returns the :class:`~qpeft.core.kinds.adapter.Composition`, whose ``method`` can save or merge.
    """
    from qpeft.core.plugin import registry as registries
    from qpeft.core.kinds.adapter import Composition

    registry = registry or registries.default()
    record = read_manifest(directory)
    method = next(_build(r, registry) for r in record["parts"] if r["role"] == "method")
    composition = Composition(method, saved_modifiers(directory, registry), record["spec"])
    composition.attach(model)
    states = read_calibration(directory)
    if states:
        method.restore_calibration(model, states)
    load_tensors(model, directory)
    return composition


def flat_calibration(states: dict) -> dict:
    """``{part: {key: tensor}}`` → ``{"part/key": tensor}`` (contiguous, on the CPU), as saved."""
    return {f"{part}/{key}": t.detach().cpu().contiguous() for part, state in states.items()
            for key, t in state.items()}


def nested_calibration(flat: dict) -> dict:
    """The inverse of :func:`flat_calibration`."""
    states: dict = {}
    for name, tensor in flat.items():
        part, _, key = name.partition("/")
        states.setdefault(part, {})[key] = tensor
    return states


def read_calibration(directory) -> dict:
    """The calibration states saved with an adapter (``{}`` when it has none)."""
    path = Path(directory) / CALIBRATION
    return nested_calibration(read_tensors(path)) if path.is_file() else {}


def read_tensors(path: Path) -> dict:
    """The tensors of a safetensors file, or one line naming it (truncated, damaged)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:   # noqa: BLE001 - safetensors raises its own error types
        raise QpeftError(f"{path} is not a readable safetensors file ({str(exc).splitlines()[0]}); it may be "
                         "truncated: save or download the adapter again") from None


def load_tensors(model, directory) -> None:
    """Copy the saved tensors into the model's adapter layers, each checked against the
    layer's own shape first: ``qpeft_adapter.safetensors`` where a ``peft_tensors`` hook wrote
    PEFT's file otherwise, else ``adapter_model.safetensors``."""
    from qpeft.core.kinds.adapter_layers import TensorShapeError, adapter_layers

    path = Path(directory) / OWN
    if not path.is_file():
        path = Path(directory) / WEIGHTS
    if not path.is_file():
        raise QpeftError(f"no {WEIGHTS} in {directory}; is it a saved adapter?")
    saved = read_tensors(path)
    used = set()
    for name, layer in adapter_layers(model).items():
        head = f"{PREFIX}{name}."
        own = {k[len(head):]: t for k, t in saved.items() if k.startswith(head)}
        try:                  # the layer checks the shapes (QDyLoRA takes any rank ≤ its own)
            layer.load_adapter_tensors(own)
        except TensorShapeError as exc:
            raise QpeftError(f"{path}: {name}.{exc}; the adapter was made for another base model "
                             f"(see base_model in {directory / MANIFEST})") from None
        used.update(head + k for k in own)
    unused = sorted(set(saved) - used)
    if unused:
        raise QpeftError(f"{directory} holds tensors for layers this model does not adapt "
                         f"(e.g. {unused[0]}); attach the same adapter spec first")


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")
