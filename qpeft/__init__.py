"""qpeft — fine-tune quantized LLMs with parameter-efficient methods, and compare them.

The package is a thin facade: the pipeline lives in :mod:`qpeft.core`, the built-in
methods in :mod:`qpeft.plugins`. Importing qpeft imports neither torch nor any plugin.
"""
from qpeft.core.hookspecs import hookimpl
from qpeft.core.version import __version__

__all__ = ["hookimpl", "__version__"]


def __getattr__(name: str):
    """``qpeft.registry`` and ``qpeft.testing`` after a bare ``import qpeft`` (imported on
    first use, so that importing qpeft stays free of torch)."""
    if name in ("registry", "testing"):
        import importlib

        return importlib.import_module(f"qpeft.{name}")
    raise AttributeError(f"module 'qpeft' has no attribute '{name}'")
