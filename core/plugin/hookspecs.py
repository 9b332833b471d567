"""The three hooks a plugin may implement (entry-point group ``qpeft``).

Each hook receives ``register``, a callable that takes a plugin class. Hooks are called
with keyword arguments, so a spec can gain arguments without breaking old plugins.
"""
import pluggy

PROJECT = "qpeft"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_quantizers(register):
    """Register Quantizer subclasses: ``register(MyQuantizer)``."""


@hookspec
def register_adapters(register):
    """Register Adapter subclasses: ``register(MyAdapter)``."""


@hookspec
def register_evaluators(register):
    """Register Evaluator subclasses: ``register(MyEvaluator)``."""
