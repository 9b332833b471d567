"""PiSSA (plugins/adapters/pissa.py) against PEFT 0.21's init_lora_weights="pissa": the same
A, B (up to the sign of each singular pair) and base, logits equal at init; qpeft reloads its
saved adapter bit-exactly (PEFT's reload: tests/test_peft_conversion_inits.py); over nf4 the
residual quantizes with less error than W itself (QPiSSA, §4.4)."""
import copy
import json

import pytest
import torch

from qpeft import adapter_layers
from qpeft.testing import adapt

peft = pytest.importorskip("peft")


def logits(model, batch):
    with torch.no_grad():
        return model.eval()(input_ids=batch).logits


@pytest.mark.parametrize("spec, dora, rslora", [("lora:r=4:alpha=8+pissa", False, False),
                                                ("dora:r=4:alpha=8+pissa+rslora", True, True)])
def test_init_equals_peft_and_starts_at_the_original_model(reference, batch, spec, dora, rslora):
    ours, _ = adapt(reference, spec)
    theirs = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights="pissa", use_dora=dora,
        use_rslora=rslora))
    for name, layer in adapter_layers(ours).items():
        other = theirs.base_model.model.get_submodule(name)
        a, b = other.lora_A["default"].weight, other.lora_B["default"].weight
        sign = torch.sign((layer.lora_A * a).sum(dim=1))          # each singular pair's sign is free
        torch.testing.assert_close(layer.lora_A, sign[:, None] * a, atol=2e-5, rtol=0)
        torch.testing.assert_close(layer.lora_B, b * sign, atol=2e-5, rtol=0)
        torch.testing.assert_close(layer.base.dequantize(), other.base_layer.weight, atol=2e-6, rtol=0)
    assert (logits(ours, batch) - logits(reference, batch)).abs().max().item() <= 1e-4
    assert (logits(ours, batch) - logits(theirs, batch)).abs().max().item() <= 1e-5


@pytest.mark.parametrize("niter", [0, 3])
def test_the_saved_adapter_reloads_in_qpeft_exactly(reference, batch, tmp_path, niter):
    """PEFT's load of the same files: tests/test_peft_conversion_inits.py."""
    spec = f"lora:r=4:alpha=8+pissa:niter={niter}"
    ours, composition = adapt(reference, spec)
    with torch.no_grad():
        for p in ours.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    composition.method.save(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"]) == ((True, 8) if niter else ("pissa", 4))  # niter: rank 2r
    expected = logits(ours, batch)
    again, fresh = adapt(reference, spec, seed=5)
    fresh.method.load(again, tmp_path)
    assert torch.equal(logits(again, batch), expected)            # the seeded randomized SVD reruns alike


def test_over_nf4_the_residual_quantizes_with_less_error_than_w(reference):
    plain, _ = adapt(reference, "lora:r=8", quantizer="nf4")
    pissa, _ = adapt(reference, "lora:r=8+pissa", quantizer="nf4")
    errors = []
    for (name, a), b in zip(adapter_layers(plain).items(), adapter_layers(pissa).values()):
        w = reference.get_submodule(name).weight.detach().float()
        errors.append(((w - a.base.dequantize()).norm().item(), (w - b.merged_weight()).norm().item()))
    plain_error, pissa_error = (sum(e[i] for e in errors) for i in (0, 1))
    assert pissa_error < 0.97 * plain_error, (pissa_error, plain_error)
