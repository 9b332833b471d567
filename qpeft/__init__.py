"""qpeft — fine-tune quantized LLMs with parameter-efficient methods, and compare them.

The package is a thin facade: the pipeline lives in :mod:`qpeft.core`, the built-in
methods in :mod:`qpeft.plugins`. Everything a plugin needs is a name here (the table in
docs/writing-plugins.md, "The public API"), resolved on first use, so that importing qpeft
imports neither torch nor any plugin. The built-in plugins import nothing else either
(tests/test_layering.py), so a name they need is added here, to :data:`PUBLIC`, and to
that table.
"""
from qpeft.core.plugin.hookspecs import hookimpl
from qpeft.core.base.version import __version__

PUBLIC = {  # core module → the names it provides here; plugins (built-in ones too) use nothing else
    "qpeft.core.plugin.base": ["Plugin", "TrainFacts", "DataFacts"],
    "qpeft.core.kinds.quantizer": ["Quantizer", "QuantizerOptions", "QuantizedLinear", "LayerStats", "DTYPES",
                                   "model_bytes", "quantized_layers", "tensor_bytes"],
    "qpeft.core.kinds.adapter": ["Adapter", "compose"],
    "qpeft.core.interop.peft_import": ["load_adapter"],
    "qpeft.core.kinds.evaluator": ["Evaluator", "EvalContext"],
    "qpeft.core.base.options": ["option"],
    "qpeft.core.base.bnb": ["import_bitsandbytes"],
    "qpeft.core.base.errors": ["QpeftError", "OptionsError", "UnknownPluginError", "PluginLoadError",
                               "ModelLoadError", "closest"],
    "qpeft.core.kinds.adapter_layers": ["AdapterLayer", "ALL_LINEAR", "TensorShapeError", "adapter_layers",
                                        "find_targets", "target_matches",
                                        "mark_trainable", "merge_model", "layer_device"],
    "qpeft.core.kinds.adapter_method": ["AdapterMethod"],
    "qpeft.core.kinds.lowrank": ["LowRankMethod", "LoRALinear", "LowRankOptions", "LoRAOptions",
                                 "ScalingModifier", "InitModifier", "add_low_rank", "low_rank_values"],
    "qpeft.core.dataset.examples": ["Example", "exact_match"],
    "qpeft.core.model.generation": ["generate", "padded"],
    "qpeft.core.train.loss": ["mean_loss"],
}
MODULES = {"registry": "qpeft.registry", "testing": "qpeft.testing",
           "peft_format": "qpeft.core.kinds.peft_format"}
_WHERE = {name: module for module, names in PUBLIC.items() for name in names}

__all__ = sorted(["hookimpl", "__version__", *_WHERE, *MODULES])


def __getattr__(name: str):
    """A public name, imported from its core module on first use."""
    import importlib

    if name in MODULES:
        return importlib.import_module(MODULES[name])
    if name in _WHERE:
        value = getattr(importlib.import_module(_WHERE[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'qpeft' has no attribute '{name}'")


def __dir__():
    return sorted(__all__)
