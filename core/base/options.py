"""Plugin options: a dataclass per plugin, built from a dict or ``key=value`` strings.

Every field carries its help text in ``metadata["help"]`` (use :func:`option`). Building
options rejects unknown keys and values of the wrong type with a message naming the
plugin, the key and what to type instead.
"""
import dataclasses
import types
import typing
from typing import Any, Literal

from qpeft.core.base.errors import OptionsError, unknown


def option(default: Any, help: str, **kwargs) -> Any:
    """A dataclass field with help text; list/dict defaults are copied per instance."""
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default),
                                 metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclasses.dataclass
class NoOptions:
    """A plugin without options."""


def describe(options_cls) -> list[dict]:
    """Name, type, default and help of every option, for listings and docs."""
    hints = typing.get_type_hints(options_cls)
    rows = []
    for f in dataclasses.fields(options_cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        rows.append({"name": f.name, "type": _type_name(hints[f.name]),
                     "default": default, "help": f.metadata.get("help", "")})
    return rows


def build(options_cls, values: dict | None, owner: str):
    """Options of type ``options_cls`` from ``values``; ``owner`` names the plugin in errors."""
    values = dict(values or {})
    hints = typing.get_type_hints(options_cls)
    known = [f.name for f in dataclasses.fields(options_cls)]
    kwargs = {}
    for key, raw in values.items():
        if key not in known:
            if not known:
                raise OptionsError(f"{owner} takes no options; remove '{key}'")
            raise OptionsError(unknown("option", key, known, lead=f"{owner} has no option '{key}'"))
        kwargs[key] = coerce(raw, hints[key], f"{owner} option '{key}'")
    try:
        return options_cls(**kwargs)
    except (ValueError, TypeError) as exc:  # range checks in __post_init__
        raise OptionsError(f"{owner}: {exc}") from None


def parse_pairs(pairs, owner: str) -> dict:
    """``["r=16", "alpha=32"]`` → ``{"r": "16", "alpha": "32"}``."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise OptionsError(f"{owner}: expected key=value, got '{pair}'")
        if key.strip() in out:
            raise OptionsError(f"{owner}: option '{key.strip()}' is given twice; keep one")
        out[key.strip()] = value.strip()
    return out


def coerce(value: Any, typ: Any, where: str) -> Any:
    """``value`` converted to ``typ`` (strings from the command line are parsed)."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            if type(None) in args:
                return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], where) if len(inner) == 1 else value
    if origin is Literal:
        if value not in args:
            raise OptionsError(f"{where} must be one of {', '.join(map(str, args))}; got '{value}'"
                               + _comma_hint(value))
        return value
    if origin in (tuple, list):
        items = value.split(",") if isinstance(value, str) else value
        if not isinstance(items, (list, tuple)):
            raise OptionsError(f"{where} expects a list, got {value!r}")
        inner = args[0] if args else str
        items = [coerce(v.strip() if isinstance(v, str) else v, inner, where) for v in items]
        return origin(x for x in items if x != "")
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise OptionsError(f"{where} expects true or false, got {value!r}" + _comma_hint(value))
    if typ in (int, float):
        if isinstance(value, bool):
            raise OptionsError(f"{where} expects {typ.__name__}, got {value!r}")
        try:
            out = typ(value)
        except (TypeError, ValueError):
            raise OptionsError(f"{where} expects {typ.__name__}, got {value!r}" + _comma_hint(value)) from None
        if typ is int and isinstance(value, float) and value != out:
            raise OptionsError(f"{where} expects int, got {value!r}")
        return out
    if typ is str:
        if not isinstance(value, str):
            raise OptionsError(f"{where} expects text, got {value!r}")
        return value
    return value


def _comma_hint(value) -> str:
    """For a one-value option given ``"4,dora"``: commas are list items, not a list of specs."""
    if isinstance(value, str) and "," in value:
        return "; ',' separates the items of a list option only: separate specs with ';'"
    return ""


def _type_name(typ) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Literal:
        return "|".join(map(str, args))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list of {_type_name(args[0]) if args else 'str'}"
    return "none" if typ is type(None) else getattr(typ, "__name__", str(typ))
