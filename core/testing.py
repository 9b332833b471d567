"""Deprecated: moved to :mod:`qpeft.core.kit.testing`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.kit import testing as _moved

warnings.warn("qpeft.core.testing moved to qpeft.core.kit.testing; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
