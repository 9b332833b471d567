"""Deprecated: moved to :mod:`qpeft.core.dataset.examples`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.dataset import examples as _moved

warnings.warn("qpeft.core.data moved to qpeft.core.dataset.examples; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
