"""IR-QLoRA (Qin et al. 2024): ICQ as ``nf4:icq=true``, IEC as ``lora+iec``, and both in one run.

The adapter × quantizer matrix (tests/test_adapter_matrix.py) also runs ``lora+iec`` over every
quantizer through the conformance kit (trains, reloads exactly, merges)."""
import copy
import json

import pytest
import torch
from torch import nn

from qpeft import OptionsError, QpeftError, adapter_layers, model_bytes, quantized_layers, tensor_bytes
from qpeft.core.kinds import peft_format
from qpeft.core.kit import conformance
from qpeft.plugins.quantizers import _icq
from qpeft.plugins.quantizers._bnb import import_bitsandbytes
from qpeft.plugins.quantizers.nf4 import NF4

ICQ = {"compute_dtype": "float32", "icq": True}
PLAIN = {"compute_dtype": "float32"}


def linear(out: int, inp: int, seed: int = 0) -> nn.Linear:
    """A layer with LLM-like weights: Gaussian, a per-row offset, a few large outliers."""
    gen = torch.Generator().manual_seed(seed)
    layer = nn.Linear(inp, out)
    with torch.no_grad():
        w = torch.randn(out, inp, generator=gen) * 0.02 + torch.randn(out, 1, generator=gen) * 0.004
        w[torch.rand(out, inp, generator=gen) < 0.01] *= 6
        layer.weight.copy_(w)
    return layer


def reference_search(weight: torch.Tensor, span=0.1, steps=100, blocksize=64) -> tuple[torch.Tensor, torch.Tensor]:
    """htqin/IR-QLoRA ``utils.search``, restated: for each factor in order, bitsandbytes
    quantizes W − τ and the entropy of each block's codes is kept if strictly higher.
    Returns (τ, its entropy) per block."""
    functional = import_bitsandbytes().functional
    blocks = weight.reshape(-1, blocksize)
    tau0 = blocks.median(dim=1, keepdim=True).values
    spread = (blocks - tau0).abs().amax(dim=1, keepdim=True)
    best_h, best_tau = None, None
    for f in _icq.candidates(span, steps).tolist():
        tau = f * spread + tau0
        codes, _ = functional.quantize_4bit((blocks - tau).reshape(weight.shape).contiguous(), blocksize=blocksize,
                                            compress_statistics=True, quant_type="nf4")
        h = _icq.code_entropy(codes, weight.numel(), blocksize)
        if best_h is None:
            best_h, best_tau = h, tau.squeeze(1)
        else:
            best_tau = torch.where(h > best_h, tau.squeeze(1), best_tau)
            best_h = torch.maximum(best_h, h)
    return best_tau, best_h


# -- ICQ -------------------------------------------------------------------------------------
def test_icq_search_finds_the_reference_loops_entropy_on_its_grid():
    weight = linear(32, 128).weight.detach()
    levels = import_bitsandbytes().functional.get_4bit_type("nf4", device="cpu")
    tau = _icq.search(weight, 64, levels, 0.1, 10)       # 21 candidates (the default 100 → 201: same code, slower)
    ref_tau, ref_h = reference_search(weight, steps=10)
    assert tau.shape == (64,)
    assert (tau == ref_tau).float().mean().item() >= 0.95     # the same grid point (ties may differ)
    blocks = weight.reshape(-1, 64) - tau[:, None]
    codes, _ = import_bitsandbytes().functional.quantize_4bit(blocks.reshape(weight.shape).contiguous(),
                                                              blocksize=64, quant_type="nf4")
    assert torch.allclose(_icq.code_entropy(codes, weight.numel(), 64), ref_h, atol=1e-5)


def test_icq_raises_code_entropy_and_reports_its_error_beside_plain_nf4(reference):
    """Every layer of the tiny model: ICQ's codes carry more information; its reconstruction
    error, reported beside NF4's (docs/quantizers.md has the embedded model's), stays within 5 %."""
    models = {name: copy.deepcopy(reference) for name in ("plain", "icq")}
    stats = {name: NF4.from_values(ICQ if name == "icq" else PLAIN).quantize_model(model, measure=True)
             for name, model in models.items()}
    layers = {name: quantized_layers(model) for name, model in models.items()}
    for (name, plain), icq in zip(layers["plain"].items(), layers["icq"].values()):
        h_plain, h_icq = plain.code_entropy().mean().item(), icq.code_entropy().mean().item()
        assert h_icq > h_plain + 0.02, (name, h_plain, h_icq)
        assert h_icq <= 4
    errors = {name: sum(s.rel_error for s in stat) / len(stat) for name, stat in stats.items()}
    print(f"tiny model, mean ‖W−Ŵ‖/‖W‖: nf4 {errors['plain']:.4f}, nf4:icq=true {errors['icq']:.4f}")
    assert 0.05 < errors["plain"] < 0.12 and abs(errors["icq"] / errors["plain"] - 1) < 0.05


@pytest.mark.parametrize("shape", [(48, 64), (40, 70)])   # whole blocks per row; blocks across rows
def test_icq_forward_is_x_times_the_dequantized_weight_including_tau(shape):
    layer = NF4.from_values(ICQ).quantize_linear(linear(*shape))
    hat = layer.dequantize()
    plain = import_bitsandbytes().functional.dequantize_4bit(layer.codes, layer.quant_state()).float()
    assert (hat - plain).abs().max() > 1e-4          # τ is really in Ŵ …
    x = torch.randn(3, 5, shape[1], generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    y = layer(x)
    expected = x.detach() @ hat.t() + layer.bias
    assert (y.detach() - expected).abs().max().item() <= 1e-5 * expected.abs().max().item()   # … and in forward
    y.sum().backward()
    assert torch.allclose(x.grad, hat.sum(0).expand_as(x), atol=1e-5)
    conformance.layer_contract(NF4.from_values(ICQ))  # deterministic, storage held, set_weight re-searches


def test_icq_tau_bytes_are_counted_and_survive_a_state_dict():
    source = linear(48, 64 * 6)
    plain, icq = (NF4.from_values(o).quantize_linear(source) for o in (PLAIN, ICQ))
    blocks = 48 * 6
    assert icq.tau_code.shape == (blocks,) and icq.tau_code.dtype == torch.uint8
    assert icq.storage_bytes() - plain.storage_bytes() == blocks + 4 * 2 + 256 * 4  # codes, 2 scales, the map
    assert icq.storage_bytes() == tensor_bytes([*icq.buffers(), *icq.parameters()])
    assert model_bytes(nn.Sequential(icq)) - model_bytes(nn.Sequential(plain)) == blocks + 8 + 1024
    again = NF4.from_values(ICQ).quantize_linear(linear(48, 64 * 6, seed=9))
    again.load_state_dict(icq.state_dict())
    assert torch.equal(again.dequantize(), icq.dequantize())


@pytest.mark.parametrize("spec, words", [
    ("nf4:icq_steps=10", ["icq=true"]),
    ("nf4:icq=true:icq_range=0", ["icq_range must be in (0, 1]"]),
    ("nf4:icq=true:icq_steps=0", ["icq_steps must be at least 1"]),
])
def test_icq_option_errors_are_one_line(spec, words):
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    with pytest.raises(QpeftError) as info:
        build_plugin("quantizer", spec, default())
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words), str(info.value)


# -- IEC -------------------------------------------------------------------------------------
def trained(reference, batch, spec: str, quant: str, steps: int = 4):
    """``(model, composition)`` after a few AdamW steps on the logits (A, B and both β move)."""
    from qpeft import testing

    model, composition = testing.adapt(reference, spec, quantizer=quant)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        model(batch).logits.float().logsumexp(-1).mean().backward()
        optimizer.step()
    return model.eval(), composition


def logits(model, batch):
    with torch.no_grad():
        return model(batch).logits.float()


def test_iec_over_icq_computes_the_reference_codes_forward_and_merges(reference, batch):
    """h = A·x + β₁·mean of x's r groups; out = s·(B·h + β₂·h repeated out/r times) — the
    reference's reshape/mean/unsqueeze form, in evaluation (no dropout); IR-QLoRA's merged
    model (Ŵ with τ, plus s·B'·A') gives the adapted model's logits."""
    model, composition = trained(reference, batch, "lora:r=4:dropout=0+iec", "nf4:icq=true:compute_dtype=float32")
    layer = adapter_layers(model)["model.layers.0.self_attn.k_proj"]          # 64 → 32, r = 4
    b1, b2 = layer.connection.beta_in, layer.connection.beta_out
    assert b1.abs().item() > 1e-4 and b2.abs().item() > 1e-4
    x = torch.randn(2, 3, 64, generator=torch.Generator().manual_seed(2))
    h = x @ layer.lora_A.t() + b1 * x.reshape(2, 3, 4, -1).mean(dim=-1)
    out = ((h @ layer.lora_B.t()).reshape(2, 3, 4, -1) + b2 * h.unsqueeze(-1)).reshape(2, 3, -1) * layer.scaling
    with torch.no_grad():
        assert torch.allclose(layer(x) - layer.base(x), out, atol=1e-6)
    merged = composition.method.merge(copy.deepcopy(model))
    assert (logits(merged, batch) - logits(model, batch)).abs().max().item() <= 1e-4


def test_iec_saves_a_plain_lora_that_peft_and_qpeft_load_exactly(reference, batch, tmp_path):
    peft = pytest.importorskip("peft")
    quant = "none:compute_dtype=float32"
    model, composition = trained(reference, batch, "lora:r=4+iec", quant)
    expected = logits(model, batch)
    composition.method.save(model, tmp_path, {"base_model": "tiny", "quantizer": quant})
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4

    from qpeft import testing

    again, _ = testing.adapt(reference, None, quantizer=quant)
    peft_format.load_adapter(again, tmp_path)                      # qpeft: the folded pair, β reset
    assert (logits(again.eval(), batch) - expected).abs().max().item() <= 1e-5
    assert all(layer.connection.beta_in.item() == 0 for layer in adapter_layers(again).values())

    merged = composition.method.merge(copy.deepcopy(model))        # Ŵ + s·B'·A'
    assert (logits(merged, batch) - expected).abs().max().item() <= 1e-4
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(reference), tmp_path).eval()   # the same base
    assert (logits(theirs, batch) - expected).abs().max().item() <= 1e-5


def test_iec_refuses_a_layer_that_reads_a_and_b_itself(reference):
    from qpeft import testing

    with pytest.raises(OptionsError, match="use lora\\+iec"):
        testing.adapt(reference, "dora:r=4+iec")


# -- IR-QLoRA --------------------------------------------------------------------------------
def test_irqlora_runs_end_to_end_through_qpeft_run(tiny_dir, tmp_path):
    from click.testing import CliRunner

    from qpeft.core.cli.main import cli

    result = CliRunner().invoke(cli, [
        "run", "--model", tiny_dir, "--quant", "nf4:icq=true:compute_dtype=float32", "--adapter", "lora:r=4+iec",
        "--evaluators", "perplexity", "--eval-limit", "8", "--steps", "6", "--batch-size", "4",
        "--lr", "1e-2", "--output-dir", str(tmp_path), "--name", "ir"])
    assert result.exit_code == 0, result.output
    run = tmp_path / "ir"
    report = json.loads((run / "report.json").read_text())
    assert report["after"]["perplexity"]["perplexity"] < report["before"]["perplexity"]["perplexity"]
    resolved = json.loads((run / "config.json").read_text())
    assert resolved["quantizer"]["options"]["icq"] is True
    assert [p["name"] for p in resolved["adapter"]["parts"]] == ["lora", "iec"]
    assert json.loads((run / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
