"""``qpeft cache``: the quantized-base cache shown and freed (:mod:`qpeft.core.model.quant_cache`).

    qpeft cache list                   model, quantizer, dtype, size, age, last use of each entry
    qpeft cache clear [--older-than 7d]   remove every entry, or those unused for that long
"""
import re
import time

import click

from qpeft.core.base.errors import QpeftError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def duration(text: str) -> float:
    """Seconds in ``30m``, ``12h``, ``7d``, ``2w``; anything else is a one-line error."""
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not found:
        raise QpeftError(f"--older-than takes a number and a unit (s, m, h, d, w), got '{text}'; "
                         "e.g. --older-than 7d")
    return float(found[1]) * UNITS[found[2]]


def ago(seconds: float) -> str:
    """``45 s``, ``12 min``, ``3.0 h``, ``2.5 d``."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} d"


@click.group("cache")
def cache_command() -> None:
    """Show or free the quantized-base cache ($QPEFT_QUANT_CACHE, else $QPEFT_CACHE/quantized).

    \b
    Examples:  qpeft cache list
               qpeft cache clear --older-than 7d
    """


@cache_command.command("list")
def list_entries() -> None:
    """Each cached quantized base: model, quantizer, dtype, size, age, last use."""
    from qpeft.core.model import quant_cache

    found, now = quant_cache.entries(), time.time()
    total = sum(e.size for e in found)
    click.echo(f"{quant_cache.directory()}: {len(found)} entries, {total / 1e9:.2f} GB of "
               f"{quant_cache.limit_bytes() / 1e9:g} GB (QPEFT_QUANT_CACHE_GB)")
    if not found:
        return
    click.echo(f"{'model':<34} {'quantizer':<22} {'dtype':<9} {'size':>9} {'age':>8} {'last used':>10}")
    for e in reversed(found):           # most recently used first
        s = e.summary
        click.echo(f"{str(s.get('model', '?'))[-34:]:<34} {str(s.get('quantizer', '?')):<22} "
                   f"{str(s.get('compute_dtype', '?')):<9} {e.size / 1e6:>6.1f} MB {ago(now - e.created):>8} "
                   f"{ago(now - e.used):>10}")
    click.echo("A quantizer that does not implement layer_from_cache is never cached (docs/cache.md).")


@cache_command.command("clear")
@click.option("--older-than", "older_than", metavar="AGE", default=None,
              help="Only entries not used for AGE (e.g. 12h, 7d, 2w); default: every entry.")
def clear_entries(older_than: str | None) -> None:
    """Remove cached quantized bases (all, or those unused for --older-than)."""
    from qpeft.core.model import quant_cache

    seconds = None if older_than is None else duration(older_than)
    removed = quant_cache.clear(seconds)
    freed = sum(e.size for e in removed)
    click.echo(f"removed {len(removed)} entries ({freed / 1e6:.1f} MB) from {quant_cache.directory()}")
