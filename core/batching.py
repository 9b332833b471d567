"""Deprecated: moved to :mod:`qpeft.core.dataset.batching`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.dataset import batching as _moved

warnings.warn("qpeft.core.batching moved to qpeft.core.dataset.batching; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
