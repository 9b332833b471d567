"""The conformance kit fails, naming the plugin and the fault, on deliberately broken plugins."""
import math

import pytest

from qpeft import testing
from qpeft.core.plugin import registry
from qpeft.core.kinds.evaluator import Evaluator
from qpeft.plugins.adapters.ia3 import IA3
from qpeft.plugins.adapters.lora import LoRA, LoRALinear
from qpeft.plugins.quantizers.none import NoQuantization, PlainLinear

BUILTINS = registry.Registry(entry_points=[])


def check_lora_like(cls):
    return testing.check_adapter(cls, BUILTINS, options={"r": 4}, quantizers=["none"])


class Forgetful(LoRA):
    """Its load attaches but never copies the saved tensors in."""

    name = "forgetful"

    def load(self, model, directory):
        pass


class Unmerged(LoRA):
    """Its merge drops the adapter: the plain base model."""

    name = "unmerged"

    def merge(self, model, dtype=None):
        from qpeft.core.kinds.adapter_layers import adapter_layers

        for name, layer in adapter_layers(model).items():
            parent = model.get_submodule(name.rpartition(".")[0])
            setattr(parent, name.rpartition(".")[2], layer.base)
        return LoRA.merge(self, model)


class Crashing(LoRA):
    """Its load fails with a raw exception instead of a one-line error."""

    name = "crashing"

    def load(self, model, directory):
        raise KeyError("lora_A.weight")


class DeadLinear(LoRALinear):
    def forward(self, x):
        return self.base(x)


class Dead(LoRA):
    """Its layers ignore the low-rank path: the loss has no path to A and B."""

    name = "dead"
    layer_cls = DeadLinear


class StuckLinear(LoRALinear):
    def forward(self, x):
        return self.base(x) + 0 * self.lora_delta(x).to(x.dtype)


class Stuck(LoRA):
    """Its layers multiply the low-rank path by 0: A and B get zero gradients."""

    name = "stuck"
    layer_cls = StuckLinear


def test_the_kit_passes_a_correct_method_and_reports_each_quantizer():
    assert check_lora_like(LoRA) == {"none": "ok"}


@pytest.mark.parametrize("cls, message", [
    (Forgetful, r"quantizer 'none' × adapter 'forgetful': save → load is not exact: max \|Δlogit\| = \d"),
    (Unmerged, r"quantizer 'none' × adapter 'unmerged': merged output differs from the adapted one by"),
    (Crashing, r"quantizer 'none' × adapter 'crashing': save → load raised KeyError: 'lora_A.weight'"),
    (Dead, r"quantizer 'none' × adapter 'dead': the loss does not depend on the trainable tensors"),
    (Stuck, r"quantizer 'none' × adapter 'stuck': loss did not fall in 5 steps: \[(6\.8989, ){4}6\.8989\]"),
])
def test_a_broken_adapter_fails_naming_the_plugin_and_the_fault(cls, message):
    with pytest.raises(AssertionError, match=message):
        check_lora_like(cls)


class RoundedIA3(IA3):
    """IA³ without ``needs_float32_activations``: in bf16 its l ≈ 1 ± 0.1 % rounds to 1, the
    bf16 model stays the base while its merged float32 export moves (issue 23)."""

    name = "rounded-ia3"
    needs_float32_activations = False


def test_an_update_that_bf16_activations_round_away_fails():
    with pytest.raises(AssertionError, match=r"quantizer 'none' × adapter 'rounded-ia3': in bf16 the trained "
                                             r"update moves the logits -?0\.0\d× as far .* declare needs_float32"):
        testing.check_adapter(RoundedIA3, BUILTINS, quantizers=["none"])
    assert testing.check_adapter(IA3, BUILTINS, quantizers=["none"]) == {"none": "ok"}


class HalfLinear(PlainLinear):
    def storage_bytes(self):
        return super().storage_bytes() // 2


class Liar(NoQuantization):
    """Reports half the bytes its layers hold."""

    name = "liar"

    def quantize_linear(self, linear):
        return HalfLinear(linear, self.compute_dtype)


class NoisyLinear(PlainLinear):
    def __init__(self, linear, dtype):
        import torch

        super().__init__(linear, dtype)
        self.weight.data += 1e-3 * torch.randn_like(self.weight)  # unseeded: never the same twice


class Noisy(NoQuantization):
    name = "noisy"

    def quantize_linear(self, linear):
        return NoisyLinear(linear, self.compute_dtype)


def test_a_quantizer_whose_storage_report_lies_fails():
    # 48×64 fp32 weight + 48 fp32 bias = 12,480 bytes held, half of it reported
    with pytest.raises(AssertionError, match=r"quantizer 'liar': storage_bytes\(\) reports 6240 bytes; "
                                             r"its tensors hold 12480"):
        testing.check_quantizer(Liar, BUILTINS, methods=[])


def test_a_nondeterministic_quantizer_fails():
    with pytest.raises(AssertionError, match="quantizer 'noisy': quantizing the same weight twice"):
        testing.check_quantizer(Noisy, BUILTINS, methods=[])


def test_a_correct_quantizer_passes_under_a_method():
    assert testing.check_quantizer(NoQuantization, BUILTINS, methods=["ia3"]) == {"ia3": "ok"}


class Dice(Evaluator):
    name = "dice"
    higher_is_better = {"luck": True}

    def evaluate(self, ctx):
        import random

        return {"luck": random.random()}


class Undeclared(Evaluator):
    name = "undeclared"
    higher_is_better = {"score": True}

    def evaluate(self, ctx):
        return {"points": 1.0, "nan": math.nan}


class Unreported(Evaluator):
    name = "unreported"
    higher_is_better = {"score": True}

    def evaluate(self, ctx):
        return {"points": 1.0}


@pytest.mark.parametrize("cls, message", [
    (Unreported, r"evaluator 'unreported': higher_is_better names 'score', which evaluate did not report"),
    (Dice, r"evaluator 'dice': two evaluations of the same model differ"),
    (Undeclared, r"evaluator 'undeclared': metric 'nan' = nan, not a finite number or text"),
])
def test_a_broken_evaluator_fails(cls, message):
    with pytest.raises(AssertionError, match=message):
        testing.check_evaluator(cls)


def test_a_correct_evaluator_passes_with_its_metrics():
    cls = BUILTINS.get("evaluator", "perplexity")
    metrics = testing.check_evaluator(cls)
    assert metrics["eval_tokens"] > 0 and 1 < metrics["perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-3)


def test_a_class_registration_would_refuse_fails_before_running():
    typo = type("Typo", (LoRA,), {"name": "typo", "on_step_begun": lambda self, step, model: None})
    with pytest.raises(AssertionError, match=r"adapter 'typo' would be refused at registration: defines "
                                             r"'on_step_begun', which nothing calls; did you mean 'on_step_begin'\?"):
        check_lora_like(typo)
