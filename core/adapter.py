"""Deprecated: moved to :mod:`qpeft.core.kinds.adapter`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.kinds import adapter as _moved

warnings.warn("qpeft.core.adapter moved to qpeft.core.kinds.adapter; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
