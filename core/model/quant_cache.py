"""The quantized-base cache: each base quantized once, read back by every later load (issue 20).

Every run, evaluation, export and ``compare`` cell with the same base model and quantizer
computes the same quantized layers; an HQQ grid row on a 1 B model spent more time quantizing
than training. :func:`qpeft.core.model.streaming.load_quantized` keeps them under
``$QPEFT_QUANT_CACHE`` (else ``$QPEFT_CACHE/quantized``), one directory per KEY, the SHA-256 of::

    the base model's content   the SHA-256 of each of its files (a .gguf, or a directory's
                               files), not its path; memoised by (path, size, mtime)
    the quantizer              name, options (the compute dtype resolved), origin and
                               ``cache_version``; the compute dtype
    where                      the device type (cpu/cuda) and torch's version

    KEY/layers.safetensors     every quantized layer's ``cache_tensors()``, ``<layer>.<tensor>``
    KEY/entry.json             the key, a summary (model, quantizer, dtype) and the layer names
    KEY/manifest.json          size and SHA-256 of both, as checkpoints have (core/train/checkpoint.py)

Only the quantized layers are kept: the other tensors (embeddings, norms, head) are read from
the base's checkpoint as on any load, so one entry serves float32 activations or not. An entry
is built in ``.tmp-*`` beside the others and renamed into place, so a killed run never leaves
one that loads; a damaged one is removed and made again, with one line. The cache never holds
more than ``$QPEFT_QUANT_CACHE_GB`` (default 20) GB: the least recently used entries go first.
A quantizer that does not implement ``Quantizer.layer_from_cache`` is not cached.
"""
import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path

from qpeft.core.base.cache import cache_dir
from qpeft.core.base.durable import fsync
from qpeft.core.base.errors import QpeftError
from qpeft.core.model import models

CHUNK = 1 << 22
FORMAT = 1
DEFAULT_LIMIT_GB = 20.0
LAYERS, ENTRY, MANIFEST = "layers.safetensors", "entry.json", "manifest.json"


def directory() -> Path:
    """``$QPEFT_QUANT_CACHE``, else ``$QPEFT_CACHE/quantized``."""
    return Path(os.environ.get("QPEFT_QUANT_CACHE") or cache_dir() / "quantized").expanduser()


def limit_bytes() -> int:
    """The cache's size limit: ``$QPEFT_QUANT_CACHE_GB`` gigabytes (decimal), default 20."""
    raw = os.environ.get("QPEFT_QUANT_CACHE_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_LIMIT_GB
    except ValueError:
        gb = -1.0
    if gb < 0:
        raise QpeftError(f"QPEFT_QUANT_CACHE_GB must be a number of gigabytes >= 0, got '{raw}' "
                         "(e.g. QPEFT_QUANT_CACHE_GB=50; 0 disables the quantized-base cache)")
    return int(gb * 1e9)


def file_sha256(path: Path, memo: dict) -> str:
    """The SHA-256 of ``path``, from ``memo`` when its size and mtime are those it was hashed at."""
    stat = path.stat()
    key, stamp = str(path.resolve()), [stat.st_size, stat.st_mtime_ns]
    if key in memo and memo[key][:2] == stamp:
        return memo[key][2]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    memo[key] = [*stamp, digest.hexdigest()]
    return memo[key][2]


def model_content(spec: str | None, memo_file: Path | None = None) -> str:
    """A SHA-256 standing for the base model's bytes (its files'), whatever path names it;
    the files' hashes are memoised in ``memo_file`` (default: ``file-hashes.json`` in :func:`directory`)."""
    where = models.locate(spec)
    if isinstance(where, str):          # a hub id resolved offline by transformers: its name
        return hashlib.sha256(where.encode()).hexdigest()
    memo_file = memo_file or directory() / "file-hashes.json"
    try:
        memo = json.loads(memo_file.read_text())
    except (OSError, ValueError):
        memo = {}
    files = [where] if where.is_file() else sorted(
        f for f in where.iterdir() if f.is_file() and not f.name.startswith("."))
    content = hashlib.sha256(json.dumps([[f.name, file_sha256(f, memo)] for f in files]).encode()).hexdigest()
    try:
        write_json(memo_file, memo)
    except OSError:
        pass
    return content


def quantizer_key(quantizer) -> dict:
    """Name, options, origin and ``cache_version`` of a quantizer (the baseline cache's key
    holds the same name, options and origin)."""
    origin = getattr(quantizer, "origin", None)
    return {"name": quantizer.name, "options": dataclasses.asdict(quantizer.options),
            "origin": str(origin) if origin else None, "version": getattr(quantizer, "cache_version", 1)}


def key(spec: str | None, quantizer, device) -> dict:
    """What the quantized layers of ``spec`` by ``quantizer`` on ``device`` are a function of."""
    import torch

    return {"format": FORMAT, "model": model_content(spec), "quantizer": quantizer_key(quantizer),
            "compute_dtype": str(quantizer.compute_dtype), "device": torch.device(device).type,
            "torch": torch.__version__}


def entry_dir(k: dict) -> Path:
    return directory() / hashlib.sha256(json.dumps(k, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _digest(path: Path) -> dict:
    return {"size": path.stat().st_size, "sha256": file_sha256(path, {})}


def verify(entry: Path, k: dict) -> str | None:
    """None when ``entry`` is whole and made for key ``k``, else what is wrong (a few words)."""
    try:
        manifest = json.loads((entry / MANIFEST).read_text())
        for name in (LAYERS, ENTRY):
            want = manifest["files"][name]
            if (entry / name).stat().st_size != int(want["size"]):
                return f"{name} has the wrong size"
            if _digest(entry / name)["sha256"] != want["sha256"]:
                return f"{name} does not match its SHA-256"
        saved = json.loads((entry / ENTRY).read_text())
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"unreadable ({type(exc).__name__})"
    if saved.get("key") != json.loads(json.dumps(k, default=str)):
        return "made for another key"
    return None


class Reader:
    """The layers of a verified entry, read one at a time (each through its own ``safe_open``,
    as the streaming loader reads a checkpoint)."""

    def __init__(self, entry: Path):
        self.entry = entry
        self.layers = json.loads((entry / ENTRY).read_text())["layers"]

    def tensors(self, name: str, device) -> dict:
        from safetensors import safe_open

        with safe_open(self.entry / LAYERS, framework="pt", device=str(device)) as f:
            return {t: f.get_tensor(f"{name}.{t}") for t in self.layers[name]}


def lookup(spec, quantizer, device, say) -> tuple[dict, Reader | None]:
    """``(key, reader)``: the entry of this base and quantizer when it is there and whole;
    a damaged one is removed, with one line (the load then makes it again)."""
    k = key(spec, quantizer, device)
    entry = entry_dir(k)
    if not entry.is_dir():
        return k, None
    problem = verify(entry, k)
    if problem:
        say(f"quantized-base cache: {entry.name} is damaged ({problem}); quantizing again and replacing it")
        shutil.rmtree(entry, ignore_errors=True)
        return k, None
    os.utime(entry)                      # last used: eviction goes least recently used first
    return k, Reader(entry)


def store(k: dict, layers: dict, summary: dict, say) -> Path | None:
    """Write ``layers`` (name → QuantizedLinear) as the entry of ``k``; returns its directory,
    or None when it would not fit under the limit or could not be written (said in one line)."""
    from safetensors.torch import save_file

    tensors, names = {}, {}
    for name, layer in layers.items():
        own = layer.cache_tensors()
        names[name] = sorted(own)
        for t_name, t in own.items():
            tensors[f"{name}.{t_name}"] = t.detach().to("cpu").contiguous()
    limit = limit_bytes()
    if sum(t.numel() * t.element_size() for t in tensors.values()) > limit:
        say(f"quantized-base cache: not kept (it is over the {limit / 1e9:g} GB limit; raise QPEFT_QUANT_CACHE_GB)")
        return None
    entry = entry_dir(k)
    staged = entry.with_name(f".tmp-{entry.name}-{os.getpid()}")
    try:
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        try:
            save_file(tensors, staged / LAYERS)
        except RuntimeError:             # storage shared between tensors: safetensors refuses it
            save_file({n: t.clone() for n, t in tensors.items()}, staged / LAYERS)
        now = time.time()
        write_json(staged / ENTRY, {"key": k, "summary": summary, "created": now, "layers": names})
        files = {name: _digest(staged / name) for name in (LAYERS, ENTRY)}
        write_json(staged / MANIFEST, {"format": FORMAT, "files": files})
        for name in (LAYERS, ENTRY, MANIFEST):
            fsync(staged / name)
        size = sum(f.stat().st_size for f in staged.iterdir())
        if size > limit:
            shutil.rmtree(staged, ignore_errors=True)
            say(f"quantized-base cache: not kept (it is over the {limit / 1e9:g} GB limit; raise QPEFT_QUANT_CACHE_GB)")
            return None
        evict(limit - size)
        try:
            os.replace(staged, entry)
        except OSError:
            if not entry.is_dir():
                raise
            shutil.rmtree(staged, ignore_errors=True)   # another process stored it first
            return entry
        fsync(entry.parent)
    except OSError as exc:
        shutil.rmtree(staged, ignore_errors=True)
        say(f"quantized-base cache: not kept ({exc.strerror or exc}); the run goes on")
        return None
    return entry


@dataclasses.dataclass
class Entry:
    path: Path
    summary: dict
    size: int
    created: float
    used: float


def entries() -> list[Entry]:
    """Every entry of the cache (whole or not), least recently used first."""
    found = []
    root = directory()
    for path in root.iterdir() if root.is_dir() else ():
        if not path.is_dir() or path.name.startswith("."):
            continue
        try:
            saved = json.loads((path / ENTRY).read_text())
            summary, created = saved.get("summary", {}), float(saved.get("created", 0))
        except (OSError, ValueError, AttributeError):
            summary, created = {}, path.stat().st_mtime
        size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
        found.append(Entry(path, summary, size, created, path.stat().st_mtime))
    return sorted(found, key=lambda e: e.used)


def evict(room: int) -> list[Entry]:
    """Remove the least recently used entries until the others take at most ``room`` bytes;
    temporaries of processes that died are removed too. Returns the entries removed."""
    root = directory()
    for tmp in root.glob(".tmp-*") if root.is_dir() else ():
        pid = tmp.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
    present = entries()
    total, removed = sum(e.size for e in present), []
    for e in present:
        if total <= room:
            break
        shutil.rmtree(e.path, ignore_errors=True)
        total -= e.size
        removed.append(e)
    return removed


def clear(older_than: float | None = None) -> list[Entry]:
    """Remove every entry, or those not used for ``older_than`` seconds; returns them."""
    now = time.time()
    removed = [e for e in entries() if older_than is None or now - e.used > older_than]
    for e in removed:
        shutil.rmtree(e.path, ignore_errors=True)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_json(path: Path, data) -> None:
    """``data`` as JSON at ``path``, written beside it and renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}")
    staged.write_text(json.dumps(data, indent=1, sort_keys=True, default=str))
    os.replace(staged, path)
