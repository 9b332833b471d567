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
    """``bitsandbytes``, imported on first use without its optional-``kernels`` notice and
    without its Hub lookup: on CPUs with AVX512-BF16, importing bitsandbytes asks the
    ``kernels`` package (when installed) to fetch ``kernels-community/quantization-bitsandbytes``
    from the Hugging Face Hub — a network call on every import, refused offline, and a
    "Skipping publisher trust check" line under ``HF_HUB_OFFLINE=1``. qpeft never uses that
    kernel (it serves bitsandbytes' own inference layout; qpeft calls ``matmul_4bit``), so
    ``kernels`` is hidden while bitsandbytes imports and put back after."""
    first = "bitsandbytes" not in sys.modules
    if first:
        logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_WithoutKernelsNotice())
        hidden = sys.modules.get("kernels", _ABSENT)
        sys.modules["kernels"] = None           # `from kernels import …` raises ImportError: no lookup
    try:
        import bitsandbytes
        import bitsandbytes.functional  # noqa: F401  (registers the CPU/CUDA ops)
    finally:
        if first and hidden is _ABSENT:
            del sys.modules["kernels"]
        elif first:
            sys.modules["kernels"] = hidden
    return bitsandbytes


_ABSENT = object()
