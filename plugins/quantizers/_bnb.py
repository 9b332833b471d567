"""What the two bitsandbytes quantizers (``nf4``, ``int8``) share: importing bitsandbytes
quietly. A private module of the plugins package (its name starts with ``_``, so discovery
skips it), not a plugin: neither built-in imports the other, as third-party plugins could not.
"""
import logging
import sys


class _WithoutKernelsNotice(logging.Filter):
    """Drops bitsandbytes' CPU notice that the optional ``kernels`` package is absent: its
    built-in C++ fallback is used instead, so users have nothing to act on."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "kernels" not in record.getMessage()


def import_bitsandbytes():
    """``bitsandbytes``, imported on first use without its optional-``kernels`` notice."""
    if "bitsandbytes" not in sys.modules:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutKernelsNotice())
    import bitsandbytes
    import bitsandbytes.functional  # noqa: F401  (registers the CPU/CUDA ops)

    return bitsandbytes
