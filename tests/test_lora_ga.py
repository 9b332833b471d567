"""LoRA-GA (plugins/adapters/lora_ga.py) on the calibration hook, against PEFT 0.21's
``preprocess_loraga`` + ``init_lora_weights="lora_ga"``: the same A and B (each singular vector
up to its sign) for the same batches, logits equal; the weight gradient is taken from hooks over
the quantized base; the saved adapter rebuilds the base from W with no data over nf4."""
import copy

import pytest
import torch

from qpeft import OptionsError, QpeftError, adapter_layers, compose, load_adapter
from qpeft.testing import adapt
from calibration_data import logits, masked_batches

peft = pytest.importorskip("peft")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def batches():
    return masked_batches(2, pad_row0=True)


@pytest.mark.parametrize("options, direction, scale, rslora", [
    ("", "ArB2r", "stable", False), (":direction=A2rBr:scale=gd_scale+rslora", "A2rBr", "gd_scale", True)])
def test_init_equals_peft_and_starts_at_the_original_model(reference, batch, batches, options, direction, scale,
                                                           rslora):
    """r = 16 so that PEFT's randomized SVD (q = min(4r, in, out)) spans all of G: both are exact."""
    from peft.tuners.lora.config import LoraGAConfig
    from peft.tuners.lora.loraga import preprocess_loraga

    ours, _ = adapt(reference, f"lora:r=16:alpha=8:dropout=0+lora-ga:calibration_batches=2{options}",
                    calibration=batches)
    theirs = copy.deepcopy(reference)
    config = peft.LoraConfig(r=16, lora_alpha=8, lora_dropout=0.0, target_modules=TARGETS, use_rslora=rslora,
                             init_lora_weights="lora_ga", lora_ga_config=LoraGAConfig(direction=direction, scale=scale))

    def train_step():
        for b in batches:
            theirs(**b).loss.backward()
    preprocess_loraga(theirs, config, train_step)
    theirs = peft.get_peft_model(theirs, config)
    for name, layer in adapter_layers(ours).items():
        other = theirs.base_model.model.get_submodule(name)
        a, b = other.lora_A["default"].weight, other.lora_B["default"].weight
        sign_a, sign_b = torch.sign((layer.lora_A * a).sum(dim=1)), torch.sign((layer.lora_B * b).sum(dim=0))
        torch.testing.assert_close(layer.lora_A, sign_a[:, None] * a, atol=5e-3 * a.abs().max().item(), rtol=0)
        torch.testing.assert_close(layer.lora_B, b * sign_b, atol=5e-3 * b.abs().max().item(), rtol=0)
        assert layer.base.source_weight is None
    assert (logits(ours, batch) - logits(reference, batch)).abs().max().item() <= 1e-4
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max().item() <= 1e-5


def test_the_gradient_is_the_frozen_weights_and_leaves_no_grad(reference, batches):
    """G from the hooks equals autograd's ∂L/∂W on the plain model (mean over the batches)."""
    from qpeft.plugins.adapters.lora_ga import LoRAGA

    ours, composition = adapt(reference, "lora:r=4+lora-ga:calibration_batches=2:scale=unit:niter=0",
                              calibration=batches)
    assert all(p.grad is None for p in ours.parameters())
    assert all(layer.lora_A.requires_grad and layer.lora_B.requires_grad for layer in adapter_layers(ours).values())
    plain = copy.deepcopy(reference)
    for b in batches:
        plain(**b).loss.backward()
    name = "model.layers.1.self_attn.v_proj"
    grad = plain.get_submodule(name).weight.grad / 2
    a, b = LoRAGA.from_values({"scale": "unit", "niter": 0}).factors(grad, None, 4, 2.0)
    layer = adapter_layers(ours)[name]
    torch.testing.assert_close(layer.lora_A.abs(), a.abs(), atol=1e-4, rtol=0)   # |·|: signs are free
    torch.testing.assert_close(layer.lora_B.abs(), b.abs(), atol=1e-4 * b.abs().max().item(), rtol=0)


def test_the_saved_adapter_rebuilds_the_base_without_data_over_nf4(reference, batch, batches, tmp_path):
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    spec = "lora:r=4:alpha=8+lora-ga:calibration_batches=2"
    ours, composition = adapt(reference, spec, quantizer="nf4", calibration=batches)
    plain, _ = adapt(reference, quantizer="nf4")
    errors = [0.0, 0.0]
    for name, layer in adapter_layers(ours).items():
        w = reference.get_submodule(name).weight.detach().float()
        errors[0] += (w - plain.get_submodule(name).dequantize()).norm().item() ** 2
        errors[1] += (w - layer.merged_weight()).norm().item() ** 2
    print(f"lora-ga over nf4: ‖W − (deq(Q(W − sBA)) + sBA)‖ = {errors[1] ** 0.5:.4f}, "
          f"‖W − deq(Q(W))‖ = {errors[0] ** 0.5:.4f}")
    assert abs(errors[1] ** 0.5 / errors[0] ** 0.5 - 1) < 0.1      # the rewrite neither helps nor hurts much
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    composition.method.save(ours, tmp_path)
    expected = logits(ours, batch)
    again = copy.deepcopy(reference)          # what qpeft eval loads into: the quantized base, W kept for the init
    build_plugin("quantizer", "nf4", default()).quantize_model(again, keep_source=True)
    load_adapter(again, tmp_path)
    assert torch.equal(logits(again, batch), expected)


def test_bad_options_and_ranks_are_one_line(reference, batches):
    with pytest.raises(OptionsError, match="direction must be one of ArB2r"):
        compose("lora+lora-ga:direction=up")
    with pytest.raises(OptionsError, match="scale must be one of stable"):
        compose("lora+lora-ga:scale=big")
    with pytest.raises(OptionsError, match="lora-ga needs 2r ≤ 32"):
        adapt(reference, "lora:r=32+lora-ga:calibration_batches=1", calibration=batches)
    with pytest.raises(QpeftError, match="use lora\\+lora-ga or dora\\+lora-ga"):
        adapt(reference, "qdylora:r_max=4+lora-ga:calibration_batches=1", calibration=batches)
