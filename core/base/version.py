"""The installed version of qpeft."""
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qpeft")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"
