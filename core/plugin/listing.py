"""What ``qpeft list`` prints, kept so that listing needs neither torch nor any plugin import.

Describing a plugin means importing its module, and a method's module defines its layers over
``torch.nn.Module``: the first listing costs the imports of torch, bitsandbytes and every
plugin (about 2 s here). The description is then kept under
``$QPEFT_CACHE/plugins/listing-KEY.json``, where KEY is the SHA-256 of what the description is a
function of — read without importing anything:

    qpeft                 its version and every source file of qpeft (path, size, mtime)
    each entry point      of group ``qpeft``: its name, value, distribution and version, and the
                          files of its top-level module or package (path, size, mtime)
    the environment       every installed distribution and its version (a dependency a plugin
                          needs, installed or removed, changes what loads); the Python version;
                          ``QPEFT_DISABLE_PLUGIN_AUTOLOAD``

A process that has loaded its registry already lists from it. A kept listing is used only
when its key is the current one; any other key loads the plugins
(:func:`qpeft.core.plugin.registry.default`) and writes a new one. Failures are kept with the
plugins, so a broken plugin is reported by name either way. ``QPEFT_STRICT_PLUGINS=1`` always
loads (strict mode must raise on a broken plugin). Built-ins and third-party plugins are treated
alike.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import sys
from pathlib import Path

from qpeft.core.base.cache import cache_dir
from qpeft.core.base.options import describe
from qpeft.core.base.version import __version__
from qpeft.core.plugin import hookspecs, registry

FORMAT = 1
KEEP = 4            # listings kept (environments sharing one cache: venvs, versions)


def plugin_record(cls) -> dict:
    """A plugin as a JSON-able record."""
    record = {"name": cls.name, "kind": cls.kind, "description": cls.description,
              "origin": cls.origin.distribution if cls.origin else None,
              "version": cls.origin.version if cls.origin else None,
              "options": describe(cls.Options)}
    record.update(cls.listing_extras())
    return record


def records(reg) -> dict:
    """Every plugin of ``reg`` by kind, and the plugins that failed to load."""
    out = {k: [plugin_record(reg.get(k, n)) for n in reg.names(k)] for k in registry.KINDS}
    out["failures"] = [{"name": f.name, "origin": f.origin.distribution,
                        "version": f.origin.version, "error": f.error} for f in reg.failures]
    return json.loads(json.dumps(out, default=str))     # what a kept listing reads back, exactly


def listing(kind: str | None = None) -> dict:
    """Plugins (optionally of one kind) and the failures."""
    data = every_plugin()
    return {k: data[k] for k in ([kind] if kind else registry.KINDS)} | {"failures": data["failures"]}


def every_plugin() -> dict:
    """:func:`records` of the process's registry once it is loaded; else the kept listing of
    this environment; else loaded, then kept."""
    if registry._default is not None:
        return records(registry._default)
    key = environment_key()
    data = None if os.environ.get("QPEFT_STRICT_PLUGINS") == "1" else read(key)
    if data is None:
        data = records(registry.default())
        write(key, data)
    return data


# -- the key ---------------------------------------------------------------------------------
def _stamp(root: Path, digest) -> None:
    """Add every source file under ``root`` (or ``root`` itself): its path, size and mtime."""
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json"))
    for path in files:
        stat = path.stat()
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())


def _module_root(module: str) -> Path | None:
    """The file or package directory of a top-level module, found without running it."""
    try:
        spec = importlib.util.find_spec(module.split(".")[0])
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    if spec.submodule_search_locations:
        return Path(next(iter(spec.submodule_search_locations)))
    return Path(spec.origin) if spec.origin and os.path.exists(spec.origin) else None


def environment_key() -> str:
    """The SHA-256 of everything a listing depends on (the module docstring's table)."""
    digest = hashlib.sha256(f"{FORMAT}\0{__version__}\0{sys.version_info[:2]}\0"
                            f"{os.environ.get('QPEFT_DISABLE_PLUGIN_AUTOLOAD') == '1'}\n".encode())
    import qpeft.core
    import qpeft.plugins

    for package in (qpeft.core, qpeft.plugins):
        for where in package.__path__:
            _stamp(Path(where), digest)
    for ep in sorted(importlib.metadata.entry_points(group=hookspecs.PROJECT), key=lambda e: e.name):
        dist = getattr(ep, "dist", None)
        digest.update(f"ep\0{ep.name}\0{ep.value}\0{dist.name if dist else ''}\0"
                      f"{dist.version if dist else ''}\n".encode())
        root = _module_root(ep.value.split(":")[0])
        if root is not None:
            _stamp(root, digest)
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    digest.update("\n".join(installed).encode())
    return digest.hexdigest()


# -- the file --------------------------------------------------------------------------------
def path(key: str) -> Path:
    return cache_dir() / "plugins" / f"listing-{key[:32]}.json"


def read(key: str) -> dict | None:
    """The listing kept under ``key``, or None (missing, damaged, or another key's)."""
    try:
        data = json.loads(path(key).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return data.get("listing")


def write(key: str, data: dict) -> None:
    """Keep ``data`` under ``key`` (atomically), and the :data:`KEEP` newest others. A read-only
    cache only means that the next listing loads the plugins again."""
    target = path(key)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "qpeft": __version__, "listing": data}))
        os.replace(tmp, target)
        kept = sorted(target.parent.glob("listing-*.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        for old in kept[KEEP:]:
            old.unlink(missing_ok=True)
    except OSError:
        pass
