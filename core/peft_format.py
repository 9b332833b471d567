"""Deprecated: moved to :mod:`qpeft.core.kinds.peft_format`; this path goes in the next release
(CHANGELOG.md, "Unreleased"). Kept because the docs once showed it."""
import sys
import warnings

from qpeft.core.kinds import peft_format as _moved

warnings.warn("qpeft.core.peft_format moved to qpeft.core.kinds.peft_format; the old path goes in the next release",
              DeprecationWarning, stacklevel=2)
sys.modules[__name__] = _moved
