"""bitsandbytes imported quietly: the one import site for qpeft and its plugins.

The optimizers (``--optimizer paged_adamw_32bit``/``paged_adamw_8bit``, core/train/optim.py)
and the ``nf4``/``int8`` quantizers (through ``qpeft.import_bitsandbytes``) import it here,
so no path asks the Hugging Face Hub for a kernel qpeft never uses.
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
