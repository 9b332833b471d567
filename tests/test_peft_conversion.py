"""CorDA and LoRA-GA rewrite the base (W' = W − s·B₀·A₀); their PEFT files hold the trained adapter
as the plain rank-2r LoRA [B, −B₀]·[A; A₀] over the original W (PEFT 0.21's
``path_initial_model_for_weight_conversion``), written through the ``peft_tensors`` hook. Over the
``none`` quantizer ``PeftModel.from_pretrained(original, DIR)`` gives qpeft's logits within 1e-5 of
the largest |logit|; the config's r is 2r with α keeping the scaling (rsLoRA, per-layer ranks too);
qpeft reloads its own rank-r tensors bit-exactly; the two PEFT files alone import into qpeft as a
plain rank-2r lora."""
import copy
import json
import math
import shutil

import pytest
import torch

from qpeft import adapter_layers, compose, load_adapter
from qpeft.testing import adapt
from calibration_data import logits, masked_batches

peft = pytest.importorskip("peft")
R, ALPHA, RTOL = 4, 8.0, 1e-5     # RTOL: max |Δlogit| over max |logit|


@pytest.fixture(scope="module")
def batches():
    return masked_batches(2)


def trained(model):
    """Every trainable tensor moved by seeded noise, so B ≠ B₀ and A ≠ A₀ (a training step's stand-in)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def fresh(reference):
    """What qpeft eval loads an adapter into: the unquantized base, W kept for the init."""
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    model = copy.deepcopy(reference)
    build_plugin("quantizer", "none:compute_dtype=float32", default()).quantize_model(model, keep_source=True)
    return model


def assert_peft_equal(reference, ours, directory, batch):
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), directory)
    expected = logits(ours, batch)
    gap = (logits(theirs, batch) - expected).abs().max().item() / expected.abs().max().item()
    assert gap <= RTOL, gap
    return expected


@pytest.mark.parametrize("spec, rslora", [
    (f"lora:r={R}:alpha={ALPHA}:dropout=0+corda:calibration_batches=2", False),
    (f"lora:r={R}:alpha={ALPHA}:dropout=0+corda:calibration_batches=2:mode=kpm+rslora", True),
    (f"lora:r={R}:alpha={ALPHA}:dropout=0+rslora+lora-ga:calibration_batches=2", True),
    (f"dora:r={R}:alpha={ALPHA}:dropout=0+lora-ga:calibration_batches=2", False)])
def test_peft_loads_the_rank_2r_lora_over_the_original_base(reference, batch, batches, tmp_path, spec, rslora):
    ours, composition = adapt(reference, spec, calibration=batches)
    composition.method.save(trained(ours), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["init_lora_weights"], config.get("rank_pattern")) == (2 * R, True, None)
    assert config["lora_alpha"] == (ALPHA * math.sqrt(2) if rslora else 2 * ALPHA)   # s = α'/√2r = α/√r, α'/2r = α/r
    expected = assert_peft_equal(reference, ours, tmp_path, batch)

    from safetensors.torch import load_file
    written, own = load_file(tmp_path / "adapter_model.safetensors"), load_file(tmp_path / "qpeft_adapter.safetensors")
    for name, layer in adapter_layers(ours).items():
        a, b = (written[f"base_model.model.{name}.lora_{x}.weight"] for x in "AB")
        a0, b0 = layer.calibrated_init
        assert a.shape == (2 * R, layer.lora_A.shape[1]) and b.shape == (layer.lora_B.shape[0], 2 * R)
        assert torch.equal(a, torch.cat([layer.lora_A.detach(), a0])) and torch.equal(b[:, R:], -b0)
        assert torch.equal(own[f"base_model.model.{name}.lora_A.weight"], layer.lora_A.detach())
    again = fresh(reference)
    load_adapter(again, tmp_path)                        # qpeft's own reload: rank r, base rebuilt from W
    assert torch.equal(logits(again, batch), expected)


def test_the_peft_files_alone_import_as_a_plain_rank_2r_lora(reference, batch, batches, tmp_path):
    ours, composition = adapt(reference, f"lora:r={R}:alpha={ALPHA}:dropout=0+corda:calibration_batches=2+rslora",
                              calibration=batches)
    composition.method.save(trained(ours), tmp_path / "qpeft")
    (tmp_path / "peft").mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(tmp_path / "qpeft" / name, tmp_path / "peft" / name)
    again = fresh(reference)
    imported = load_adapter(again, tmp_path / "peft")    # no manifest: read as a foreign PEFT adapter
    assert [p.name for p in imported.parts] == ["lora", "rslora"] and imported.method.options.r == 2 * R
    assert not any(layer.base_rewritten for layer in adapter_layers(again).values())
    expected = logits(ours, batch)
    assert (logits(again, batch) - expected).abs().max().item() <= RTOL * expected.abs().max().item()


def test_per_layer_ranks_double_in_the_patterns(reference, batch, batches, tmp_path):
    """A layer at another rank and α (set by hand before calibrating: no built-in composes per-layer
    ranks with these inits) goes to rank_pattern/alpha_pattern at 2r with α·√2 under rsLoRA."""
    from qpeft.core.kinds.adapter import calibrated

    composition = compose(f"lora:r={R}:alpha={ALPHA}:dropout=0+rslora+lora-ga:calibration_batches=2")
    ours = fresh(reference)
    composition.attach(ours)
    odd = "model.layers.1.mlp.down_proj"
    adapter_layers(ours)[odd].set_rank(2, 6.0)
    part = composition.modifiers[-1]
    composition.method.restore_calibration(ours, {part.name: calibrated(part, ours, batches)})
    composition.method.save(trained(ours), tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"]) == (2 * R, ALPHA * math.sqrt(2))
    assert config["rank_pattern"] == {odd: 4} and config["alpha_pattern"] == {odd: 6.0 * math.sqrt(2)}
    assert_peft_equal(reference, ours, tmp_path, batch)
