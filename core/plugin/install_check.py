"""A folder named ``qpeft`` that hides the installed package.

Python imports ``qpeft`` from the current directory first. A folder there named ``qpeft``
without an ``__init__.py`` — a checkout of this repository, or any folder of that name —
becomes a namespace package that shadows the installed one: ``import qpeft`` then
succeeds but holds none of qpeft's names, and every plugin fails with "cannot import name
'hookimpl' from 'qpeft' (unknown location)". ``python -m qpeft`` and the registry say so
in one line instead. (The ``qpeft`` script is not affected: it does not run from the
current directory.)
"""
import sys


def shadow_problem() -> str | None:
    """The one-line explanation when the imported ``qpeft`` is such a namespace package, else None."""
    top = sys.modules.get("qpeft")
    if top is None or getattr(top, "__file__", None) or hasattr(top, "PUBLIC"):
        return None
    portions = [p for p in getattr(top, "__path__", []) if not _ours(p)]
    where = portions[0] if portions else "a folder named qpeft"
    return (f"the folder {where} hides the installed qpeft package (a folder named qpeft in the current "
            "directory or on PYTHONPATH); run from another directory, or rename that folder")


def _ours(path: str) -> bool:
    from pathlib import Path

    return (Path(path) / "__init__.py").is_file()
