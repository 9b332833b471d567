"""GPTQ re-quantization (core/compare/gptq.py, calibrate.py): it beats plain rounding on the
layer's outputs, its output packs back to its own codes in every format it rounds for, and
with uncorrelated inputs it is plain rounding."""
import numpy as np
import pytest
import torch

from qpeft.core.compare import calibrate, gptq
from qpeft.core.compare.requant import check_spec

NF4 = "nf4:compute_dtype=float32"


@pytest.fixture(scope="module")
def layer():
    """A 96×256 weight and 2,000 correlated inputs (the case GPTQ is for: H far from diagonal)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(96, 256, generator=g) * 0.02
    mix = torch.randn(256, 256, generator=g) * 0.1 + torch.eye(256)
    x = torch.randn(2000, 256, generator=g) @ mix
    return w, gptq.hessian(x), x


def nf4_grid(spec, w):
    return calibrate.grids_for(check_spec(spec))(w)


def requantized(spec, w):
    """``w`` quantized by the qpeft quantizer ``spec`` and dequantized (float32), and its codes."""
    linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(w)
    layer = check_spec(spec).quantize_linear(linear)
    return layer.dequantize(), layer.codes


@pytest.mark.parametrize("kind", ["nf4", "Q4_0", "Q4_1"])
def test_gptq_reconstructs_the_outputs_better_than_plain_rounding(layer, kind):
    w, h, x = layer
    grid = nf4_grid(NF4, w) if kind == "nf4" else gptq.gguf_grid(w, kind)
    plain, tuned = grid.round(w), gptq.gptq(w, h, grid)
    rel = lambda q: float((x @ (w - q).t()).norm() / (x @ w.t()).norm())  # noqa: E731
    # measured: nf4 0.092 → 0.067, q4_0 0.086 → 0.064, q4_1 0.078 → 0.059 (‖X(W−Q)ᵀ‖/‖XWᵀ‖)
    assert rel(tuned) < 0.8 * rel(plain)
    assert gptq.output_error(w, tuned, h) == pytest.approx(rel(tuned) ** 2, rel=1e-3)
    on_grid = grid.round(tuned)          # every value GPTQ chose is a level of its entry's block
    assert torch.equal(on_grid, tuned)


@pytest.mark.parametrize("kind", sorted(gptq.GGUF_GRIDS))
def test_gguf_packs_gptqs_values_back_exactly(layer, kind):
    """gguf.quants derives d (and m) again from the weights it is given; the pinned entries make
    them GPTQ's, so the file holds exactly the rounding GPTQ chose."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize, quantize

    w, h, _ = layer
    tuned = gptq.gptq(w, h, gptq.gguf_grid(w, kind))
    t = GGMLQuantizationType[kind]
    back = dequantize(quantize(tuned.numpy(), t), t).reshape(w.shape)
    assert np.array_equal(back, tuned.numpy())


def test_nf4_packs_gptqs_codes_back(layer):
    """bitsandbytes takes absmax = max|block| again: the pinned ±1 entry makes it GPTQ's scale.
    Without double quantization the values come back bit for bit; with it (the default) the
    codes do, and the 8-bit absmax drifts as it does for any re-quantization (measured 1.4e-4)."""
    w, h, _ = layer
    plain_spec = NF4 + ":double_quant=false"
    tuned = gptq.gptq(w, h, nf4_grid(plain_spec, w))
    back, _ = requantized(plain_spec, tuned)
    assert torch.equal(back, tuned)

    grid = nf4_grid(NF4, w)
    tuned = gptq.gptq(w, h, grid)
    back, codes = requantized(NF4, tuned)
    _, again = requantized(NF4 + ":double_quant=false", tuned)      # codes without the absmax's drift
    assert torch.equal(codes, again)
    assert float((back - tuned).abs().max() / tuned.abs().max()) < 5e-4


def test_uncorrelated_inputs_make_gptq_plain_rounding(layer):
    """With H ∝ I the Cholesky factor is diagonal: no error is fed forward (Alg. 1)."""
    w, _, _ = layer
    grid = gptq.gguf_grid(w, "Q4_0")
    assert torch.equal(gptq.gptq(w, torch.eye(256), grid), grid.round(w))


def test_only_formats_with_a_fixed_grid_calibrate():
    assert calibrate.grids_for(check_spec("nf4")) is not None
    assert calibrate.grids_for(check_spec("nf4:quant_type=fp4")) is not None
    assert calibrate.grids_for(check_spec("hqq:nbits=4")) is None
    assert calibrate.grids_for(check_spec("int8")) is None


def test_layers_are_grouped_by_transformer_block_in_forward_order():
    names = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj",
             "model.layers.10.mlp.up_proj", "lm_head"]
    assert calibrate.block_groups(names) == [names[:2], [names[2]], [names[3]], ["lm_head"]]
