"""Crash-safe, verified checkpoints in safetensors + JSON (never pickle).

Writing (:func:`save`) goes into ``ROOT/.tmp-step-N/`` in this order, each file fsynced:
``state.safetensors``, ``state.json``, ``manifest.json`` (size and SHA-256 of both), and
last the ``COMPLETE`` marker; then the directory is fsynced and renamed to ``ROOT/step-N``
(an existing ``step-N`` is renamed aside to ``.old-step-N`` first and removed afterwards).
A kill at any moment leaves every earlier checkpoint intact; a failed write (full disk,
read-only directory) removes its temporary directory and raises :class:`CheckpointError`.

Reading (:func:`load_newest`) tries the complete checkpoints newest first, checks every
file against the manifest and that the state parses, and falls back past a damaged one
with a one-line notice; it reports the damaged ones, which the trainer moves aside
(:func:`set_aside`, ``ROOT/damaged-step-N``) once it has written a good checkpoint after
them. A checkpoint without a manifest is damaged unless the caller says the run was started
by a qpeft that wrote none (``unverified=True``). Nested states (optimizer, RNG) are flattened: tensors go to
``state.safetensors`` under dotted keys, everything else to ``state.json`` with
placeholders pointing at the keys.
"""
import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from qpeft.core.base.durable import fsync
from qpeft.core.base.errors import QpeftError

MARKER = "COMPLETE"
MANIFEST = "manifest.json"
DAMAGED = "damaged-"          # prefix of a damaged checkpoint set aside (never loaded again)
FILES = ("state.safetensors", "state.json")
_TENSOR = "__tensor__"


class CheckpointError(QpeftError):
    """A checkpoint could not be written (full disk, read-only directory, I/O error)."""


class DamagedCheckpoint(QpeftError):
    """A checkpoint failed verification; the message names the file and the fault."""


# -- the state as tensors + JSON ------------------------------------------------------------
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


# -- files ------------------------------------------------------------------------------------
def _digest(path: Path) -> dict:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return {"size": path.stat().st_size, "sha256": h.hexdigest()}


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def clean_temporaries(root: Path) -> None:
    """Remove what a killed :func:`save` left under ``root``.

    ``.tmp-step-*`` directories are deleted. An ``.old-step-N`` (an earlier ``step-N`` set
    aside while it was being replaced) is put back if ``step-N`` is missing, else deleted.
    Best effort: what cannot be removed now (read-only disk, another process first) stays.
    """
    root = Path(root)
    for tmp in root.glob(".tmp-step-*"):
        shutil.rmtree(tmp, ignore_errors=True)
    for old in root.glob(".old-step-*"):
        target = root / old.name[len(".old-"):]
        if target.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(old, target)
            except OSError:
                pass


# -- writing ----------------------------------------------------------------------------------
def save(directory: Path, state: dict, keep_old: Path | None = None) -> Path:
    """Write ``state`` (nested dicts of tensors and JSON values) atomically to ``directory``.

    An existing ``directory`` is replaced once the new one is whole; with ``keep_old`` it is
    renamed there instead of deleted (a damaged checkpoint kept aside). Raises :class:`CheckpointError` (one line) when the disk refuses; then no temporary
    directory is left and every earlier checkpoint, ``directory`` included, is unchanged.
    """
    directory = Path(directory)
    root, name = directory.parent, directory.name
    tmp = root / f".tmp-{name}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        clean_temporaries(root)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_contents(tmp, state)
        _put_in_place(tmp, directory, keep_old)
    except (OSError, SafetensorError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(_write_failure(name, root, e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def _write_contents(tmp: Path, state: dict) -> None:
    tensors: dict = {}
    skeleton = flatten(state, "s", tensors)
    save_file(tensors, str(tmp / "state.safetensors"))
    fsync(tmp / "state.safetensors")
    _write(tmp / "state.json", json.dumps(skeleton).encode())
    manifest = {"format": 1, "files": {f: _digest(tmp / f) for f in FILES}}
    _write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
    _write(tmp / MARKER, b"ok\n")  # last: a directory with the marker is whole
    fsync(tmp)


def _put_in_place(tmp: Path, directory: Path, keep_old: Path | None = None) -> None:
    """Rename ``tmp`` to ``directory``; an existing one is set aside until the new one is in
    (and then deleted, or left at ``keep_old``)."""
    old = keep_old or directory.with_name(f".old-{directory.name}")
    if directory.exists():  # e.g. a damaged step written again after a fallback
        if keep_old is None:
            shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        try:
            os.replace(tmp, directory)
        except BaseException:
            os.replace(old, directory)
            raise
    else:
        os.replace(tmp, directory)
    fsync(directory.parent)
    if keep_old is None:
        shutil.rmtree(old, ignore_errors=True)


def aside_name(directory: Path) -> Path:
    """Where :func:`set_aside` puts ``ROOT/step-N``: ``ROOT/damaged-step-N`` (``-2``, ``-3`` ...
    when that is taken). Not ``step-*``, so it is never loaded again."""
    directory = Path(directory)
    target, n = directory.with_name(DAMAGED + directory.name), 1
    while target.exists() or target.is_symlink():
        n += 1
        target = directory.with_name(f"{DAMAGED}{directory.name}-{n}")
    return target


def set_aside(directory: Path) -> Path:
    """Rename a damaged checkpoint to :func:`aside_name` (kept for a look, never loaded)."""
    target = aside_name(directory)
    os.replace(directory, target)
    fsync(target.parent)
    return target


def _reason(err: Exception) -> tuple[int | None, str]:
    """The errno and the one-line reason of an OSError, or of safetensors' wrapped one."""
    if isinstance(err, OSError):
        return err.errno, err.strerror or str(err)
    found = re.search(r"os error (\d+)", str(err))  # safetensors wraps I/O errors in SafetensorError
    if found:
        code = int(found.group(1))
        return code, os.strerror(code)
    return None, " ".join(str(err).split())


def _write_failure(name: str, root: Path, err: Exception) -> str:
    code, reason = _reason(err)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        hint = "free space there"
    elif code in (errno.EACCES, errno.EPERM, errno.EROFS):
        hint = f"make {root} writable"
    else:
        hint = "check the disk"
    return (f"cannot write checkpoint {name} under {root}: {reason}; {hint}, "
            "or pass --save-every 0 to train without checkpoints")


# -- reading ----------------------------------------------------------------------------------
def complete(root: Path) -> list[Path]:
    """The complete ``step-N`` checkpoints under ``root`` (marker present), newest first."""
    found = [(int(p.name[5:]), p) for p in Path(root).glob("step-*")
             if p.name[5:].isdigit() and (p / MARKER).is_file()]
    return [p for _, p in sorted(found, reverse=True)]


def latest(root: Path) -> Path | None:
    """The newest complete ``step-*`` checkpoint under ``root``, or None (not verified)."""
    done = complete(root)
    return done[0] if done else None


def verify(directory: Path) -> bool:
    """Check each file's size and SHA-256 against the manifest.

    True when verified, False when there is no manifest (written by an older qpeft);
    raises :class:`DamagedCheckpoint` naming the first bad file.
    """
    directory = Path(directory)
    if not (directory / MANIFEST).is_file():
        return False
    try:
        files = json.loads((directory / MANIFEST).read_text())["files"]
        entries = [(f, int(files[f]["size"]), str(files[f]["sha256"])) for f in FILES]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DamagedCheckpoint(f"{MANIFEST}: unreadable ({_one_line(e)})") from e
    for fname, size, sha in entries:
        path = directory / fname
        if not path.is_file():
            raise DamagedCheckpoint(f"{fname}: missing")
        have = path.stat().st_size
        if have != size:
            what = f"truncated, {have} of {size} bytes" if have < size else f"{have} bytes, expected {size}"
            raise DamagedCheckpoint(f"{fname}: {what}")
        if _digest(path)["sha256"] != sha:
            raise DamagedCheckpoint(f"{fname}: SHA-256 mismatch")
    return True


def load(directory: Path, check: bool = True) -> dict:
    """A state written by :func:`save`, verified against its manifest unless ``check`` is False.

    Raises :class:`DamagedCheckpoint` when a file differs from the manifest or does not parse.
    """
    directory = Path(directory)
    if check:
        verify(directory)
    try:
        tensors = load_file(str(directory / "state.safetensors"))
    except (OSError, SafetensorError) as e:
        raise DamagedCheckpoint(f"state.safetensors: {_one_line(e)}") from e
    try:
        skeleton = json.loads((directory / "state.json").read_text())
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"state.json: {_one_line(e)}") from e
    try:
        return unflatten(skeleton, tensors)
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedCheckpoint(f"state.json: does not match state.safetensors ({_one_line(e)})") from e


def load_newest(root: Path, say=print, unverified: bool = False,
                damaged: list | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint under ``root`` that verifies and parses, and its state.

    A damaged one is reported through ``say`` in one line (and appended to ``damaged``) and
    the previous one is tried. One without a manifest is loaded unverified, with a notice,
    only when ``unverified`` (the run was started by a qpeft that wrote no manifests);
    otherwise it counts as damaged. None when no checkpoint is usable.
    """
    candidates = complete(root)
    for i, directory in enumerate(candidates):
        try:
            verified = verify(directory)
            if not verified and not unverified:
                raise DamagedCheckpoint(f"{MANIFEST}: missing, and this run was started by a qpeft "
                                        "that writes one")
            state = load(directory, check=False)
        except DamagedCheckpoint as e:
            after = (f"falling back to {candidates[i + 1].name}" if i + 1 < len(candidates)
                     else "no earlier checkpoint to fall back to")
            say(f"qpeft: checkpoint {directory.name} is damaged ({e}); {after}")
            if damaged is not None:
                damaged.append(directory)
            continue
        if not verified:
            say(f"qpeft: checkpoint {directory.name} has no {MANIFEST} (written by an older qpeft); "
                "loaded without verification")
        return directory, state
    return None


def _one_line(err: Exception) -> str:
    text = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
    return " ".join(text.split())[:200]
