"""Plugin specs as users type them: ``hqq:nbits=2``, ``dora+loftq:iters=3``, and lists of them.

Grammar (the same in flags and config files)::

    list   := spec (";" spec)*        or the flag repeated, or a YAML list of specs
    spec   := part ("+" part)*        adapters compose parts; other kinds take one
    part   := NAME (":" KEY "=" VALUE)*
    VALUE  := text without ":" "+" ";"; a list-valued option separates its items with ","

So ``--quant "none;nf4;hqq:nbits=2"`` is three quantizers and
``--adapter "lora:targets=q_proj,v_proj;dora"`` two adapters, the first adapting q_proj and
v_proj. A comma never separates specs: ``none,nf4`` is refused with the ``;`` form to type
(plugin names hold letters, digits, ``-`` and ``_`` only), so no list is guessed at.
"""
from qpeft.core.base.errors import OptionsError
from qpeft.core.base.options import parse_pairs

SEPARATOR = ";"


def parse(spec: str) -> list[tuple[str, dict]]:
    """``"lora:r=8+loftq:iters=2"`` → ``[("lora", {"r": "8"}), ("loftq", {"iters": "2"})]``."""
    if not isinstance(spec, str) or not spec.strip():
        raise OptionsError("empty plugin spec; type a name such as 'lora' or 'hqq:nbits=2'")
    if SEPARATOR in spec:
        raise OptionsError(f"'{spec}' holds several specs (';'); this setting takes one")
    out = []
    for part in spec.strip().split("+"):
        name, *pairs = part.strip().split(":")
        name = name.strip()
        if not name:
            raise OptionsError(f"'{spec}' has an empty component; write e.g. 'dora+loftq'")
        if "," in name:
            raise OptionsError(f"'{spec}': a plugin name cannot hold ','; separate specs with ';' "
                               f"(e.g. '{comma_fix(spec)}') or repeat the flag")
        out.append((name, parse_pairs(pairs, f"'{name}'")))
    return out


def comma_fix(text: str) -> str:
    """``"none,nf4,hqq:nbits=2"`` → ``"none;nf4;hqq:nbits=2"``: commas in plugin-name
    position become ``;`` (commas inside option values stay), for error messages."""
    parts = []
    for part in text.split("+"):
        name, colon, rest = part.partition(":")
        parts.append(name.replace(",", SEPARATOR) + colon + rest)
    return "+".join(parts)


def split_list(value) -> list[str]:
    """``"none;nf4;hqq:nbits=2"`` (or a list of such strings: a repeated flag, a YAML list)
    → three specs, each checked by :func:`parse`."""
    items = [value] if isinstance(value, str) else list(value or ())
    specs = []
    for item in items:
        if not isinstance(item, str):
            raise OptionsError(f"a plugin spec is text such as 'hqq:nbits=2', got {item!r}")
        specs += [s.strip() for s in item.split(SEPARATOR) if s.strip()]
    for s in specs:
        parse(s)
    return specs


def join_list(specs) -> str:
    """The inverse of :func:`split_list`: ``["none", "nf4"]`` → ``"none;nf4"``."""
    return SEPARATOR.join(split_list(specs))


def format_spec(parts: list[tuple[str, dict]]) -> str:
    """The inverse of :func:`parse` (used for run and row names)."""
    return "+".join(name + "".join(f":{k}={v}" for k, v in opts.items()) for name, opts in parts)
