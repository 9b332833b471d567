"""Declared lifecycle: registration refuses a class that could not work, in one line naming
the class and its distribution; the core calls declared hooks directly."""
import pytest

from qpeft import hookimpl
from qpeft.core.plugin import registry
from qpeft.core.kinds.adapter import Adapter, compose
from qpeft.core.base.errors import PluginLoadError, QpeftError
from qpeft.core.kinds.evaluator import Evaluator
from qpeft.core.kinds.quantizer import Quantizer
from qpeft.core.run.rebuild import check_rank
from qpeft.plugins.adapters.lora import LoRA, LoRALinear

ORIGIN = registry.Origin("qpeft-plugin-x", "1.0")


def registered(*classes, strict=False):
    """A registry of the built-ins plus ``classes``, offered by the distribution qpeft-plugin-x."""
    class Fake:
        @hookimpl
        def register_adapters(self, register):
            for cls in classes:
                if cls.kind == "adapter":
                    register(cls)

        @hookimpl
        def register_quantizers(self, register):
            for cls in classes:
                if cls.kind == "quantizer":
                    register(cls)

        @hookimpl
        def register_evaluators(self, register):
            for cls in classes:
                if cls.kind == "evaluator":
                    register(cls)

    reg = registry.Registry(entry_points=[], strict=strict)
    reg.add(Fake(), ORIGIN)
    reg.plugins = {kind: {} for kind in registry.KINDS}
    reg._collect()
    return reg


def modifier(name, **attrs):
    return type(name.capitalize(), (Adapter,), {"name": name, "role": "modifier", **attrs})


def scale(self, r, alpha):
    return alpha


CASES = [
    (modifier("half", role="modifer", modifies="scaling", scaling=scale),
     "has role 'modifer', which is neither 'method' nor 'modifier'; did you mean 'modifier'?"),
    (modifier("nowhere", scaling=scale),
     "is a modifier without 'modifies' (the slot it fills, e.g. 'scaling')"),
    (modifier("noscale", modifies="scaling"),
     "fills the 'scaling' slot but does not define scaling() (ScalingModifier)"),
    (modifier("typo", modifies="scalng", scaling=scale),
     "modifies 'scalng', a slot no adapter method declares; did you mean 'scaling'?"),
    (type("Odd", (LoRA,), {"name": "odd", "slots": frozenset({"scaling", "scalng"})}),
     "declares slot 'scalng', which no method describes with a Protocol; did you mean 'scaling'?"),
    (type("Fresh", (LoRA,), {"name": "fresh", "slots": frozenset({"warmup"})}),
     "declares slot 'warmup', which no method describes with a Protocol; declare slots = {'warmup': Protocol}"),
    (type("Stringy", (LoRA,), {"name": "stringy", "slots": "scaling"}),
     "declares slots='scaling'; use a set of slot names or {name: Protocol}"),
    (type("Bare", (Adapter,), {"name": "bare"}),
     "does not define attach(); does not define save(); does not define load(); does not define merge()"),
    (type("Hybrid", (LoRA,), {"name": "hybrid", "modifies": "init"}),
     "is a method but sets modifies='init'; set role = 'modifier'"),
    (type("Begun", (LoRA,), {"name": "begun", "on_step_begun": lambda self, step, model: None}),
     "defines 'on_step_begun', which nothing calls; did you mean 'on_step_begin'?"),
    (type("Late", (LoRA,), {"name": "late", "layer_cls": type("LateLinear", (LoRALinear,), {
        "finish_inits": lambda self: None})}),
     "LateLinear defines 'finish_inits', which nothing calls; did you mean 'finish_init'?"),
    (type("Variants", (LoRA,), {"name": "variants", "report_variant": lambda self, model: {}}),
     "defines 'report_variant', which nothing calls; did you mean 'report_variants'?"),
    (type("Maker", (LoRA,), {"name": "maker", "make_layers": lambda self, base, modifiers: None}),
     "defines 'make_layers', which nothing calls; did you mean 'make_layer'?"),  # LoRA's, not a core hook
    (modifier("oldname", modifies="scaling", scaling=scale, peft_config=lambda self, config: None),
     "is a modifier defining peft_config(); a modifier's hook is update_peft_config(config) — rename it"),
    (type("Empty", (Quantizer,), {"name": "empty"}), "does not define quantize_linear()"),
    (type("Mute", (Evaluator,), {"name": "mute", "evalute": lambda self, ctx: {}}),
     "does not define evaluate(); defines 'evalute', which nothing calls; did you mean 'evaluate'?"),
]


@pytest.mark.parametrize("cls, problem", CASES, ids=[c.name for c, _ in CASES])
def test_a_broken_class_is_reported_by_class_and_distribution_and_skipped(cls, problem, capsys):
    reg = registered(cls, modifier("fine", modifies="scaling", scaling=scale))
    [failure] = reg.failures
    assert failure.name == cls.name and failure.origin == ORIGIN
    assert failure.error == f"QpeftError: {cls.kind} class {cls.__module__}.{cls.__qualname__} {problem}"
    assert cls.name not in reg.names(cls.kind)
    assert "fine" in reg.names("adapter")  # the same hook's other class still registers
    assert f"plugin '{cls.name}' from qpeft-plugin-x 1.0 failed to load" in capsys.readouterr().err


def test_strict_mode_makes_a_refused_class_fatal():
    with pytest.raises(PluginLoadError, match=r"qpeft-plugin-x 1\.0.*does not define quantize_linear\(\)"
                                              r".*QPEFT_STRICT_PLUGINS=1"):
        registered(type("Empty", (Quantizer,), {"name": "empty"}), strict=True)


def test_a_modifier_of_a_refused_method_is_refused_too():
    method = type("Own", (LoRA,), {"name": "own", "slots": {"tempo": None}})
    reg = registered(method, modifier("tempo", modifies="tempo", tempo=scale))
    assert [f.name for f in reg.failures] == ["own", "tempo"]
    assert reg.failures[0].error.endswith("declares slots['tempo'] = None, not the Protocol a modifier of it follows")
    assert reg.failures[1].error.endswith("modifies 'tempo', a slot no adapter method declares")


def test_a_new_slot_with_its_protocol_registers_and_composes():
    from typing import Protocol

    class Tempo(Protocol):
        def tempo(self) -> float:
            """How fast."""

    method = type("Own", (LoRA,), {"name": "own", "slots": {**LoRA.slots, "tempo": Tempo}})
    reg = registered(method, modifier("tempo", modifies="tempo", tempo=lambda self: 2.0),
                     modifier("lazy", modifies="tempo"))
    assert [(f.name, f.error.split(" ", 3)[-1]) for f in reg.failures] == [
        ("lazy", "test_lifecycle.Lazy fills the 'tempo' slot but does not define tempo() (Tempo)")]
    assert compose("own+tempo", reg).modifiers[0].tempo() == 2.0


def test_builtins_register_without_problems():
    reg = registry.Registry(entry_points=[], strict=True)
    assert not reg.failures and len(reg.names("adapter")) >= 7


def test_declared_hooks_have_no_op_defaults_called_directly():
    lora = LoRA.from_values({})
    assert lora.report_variants(model=None) == {} and lora.on_step_begin(0, None) is None
    assert not LoRA.implements("select_rank") and registry.get("adapter", "qdylora").implements("select_rank")
    with pytest.raises(QpeftError, match="adapter 'lora' has a fixed rank; --rank needs an adapter method"):
        lora.select_rank(None, 2)
    with pytest.raises(QpeftError, match="--rank needs a dynamic-rank adapter"):
        check_rank(compose("lora", registry.default()), 2, "this run used 'lora'")
    check_rank(compose("qdylora", registry.default()), 2, "")  # accepted
