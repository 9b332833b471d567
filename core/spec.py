"""Plugin specs as users type them: ``hqq:nbits=2``, ``dora+loftq:iters=3``.

Grammar: components joined by ``+``; each is a plugin name followed by ``:key=value``
options. No commas, so a list of specs can be comma-separated
(``--quant none,nf4,hqq:nbits=2``).
"""
from qpeft.core.errors import OptionsError
from qpeft.core.options import parse_pairs


def parse(spec: str) -> list[tuple[str, dict]]:
    """``"lora:r=8+loftq:iters=2"`` → ``[("lora", {"r": "8"}), ("loftq", {"iters": "2"})]``."""
    if not spec or not spec.strip():
        raise OptionsError("empty plugin spec; type a name such as 'lora' or 'hqq:nbits=2'")
    out = []
    for part in spec.strip().split("+"):
        name, *pairs = part.strip().split(":")
        if not name:
            raise OptionsError(f"'{spec}' has an empty component; write e.g. 'dora+loftq'")
        out.append((name.strip(), parse_pairs(pairs, f"'{name}'")))
    return out


def split_list(value: str) -> list[str]:
    """``"none,nf4,hqq:nbits=2"`` → three specs."""
    return [v.strip() for v in value.split(",") if v.strip()]


def format_spec(parts: list[tuple[str, dict]]) -> str:
    """The inverse of :func:`parse` (used for run and row names)."""
    return "+".join(name + "".join(f":{k}={v}" for k, v in opts.items()) for name, opts in parts)
