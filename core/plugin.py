"""What every plugin is: a class with a name, a one-line description and an Options dataclass.

The three kinds (Quantizer, Adapter, Evaluator) subclass :class:`Plugin`. The registry
stamps each registered class with its :class:`Origin` — the distribution that provided it.

The lifecycle is declared, never probed: every method the core may call on a plugin is a
method of its kind's base class — ``required_methods`` that a plugin must define, and
optional hooks with documented no-op defaults. :meth:`Plugin.problems` checks a class
against them at registration, so a missing method or a misspelled hook (``on_step_begun``)
is reported then, not discovered mid-run.
"""
import dataclasses
import difflib
from typing import ClassVar

from qpeft.core import options as opts


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a plugin came from: a distribution name and version ("qpeft" for built-ins)."""

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


class Plugin:
    """Base of the three plugin kinds. Subclasses set ``name`` and ``description``."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = opts.NoOptions
    origin: ClassVar[Origin | None] = None
    required_methods: ClassVar[tuple[str, ...]] = ()   # a concrete plugin must define these

    def __init__(self, options=None, **values):
        """Build from an Options instance, or from keyword values checked against Options."""
        if options is None:
            options = opts.build(self.Options, values, f"{self.kind} '{self.name}'")
        elif values:
            raise TypeError("pass either an Options instance or keyword values, not both")
        self.options = options

    @classmethod
    def from_values(cls, values: dict | None):
        """An instance from a dict of option values (strings are parsed)."""
        return cls(opts.build(cls.Options, values, f"{cls.kind} '{cls.name}'"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- lifecycle hooks (optional; the defaults do nothing) ---------------------------
    def on_step_begin(self, step: int, model) -> None:
        """Called by the trainer on every plugin of a run (quantizer, adapter parts,
        evaluators) before optimizer step ``step`` (0-based) — QDyLoRA samples its rank
        here. Default: nothing."""

    @classmethod
    def listing_extras(cls) -> dict:
        """Extra fields ``qpeft list`` shows for this class (an adapter's role). Default: none."""
        return {}

    # -- registration checks -------------------------------------------------------------
    @classmethod
    def implements(cls, hook: str) -> bool:
        """True when this class overrides the declared default of ``hook``."""
        owners = [c for c in cls.__mro__ if hook in vars(c)]
        return bool(owners) and owners[0] is not owners[-1]

    @classmethod
    def problems(cls) -> list[str]:
        """What makes this class unusable as a plugin, one short phrase each (empty: none).

        A kind or plugin base adds its own checks by extending this list."""
        found = [f"does not define {name}()" for name in cls.required_methods
                 if not cls.implements(name)]
        return found + near_misses(cls, Plugin)

    @classmethod
    def problems_among(cls, peers: dict) -> list[str]:
        """Problems that show only beside the other registered plugins of its kind
        (``peers``: name → class), checked once every plugin is registered. Default: none."""
        return []


def declared_names(classes) -> set[str]:
    """Public names that qpeft's own classes among ``classes`` declare."""
    return {n for c in classes if c.__module__.startswith("qpeft.")
            for n in vars(c) if not n.startswith("_")}


def near_misses(cls: type, base: type) -> list[str]:
    """Names ``cls`` (or a class between it and ``base``) defines that are a near miss of a
    name its qpeft ancestors declare (``finish_inits`` for ``finish_init``): a misspelled
    hook would never run."""
    found = []
    for c in cls.__mro__:
        if c is base or not issubclass(c, base) or c.__module__.startswith("qpeft.core"):
            continue
        declared = declared_names(c.__mro__[1:])
        for name in vars(c):
            near = difflib.get_close_matches(name, declared, n=1, cutoff=0.85)
            if near and not name.startswith("_") and name not in declared:
                found.append(f"defines '{name}', which nothing calls; did you mean '{near[0]}'?")
    return found
