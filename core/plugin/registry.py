"""Plugin discovery: built-ins and entry points (group ``qpeft``), each loaded on its own.

A plugin module that fails to import is recorded as a :class:`Failure` and reported by
name; every other plugin keeps working. ``QPEFT_STRICT_PLUGINS=1`` makes a failure fatal;
``QPEFT_DISABLE_PLUGIN_AUTOLOAD=1`` loads the built-ins only. Built-in modules are found by
walking ``qpeft.plugins`` — there is no hand-kept list — and register through the very
hooks a third-party package implements.

``register(cls)`` checks each class fully (:meth:`Plugin.problems`: role, slots, required
methods, misspelled hooks; then, once all are in, :meth:`Plugin.problems_among`: a modifier
of a slot no method declares). A refused class is a failure like a broken module: reported
by name, class and distribution, and skipped — or fatal under ``QPEFT_STRICT_PLUGINS=1``.
"""
import dataclasses
import importlib
import importlib.metadata
import json
import os
import pkgutil
import sys
import traceback
from pathlib import Path

import pluggy

from qpeft.core.plugin import hookspecs
from qpeft.core.base.errors import PluginLoadError, QpeftError, UnknownPluginError, closest, unknown
from qpeft.core.plugin.base import Origin, Plugin
from qpeft.core.base.version import __version__

KINDS = {"quantizer": "register_quantizers", "adapter": "register_adapters",
         "evaluator": "register_evaluators"}
BUILTIN = Origin("qpeft", __version__)


@dataclasses.dataclass
class Failure:
    """A plugin that could not be loaded or registered."""

    name: str          # entry-point or module name: the name it would have provided
    origin: Origin
    error: str         # "ModuleNotFoundError: No module named 'x'"
    detail: str = ""   # the traceback, for --debug

    def message(self) -> str:
        return (f"plugin '{self.name}' from {self.origin} failed to load ({self.error}); "
                f"{fix_hint(self.origin.distribution)}")


def fix_hint(distribution: str) -> str:
    """What to do about a broken distribution: edit the source of an editable install
    (``pip install -e``: reinstalling changes nothing), else reinstall it."""
    where = None
    try:
        dist = importlib.metadata.distribution(distribution)
        raw = dist.read_text("direct_url.json")
        info = json.loads(raw) if raw else {}
        if info.get("dir_info", {}).get("editable"):
            where = info.get("url", "").removeprefix("file://")
        else:                 # metadata beside the source (a checkout's .egg-info)
            home = Path(dist.locate_file("")).resolve()
            checkout = any((home / f).is_file() for f in ("pyproject.toml", "setup.py"))
            where = str(home) if checkout else None
    except (importlib.metadata.PackageNotFoundError, ValueError, OSError):
        pass
    if where:
        return f"fix its source in {where} (an editable install: reinstalling changes nothing)"
    return f"fix or reinstall it: pip install --force-reinstall {distribution}"


class Registry:
    """Plugins by kind and name, with their origins and the failures met loading them."""

    def __init__(self, builtins: bool = True, entry_points=None, strict: bool | None = None):
        self.strict = os.environ.get("QPEFT_STRICT_PLUGINS") == "1" if strict is None else strict
        self.plugins: dict[str, dict[str, type[Plugin]]] = {kind: {} for kind in KINDS}
        self.failures: list[Failure] = []
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._origins: dict[int, Origin] = {}
        if builtins:
            self._load_builtins()
        if entry_points is None and os.environ.get("QPEFT_DISABLE_PLUGIN_AUTOLOAD") != "1":
            entry_points = importlib.metadata.entry_points(group=hookspecs.PROJECT)
        for ep in entry_points or ():
            self._load_entry_point(ep)
        self._collect()

    # -- loading ---------------------------------------------------------------------
    def add(self, plugin_object, origin: Origin, name: str | None = None) -> None:
        """Register a module or object holding hook implementations (tests use this)."""
        self.pm.register(plugin_object, name=name)
        self._origins[id(plugin_object)] = origin

    def _load_builtins(self) -> None:
        import qpeft.plugins as root
        for pkg in pkgutil.iter_modules(root.__path__, root.__name__ + "."):
            for mod in pkgutil.iter_modules(importlib.import_module(pkg.name).__path__):
                if mod.name.startswith("_"):
                    continue
                self._try(mod.name, BUILTIN, lambda: importlib.import_module(f"{pkg.name}.{mod.name}"))

    def _load_entry_point(self, ep) -> None:
        dist = getattr(ep, "dist", None)
        origin = Origin(dist.name, dist.version) if dist else Origin(ep.value.split(":")[0], "?")
        self._try(ep.name, origin, ep.load)

    def _try(self, name: str, origin: Origin, load) -> None:
        try:
            plugin_object = load()
            self.add(plugin_object, origin, name=f"{origin.distribution}:{name}")
            self._check_hooks(plugin_object)
        except Exception as exc:  # a broken plugin never takes the others down
            self._fail(name, origin, exc)

    def _check_hooks(self, plugin_object) -> None:
        """Refuse a hook implementation no spec declares (a misspelled ``register_adaptors``
        would otherwise register nothing, silently) — pluggy's ``check_pending``, per plugin."""
        for caller in self.pm.get_hookcallers(plugin_object) or ():
            if caller.spec is None:
                self.pm.unregister(plugin_object)
                near = closest(caller.name, KINDS.values())
                raise QpeftError(f"it implements '{caller.name}', which is not a qpeft hook"
                                 + (f"; did you mean '{near}'?" if near else
                                    f"; the hooks are {', '.join(KINDS.values())}"))

    def _fail(self, name: str, origin: Origin, exc: BaseException) -> None:
        failure = Failure(name, origin, f"{type(exc).__name__}: {exc}", traceback.format_exc())
        if self.strict:
            raise PluginLoadError(failure.message() + " [QPEFT_STRICT_PLUGINS=1]") from exc
        self.failures.append(failure)
        print(f"qpeft: warning: {failure.message()}", file=sys.stderr)

    def _collect(self) -> None:
        for kind, hook_name in KINDS.items():
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                origin = self._origins.get(id(impl.plugin), BUILTIN)
                register = self._registrar(kind, origin)
                try:
                    impl.function(**{arg: register for arg in impl.argnames if arg == "register"})
                except PluginLoadError:
                    raise                       # strict mode: already one line
                except Exception as exc:
                    self._fail(self.pm.get_name(impl.plugin).split(":")[-1], origin, exc)
        self._check_peers()

    def _check_peers(self) -> None:
        """Once all are registered, drop classes whose problems show only beside their peers
        (a modifier of a slot no method has); repeated, since a dropped method can orphan a
        modifier."""
        dropped = True
        while dropped:
            dropped = False
            for plugins in self.plugins.values():
                for name, cls in list(plugins.items()):
                    problems = cls.problems_among(plugins)
                    if problems:
                        del plugins[name]
                        self._refuse(cls, problems)
                        dropped = True

    def _refuse(self, cls, problems: list[str]) -> None:
        """Report a class that cannot be registered, by name, class and distribution."""
        error = QpeftError(f"{cls.kind} class {cls.__module__}.{cls.__qualname__} "
                           f"{'; '.join(problems)}")
        self._fail(cls.name or cls.__name__, cls.origin or BUILTIN, error)

    def _registrar(self, kind: str, origin: Origin):
        def register(cls):
            if not (isinstance(cls, type) and issubclass(cls, Plugin) and cls.kind == kind):
                raise QpeftError(f"{cls!r} is not a {kind} plugin class")
            if not cls.name or not cls.name.replace("_", "").replace("-", "").isalnum():
                raise QpeftError(f"{cls.__name__} needs a name of letters, digits, '-' or '_'")
            existing = self.plugins[kind].get(cls.name)
            if existing is not None and existing is not cls:
                raise QpeftError(f"{kind} '{cls.name}' is already provided by {existing.origin}")
            cls.origin = origin
            problems = cls.problems()
            if problems:           # reported and skipped; the hook's other classes still register
                self._refuse(cls, problems)
                return cls
            self.plugins[kind][cls.name] = cls
            return cls
        return register

    # -- lookups ---------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._kind(kind))

    def get(self, kind: str, name: str) -> type[Plugin]:
        plugins = self._kind(kind)
        if name in plugins:
            return plugins[name]
        for failure in self.failures:
            if failure.name == name:
                raise PluginLoadError(f"{kind} '{name}' is unavailable: {failure.message()}")
        raise UnknownPluginError(unknown(kind, name, plugins, "See them all with 'qpeft list'"))

    def _kind(self, kind: str) -> dict:
        if kind not in self.plugins:
            raise QpeftError(unknown("plugin kind", kind, KINDS))
        return self.plugins[kind]


_default: Registry | None = None


def default() -> Registry:
    """The process-wide registry, built on first use."""
    global _default
    if _default is None:
        from qpeft.core.plugin.install_check import shadow_problem

        problem = shadow_problem()
        if problem:
            raise PluginLoadError(problem)
        _default = Registry()
    return _default


def reload() -> Registry:
    """Forget the process-wide registry and discover plugins again."""
    global _default
    _default = None
    return default()


def names(kind: str) -> list[str]:
    """Sorted names of the plugins of ``kind`` ("quantizer", "adapter" or "evaluator")."""
    return default().names(kind)


def get(kind: str, name: str) -> type[Plugin]:
    """The plugin class ``name`` of ``kind``; its ``origin`` tells where it came from."""
    return default().get(kind, name)


def failures() -> list[Failure]:
    """Plugins that failed to load, with the error each raised."""
    return list(default().failures)


def all_plugins() -> dict[str, list[type[Plugin]]]:
    """Every plugin class, by kind, sorted by name."""
    reg = default()
    return {kind: [reg.plugins[kind][n] for n in reg.names(kind)] for kind in KINDS}
