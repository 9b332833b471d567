"""Programmatic plugin lookup: ``qpeft.registry.names("adapter")``, ``get``, ``failures``."""
from qpeft.core.plugin.registry import all_plugins, failures, get, names, reload

__all__ = ["all_plugins", "failures", "get", "names", "reload"]
