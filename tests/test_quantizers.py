"""The built-in quantizers against numbers: round-trip error, storage, gradients, set_weight.

Error bands are those of the papers' formats on N(0, 1) weights (256×512, groups/blocks of
64): NF4 ≈ 0.092, FP4 ≈ 0.122, HQQ 8/4/3/2 bits ≈ 0.007/0.087/0.18/0.43, int8 ≈ 0.0075.
"""
import json

import pytest
import torch
from click.testing import CliRunner
from torch import nn

from qpeft.core.plugin import registry
from qpeft.core.cli.main import cli
from qpeft.core.base.errors import OptionsError
from qpeft.core.kinds.quantizer import QuantizedLinear, model_bytes, quantized_layers
from qpeft.core.kit.testing import tiny_model

# (name, options, lowest and highest acceptable ‖W−Ŵ‖/‖W‖ on Gaussian weights)
BANDS = [
    ("none", {}, 0.0, 0.005),                      # bf16 rounding only
    ("nf4", {}, 0.07, 0.11),
    ("nf4", {"double_quant": False}, 0.07, 0.11),
    ("nf4", {"quant_type": "fp4"}, 0.11, 0.14),
    ("int8", {}, 0.005, 0.01),
    ("hqq", {"nbits": 8}, 0.004, 0.01),
    ("hqq", {"nbits": 4}, 0.075, 0.10),
    ("hqq", {"nbits": 3}, 0.16, 0.21),
    ("hqq", {"nbits": 2}, 0.38, 0.48),
]
ALL = [(name, opts) for name, opts, _, _ in BANDS] + [("hqq", {"nbits": 1}), ("hqq", {"axis": 0})]


def ids(params):
    return [name + "".join(f":{k}={v}" for k, v in opts.items()) for name, opts, *_ in params]


def quantizer(name, opts=None, **more):
    return registry.get("quantizer", name).from_values({**(opts or {}), **more})


def gaussian_linear(out=256, inp=512, bias=False, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(inp, out, bias=bias)
    nn.init.normal_(linear.weight)
    if bias:
        nn.init.normal_(linear.bias)
    return linear


def rel_error(w, w_hat):
    return (torch.linalg.norm(w.float() - w_hat.float()) / torch.linalg.norm(w.float())).item()


def held_bytes(module):
    """Bytes of every distinct tensor reachable from ``module``, found by walking it."""
    seen, total = set(), 0
    for m in module.modules():
        for t in list(m._parameters.values()) + list(m._buffers.values()):
            if t is not None and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """These matrices are small: extra threads only contend (on a busy 2-core box, 4x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def embedded():
    from qpeft.core.model.models import load_model

    return load_model(None)[0]


# -- round trip --------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,low,high", BANDS, ids=ids(BANDS))
def test_gaussian_round_trip_error_in_band(name, opts, low, high):
    linear = gaussian_linear()
    layer = quantizer(name, opts).quantize_linear(linear)
    assert isinstance(layer, QuantizedLinear)
    assert low <= rel_error(linear.weight, layer.dequantize()) <= high


def test_error_falls_strictly_with_more_bits():
    linear = gaussian_linear()
    err = {b: rel_error(linear.weight, quantizer("hqq", nbits=b).quantize_linear(linear).dequantize())
           for b in (1, 2, 3, 4, 8)}
    assert err[1] > err[2] > err[3] > err[4] > err[8]
    assert err[2] > 4 * err[4]  # 2 bits are far worse than 4, not a little
    nf4 = rel_error(linear.weight, quantizer("nf4").quantize_linear(linear).dequantize())
    fp4 = rel_error(linear.weight, quantizer("nf4", quant_type="fp4").quantize_linear(linear).dequantize())
    int8 = rel_error(linear.weight, quantizer("int8").quantize_linear(linear).dequantize())
    assert int8 < nf4 < fp4  # NF4 is information-theoretically better on normal data (QLoRA §3)


@pytest.mark.parametrize("name,opts,high", [("nf4", {}, 0.11), ("hqq", {"nbits": 4}, 0.095),
                                            ("hqq", {"nbits": 2}, 0.55), ("int8", {}, 0.012)])
def test_real_layer_error(embedded, name, opts, high):
    for linear in (embedded.model.layers[0].self_attn.q_proj, embedded.model.layers[5].mlp.down_proj):
        err = rel_error(linear.weight, quantizer(name, opts).quantize_linear(linear).dequantize())
        assert high / 3 < err <= high


# -- storage -----------------------------------------------------------------------------
def test_nf4_storage_counts_codes_and_every_quant_state_tensor():
    n = 256 * 512
    dq = quantizer("nf4").quantize_linear(gaussian_linear())
    # codes n/2 + uint8 absmax n/64 + 16 fp32 levels + fp32 offset + fp32 absmax per 256
    # blocks + 256 fp32 dynamic-map levels
    assert dq.storage_bytes() == n // 2 + n // 64 + 16 * 4 + 4 + (n // 64 // 256) * 4 + 256 * 4
    assert dq.storage_bytes() / n <= 0.55
    plain = quantizer("nf4", double_quant=False).quantize_linear(gaussian_linear())
    assert plain.storage_bytes() == n // 2 + (n // 64) * 4 + 16 * 4
    assert plain.storage_bytes() > dq.storage_bytes()


def test_real_layer_storage_at_most_055_bytes_per_weight(embedded):
    linear = embedded.model.layers[0].self_attn.k_proj  # the smallest layer: overhead shows most
    layer = quantizer("nf4").quantize_linear(linear)
    assert layer.storage_bytes() / linear.weight.numel() <= 0.55


@pytest.mark.parametrize("name,opts,per_weight", [
    ("hqq", {"nbits": 4}, 0.5 + 4 / 64), ("hqq", {"nbits": 2}, 0.25 + 4 / 64),
    ("hqq", {"nbits": 8, "compute_dtype": "float32"}, 1 + 8 / 64), ("int8", {}, 1 + 4 / 512),
    ("none", {}, 2.0)], ids=ids([("hqq", {"nbits": 4}), ("hqq", {"nbits": 2}),
                                 ("hqq", {"nbits": 8, "compute_dtype": "float32"}),
                                 ("int8", {}), ("none", {})]))
def test_bytes_per_weight_is_exact(name, opts, per_weight):
    opts = {"compute_dtype": "bfloat16", **opts}       # 2-byte scales and zeros unless given
    layer = quantizer(name, opts).quantize_linear(gaussian_linear())
    assert layer.storage_bytes() == pytest.approx(per_weight * 256 * 512)


@pytest.mark.parametrize("name,opts", ALL, ids=ids(ALL))
def test_reported_bytes_equal_tensors_actually_held(name, opts):
    model = tiny_model(vocab_size=1000)
    quantizer(name, opts).quantize_model(model)
    layers = quantized_layers(model)
    assert len(layers) == 14
    for layer in layers.values():
        assert layer.storage_bytes() == held_bytes(layer)
    assert model_bytes(model) == held_bytes(model)


# -- forward and backward ----------------------------------------------------------------
@pytest.mark.parametrize("name,opts", ALL, ids=ids(ALL))
@pytest.mark.parametrize("dtype,tol", [("bfloat16", 2e-2), ("float32", 1e-4)])
def test_forward_backward_match_dequantized_weight(name, opts, dtype, tol):
    layer = quantizer(name, opts, compute_dtype=dtype).quantize_linear(gaussian_linear(bias=True))
    layer.train()  # int8 multiplies by the dequantized weight while training
    w_hat, b = layer.dequantize(), layer.bias.float()
    x = torch.randn(2, 5, 512, requires_grad=True)
    y = layer(x)
    assert y.dtype == x.dtype and y.shape == (2, 5, 256)   # computed in dtype, returned in x's
    ref = x.detach() @ w_hat.t() + b
    assert rel_error(ref, y.detach()) < tol
    grad_out = torch.randn_like(ref)
    y.backward(grad_out.to(y.dtype))
    assert x.grad is not None and rel_error(grad_out @ w_hat, x.grad) < tol
    assert all(not p.requires_grad and p.grad is None for p in layer.parameters())
    assert all(not t.requires_grad for t in layer.buffers())


def test_int8_eval_uses_the_int8_matmul_and_stays_close():
    layer = quantizer("int8").quantize_linear(gaussian_linear(bias=True)).eval()
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    ref = x.float() @ layer.dequantize().t() + layer.bias.float()
    err = rel_error(ref, layer(x))
    assert 1e-3 < err < 2e-2  # activations quantized too (LLM.int8 §3.2), so not exact


# -- set_weight --------------------------------------------------------------------------
@pytest.mark.parametrize("name,opts,low,high", BANDS, ids=ids(BANDS))
def test_set_weight_requantizes(name, opts, low, high):
    q = quantizer(name, opts)
    layer = q.quantize_linear(gaussian_linear(seed=0))
    new = gaussian_linear(seed=1)
    layer.set_weight(new.weight.detach() * 3)
    fresh = q.quantize_linear(nn.Linear(512, 256, bias=False).requires_grad_(False))
    fresh.set_weight(new.weight.detach() * 3)
    assert torch.equal(layer.dequantize(), fresh.dequantize())
    assert low <= rel_error(new.weight * 3, layer.dequantize()) <= high


# -- options and the command -------------------------------------------------------------
@pytest.mark.parametrize("spec,words", [
    ("hqq:nbits=5", ["nbits must be one of 1, 2, 3, 4, 8", "hqq:nbits=4"]),
    ("hqq:bits=4", ["no option 'bits'", "did you mean 'nbits'"]),
    ("hqq:group_size=60", ["multiple of 8"]),
    ("nf4:blocksize=100", ["blocksize must be one of"]),
    ("nf4:quant_type=int3", ["must be one of nf4, fp4"]),
    ("int8:threshold=-1", ["threshold must be >= 0"]),
])
def test_bad_options_are_refused_in_one_line(spec, words):
    from qpeft.core.cli.quantize_cmd import build_quantizer

    with pytest.raises(OptionsError) as info:
        build_quantizer(spec)
    assert "\n" not in str(info.value) and all(w in str(info.value) for w in words)
    result = CliRunner().invoke(cli, ["quantize", "--model", "tiny", "--quant", spec])
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("Error: ") and "\n" not in err and words[0] in err


def test_quantize_command_json_on_tiny_model():
    result = CliRunner().invoke(cli, ["quantize", "--model", "tiny", "--quant", "hqq:nbits=2:compute_dtype=bfloat16",
                                      "--json", "--layers"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["spec"] == "hqq:nbits=2:compute_dtype=bfloat16" and report["options"]["nbits"] == 2
    assert report["layers"] == 14 and len(report["per_layer"]) == 14
    assert report["quantized_weights"] == 2 * (2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 128)
    assert report["bytes_after"] < report["bytes_before"]
    assert report["bytes_per_weight"] == pytest.approx(0.25 + 4 / 64)
    assert 0.38 < report["rel_error_mean"] <= report["rel_error_worst"] < 0.6
    worst = max(report["per_layer"], key=lambda r: r["rel_error"])
    assert report["worst_layer"] == worst["name"] and report["seconds"] > 0


def test_quantize_command_table():
    result = CliRunner().invoke(cli, ["quantize", "--model", "tiny", "--quant", "nf4", "--layers"])
    assert result.exit_code == 0, result.output
    for field in ("size before", "size after", "bytes/weight", "rel. error", "worst", "time",
                  "model.layers.1.mlp.down_proj"):
        assert field in result.output


def test_listing_shows_the_quantizers_and_their_options():
    result = CliRunner().invoke(cli, ["list", "quantizer"])
    assert result.exit_code == 0
    for word in ("nf4", "hqq", "int8", "double_quant=True", "nbits=4", "threshold=6.0"):
        assert word in result.output


def test_bitsandbytes_imports_quietly():
    import subprocess
    import sys

    code = ("from qpeft.plugins.quantizers.nf4 import import_bitsandbytes; import_bitsandbytes()")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == ""
