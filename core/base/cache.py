"""Where qpeft keeps what it can compute again: converted models, baselines, the plugin listing."""
import os
from pathlib import Path


def cache_dir() -> Path:
    """``$QPEFT_CACHE``, else ``$XDG_CACHE_HOME/qpeft``, else ``~/.cache/qpeft``."""
    if os.environ.get("QPEFT_CACHE"):
        return Path(os.environ["QPEFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "qpeft"
