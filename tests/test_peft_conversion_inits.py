"""PiSSA and OLoRA rewrite the base at attach (W' = W − s·B₀·A₀, from W alone); PEFT loads what qpeft
saves for them to qpeft's model over ``none`` (float32, A and B moved away from A₀, B₀):

    pissa (exact SVD)   init_lora_weights "pissa", rank r: PEFT reruns the SVD on the original W
    pissa:niter=N       init_lora_weights true, rank 2r [B, −B₀]·[A; A₀]: PEFT's own randomized SVD
                        draws from the global RNG, another base (measured: 0.45 of max |logit|)
    olora               init_lora_weights "olora", rank r: PEFT reruns the QR on the original W

``PeftModel.from_pretrained(original, DIR)`` gives qpeft's logits within 1e-5 of the largest |logit|,
and qpeft's own reload (``load_adapter`` over a fresh base, the init rerun) is bit-exact."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file
from test_peft_conversion import assert_peft_equal, fresh, logits, trained

from qpeft import adapter_layers, load_adapter
from qpeft.testing import adapt

pytest.importorskip("peft")
R, ALPHA = 4, 8.0
BASE = f"r={R}:alpha={ALPHA}:dropout=0"


@pytest.mark.parametrize("spec, init, rank, alpha", [
    (f"lora:{BASE}+pissa", "pissa", R, ALPHA),
    (f"lora:{BASE}+pissa:niter=3", True, 2 * R, 2 * ALPHA),
    (f"dora:{BASE}+pissa:niter=2+rslora", True, 2 * R, math.sqrt(2) * ALPHA),
    (f"lora:{BASE}+olora", "olora", R, ALPHA),
    (f"dora:{BASE}+olora+rslora", "olora", R, ALPHA)])
def test_peft_loads_what_qpeft_saves_to_the_same_model(reference, batch, tmp_path, spec, init, rank, alpha):
    ours, composition = adapt(reference, spec)
    composition.method.save(trained(ours), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["init_lora_weights"], config["r"], config["lora_alpha"]) == (init, rank, alpha)
    assert "note" not in json.loads((tmp_path / "qpeft_adapter.json").read_text())   # PEFT's load is the model
    expected = assert_peft_equal(reference, ours, tmp_path, batch)
    assert (tmp_path / "qpeft_adapter.safetensors").is_file() == (rank != R)
    if rank != R:                                        # the rank-2r file: [A; A₀], [B, −B₀]
        written = load_file(tmp_path / "adapter_model.safetensors")
        for name, layer in adapter_layers(ours).items():
            a, b = (written[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
            a0, b0 = layer.calibrated_init
            assert torch.equal(a, torch.cat([layer.lora_A.detach(), a0])) and torch.equal(b[:, R:], -b0)
            w = reference.get_submodule(name).weight.detach()     # W' + s·B₀·A₀ = W
            assert (layer.base.dequantize() + layer.scaling * b0 @ a0 - w).abs().max().item() <= 1e-5
    again = fresh(reference)
    load_adapter(again, tmp_path)                        # qpeft's own reload: rank r, the init rerun
    assert torch.equal(logits(again, batch), expected)

