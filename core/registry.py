"""Deprecated: moved to :mod:`qpeft.core.plugin.registry`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.plugin import registry as _moved

warnings.warn("qpeft.core.registry moved to qpeft.core.plugin.registry; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
