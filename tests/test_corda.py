"""CorDA (plugins/adapters/corda.py) on the calibration hook, against PEFT 0.21's
``preprocess_corda`` + ``init_lora_weights="corda"``: the same A, B and base for the same
batches (ipm and kpm, with dora and rslora), logits equal; the saved adapter rebuilds the base
from W with no data, over none and nf4, where the quantization error is recorded. PEFT loading
the saved adapter (a rank-2r LoRA over the original base): tests/test_peft_conversion.py."""
import copy

import pytest
import torch

from qpeft import QpeftError, adapter_layers, load_adapter
from qpeft.testing import adapt
from calibration_data import logits, masked_batches

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    return masked_batches(2)


def peft_corda(reference, batches, mode, dora, rslora):
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    theirs = copy.deepcopy(reference)
    config = peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, init_lora_weights="corda",
                             use_dora=dora, use_rslora=rslora, corda_config=CordaConfig(corda_method=mode))

    def run_model():
        for b in batches:
            for row in b["input_ids"]:
                theirs(input_ids=row[None])
    preprocess_corda(theirs, config, run_model=run_model)
    return peft.get_peft_model(theirs, config)


@pytest.mark.parametrize("spec, mode, dora, rslora", [
    ("lora:r=4:alpha=8:dropout=0+corda:calibration_batches=2", "ipm", False, False),
    ("dora:r=4:alpha=8:dropout=0+corda:calibration_batches=2:mode=kpm+rslora", "kpm", True, True)])
def test_init_equals_peft_and_starts_at_the_original_model(reference, batch, batches, spec, mode, dora, rslora):
    ours, _ = adapt(reference, spec, calibration=batches)
    theirs = peft_corda(reference, batches, mode, dora, rslora)
    for name, layer in adapter_layers(ours).items():
        other = theirs.base_model.model.get_submodule(name)
        a, b = other.lora_A["default"].weight, other.lora_B["default"].weight
        sign = torch.sign((layer.lora_A * a).sum(dim=1))          # each singular pair's sign is free
        torch.testing.assert_close(layer.lora_A, sign[:, None] * a, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B, b * sign, atol=1e-5, rtol=0)
        torch.testing.assert_close(layer.base.dequantize(), other.base_layer.weight, atol=1e-6, rtol=0)
        assert layer.base.source_weight is None                   # W dropped once the base is rewritten
        if dora:
            torch.testing.assert_close(layer.lora_magnitude_vector, other.lora_magnitude_vector["default"].weight,
                                       atol=1e-5, rtol=0)
    assert (logits(ours, batch) - logits(reference, batch)).abs().max().item() <= 1e-4
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max().item() <= 1e-5


def quantized_copy(reference, spec):
    """What ``qpeft eval`` loads an adapter into: the quantized base, W kept for the init."""
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    model = copy.deepcopy(reference)
    build_plugin("quantizer", spec, default()).quantize_model(model, keep_source=True)
    return model


def test_the_saved_adapter_rebuilds_the_base_without_data_over_nf4(reference, batch, batches, tmp_path):
    ours, composition = adapt(reference, "lora:r=4:alpha=8+corda:calibration_batches=2", quantizer="nf4",
                              calibration=batches)
    plain, _ = adapt(reference, quantizer="nf4")
    errors = [0.0, 0.0]
    for name, layer in adapter_layers(ours).items():
        w = reference.get_submodule(name).weight.detach().float()
        errors[0] += (w - plain.get_submodule(name).dequantize()).norm().item() ** 2
        errors[1] += (w - layer.merged_weight()).norm().item() ** 2
    print(f"corda ipm over nf4: ‖W − (deq(Q(W − sBA)) + sBA)‖ = {errors[1] ** 0.5:.4f}, "
          f"‖W − deq(Q(W))‖ = {errors[0] ** 0.5:.4f}")
    assert errors[1] < errors[0]                                  # the top of W·C is kept exact in B·A
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    composition.method.save(ours, tmp_path)
    expected = logits(ours, batch)
    again = quantized_copy(reference, "nf4")
    load_adapter(again, tmp_path)                                 # no batches: A₀, B₀ come from the adapter
    assert torch.equal(logits(again, batch), expected)
    with pytest.raises(QpeftError, match="already rewritten from another calibration"):
        composition.method.load(adapt(reference, "lora:r=4:alpha=8+corda:calibration_batches=2", quantizer="nf4")[0],
                                tmp_path)


def test_bad_options_and_other_updates_are_one_line(reference, batches):
    from qpeft import OptionsError, compose

    with pytest.raises(OptionsError, match="mode must be ipm or kpm"):
        compose("lora+corda:mode=top")
    with pytest.raises(OptionsError, match="calibration_batches must be at least 1"):
        compose("lora+corda:calibration_batches=0")
    with pytest.raises(QpeftError, match="use lora\\+corda or dora\\+corda"):
        adapt(reference, "qdylora:r_max=4+corda:calibration_batches=1", calibration=batches)
