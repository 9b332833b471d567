"""Saving and loading adapters in Hugging Face PEFT's on-disk format (shared by all methods).

A saved adapter directory holds::

    adapter_config.json         PEFT's config (peft_type LORA or IA3, r, lora_alpha, …)
    adapter_model.safetensors   the trainable tensors under PEFT's key names:
                                  base_model.model.<module path>.lora_A.weight / .lora_B.weight
                                  base_model.model.<module path>.lora_magnitude_vector   (DoRA)
                                  base_model.model.<module path>.ia3_l                   (IA³)
    qpeft_adapter.json          what PEFT does not know: the spec, each part's options,
                                the quantizer and base model, the qpeft version

so ``PeftModel.from_pretrained(base_model, directory)`` reproduces the adapted model on
the unquantized base, and :func:`load_adapter` reproduces it exactly on a quantized one.
This module starts with ``_``: it is a helper, not a plugin.
"""
import contextlib
import dataclasses
import json
import os
import re
import shutil
from pathlib import Path

from qpeft.core.base.durable import fsync
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.version import __version__

CONFIG, WEIGHTS, MANIFEST = "adapter_config.json", "adapter_model.safetensors", "qpeft_adapter.json"
CALIBRATION = "qpeft_calibration.safetensors"   # what calibrating parts (EVA…) computed from data
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
    tensors = {f"{PREFIX}{name}.{key}": t.detach().cpu().contiguous()
               for name, layer in layers.items() for key, t in layer.adapter_tensors().items()
               if t.numel() or getattr(layer, "r", 1)}   # a layer EVA left at rank 0 saves nothing
    files = {CONFIG: {**COMMON, "base_model_name_or_path": meta.get("base_model"), **config},
             MANIFEST: manifest(parts, meta, rewritten=any(
                 getattr(layer, "base_rewritten", False) for layer in layers.values()))}
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    staged = directory.with_name(f".{directory.name}.new-{os.getpid()}")
    aside = directory.with_name(f".{directory.name}.old-{os.getpid()}")
    try:
        _write_all(staged, tensors, files, flat_calibration(calibration or {}))
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


def _write_all(staged: Path, tensors: dict, files: dict, calibration: dict) -> None:
    from safetensors.torch import save_file

    shutil.rmtree(staged, ignore_errors=True)
    staged.parent.mkdir(parents=True, exist_ok=True)
    staged.mkdir()
    save_file(tensors, str(staged / WEIGHTS), metadata={"format": "pt"})
    written = [WEIGHTS, *files]
    if calibration:
        save_file(calibration, str(staged / CALIBRATION), metadata={"format": "pt"})
        written.append(CALIBRATION)
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
    """Copy the tensors of ``adapter_model.safetensors`` into the model's adapter layers,
    each checked against the layer's own shape first."""
    from qpeft.core.kinds.adapter_layers import TensorShapeError, adapter_layers

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
