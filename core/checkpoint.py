"""Crash-safe checkpoints in safetensors + JSON (never pickle).

A checkpoint is written into a temporary directory, completed by a marker file written
last, then renamed into place: a kill at any moment leaves the previous checkpoint
intact, and :func:`latest` only ever returns complete ones.

Nested states (optimizer, RNG) are flattened: tensors go to ``state.safetensors`` under
dotted keys, everything else to ``state.json`` with placeholders pointing at the keys.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MARKER = "COMPLETE"
_TENSOR = "__tensor__"


def flatten(obj, prefix: str, tensors: dict):
    """JSON-able skeleton of ``obj``; its tensors are moved into ``tensors``."""
    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj.detach().cpu().contiguous()
        return {_TENSOR: prefix}
    if isinstance(obj, dict):
        return {"__dict__": [[flatten(k, f"{prefix}.k{i}", tensors), flatten(v, f"{prefix}.{i}", tensors)]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    return obj


def unflatten(skeleton, tensors: dict):
    """The inverse of :func:`flatten`."""
    if isinstance(skeleton, dict):
        if _TENSOR in skeleton:
            return tensors[skeleton[_TENSOR]]
        if "__dict__" in skeleton:
            return {unflatten(k, tensors): unflatten(v, tensors) for k, v in skeleton["__dict__"]}
        if "__tuple__" in skeleton:
            return tuple(unflatten(v, tensors) for v in skeleton["__tuple__"])
    if isinstance(skeleton, list):
        return [unflatten(v, tensors) for v in skeleton]
    return skeleton


def save(directory: Path, state: dict) -> Path:
    """Write ``state`` (nested dicts of tensors and JSON values) atomically to ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(f".tmp-{directory.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors: dict = {}
    skeleton = flatten(state, "s", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(skeleton))
    with open(tmp / MARKER, "w") as f:
        f.write("ok\n")
        f.flush()
        os.fsync(f.fileno())
    if directory.exists():
        shutil.rmtree(directory)
    os.replace(tmp, directory)
    return directory


def load(directory: Path) -> dict:
    """A state written by :func:`save`."""
    directory = Path(directory)
    tensors = load_file(str(directory / "state.safetensors"))
    return unflatten(json.loads((directory / "state.json").read_text()), tensors)


def latest(root: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``root``, or None."""
    done = [p for p in Path(root).glob("step-*") if (p / MARKER).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1])) if done else None
