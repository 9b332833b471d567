"""What every plugin is: a class with a name, a one-line description and an Options dataclass.

The three kinds (Quantizer, Adapter, Evaluator) subclass :class:`Plugin`. The registry
stamps each registered class with its :class:`Origin` — the distribution that provided it.
"""
import dataclasses
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
