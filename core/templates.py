"""Deprecated: moved to :mod:`qpeft.core.dataset.templates`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.dataset import templates as _moved

warnings.warn("qpeft.core.templates moved to qpeft.core.dataset.templates; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
