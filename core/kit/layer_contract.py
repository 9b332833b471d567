"""One quantized layer against the :class:`QuantizedLinear` contract, the conformance kit's
first check of a quantizer (:func:`qpeft.core.kit.conformance.check_quantizer`): shapes and
dtype of Ŵ, frozen, forward = x·Ŵᵀ + b, the gradient reaching x, ``storage_bytes()`` equal
to the bytes the layer holds, re-quantizing the same weight exact, ``set_weight`` re-quantizing.
"""


def layer_contract(quantizer) -> None:
    """One quantized layer against the QuantizedLinear contract (see the module doc)."""
    import torch
    from torch import nn

    from qpeft.core.kinds.quantizer import QuantizedLinear

    where = f"quantizer '{quantizer.name}'"
    gen = torch.Generator().manual_seed(0)
    linear = nn.Linear(64, 48)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 64, generator=gen) * 0.05)
    weight = linear.weight.detach().clone()
    layer = quantizer.quantize_linear(linear)
    assert isinstance(layer, QuantizedLinear), f"{where}: quantize_linear returned {type(layer).__name__}"
    hat = layer.dequantize()
    assert hat.shape == (48, 64) and hat.dtype == torch.float32, (
        f"{where}: dequantize gave {hat.dtype} {tuple(hat.shape)}, not float32 (48, 64)")
    assert relative(hat, weight) < 0.3, f"{where}: ‖W−Ŵ‖/‖W‖ = {relative(hat, weight):.3g}; Ŵ is not W quantized"
    assert not any(p.requires_grad for p in layer.parameters()), f"{where}: the layer has trainable tensors"
    x = torch.randn(3, 64, generator=gen).requires_grad_(True)
    y = layer.train()(x)
    expected = x.detach() @ hat.t() + (0 if linear.bias is None else linear.bias.detach())
    assert relative(y.detach().float(), expected) < 0.05, (
        f"{where}: forward differs from x·Ŵᵀ + b by {relative(y.detach().float(), expected):.3g} (relative)")
    y.float().sum().backward()
    assert x.grad is not None and relative(x.grad, hat.sum(0).expand(3, -1)) < 0.05, (
        f"{where}: the gradient reaching the input is not ∂L/∂y·Ŵ")
    storage_is_held(layer, where)
    again = nn.Linear(64, 48)
    with torch.no_grad():
        again.weight.copy_(weight)
        again.bias.copy_(linear.bias)
        same = torch.equal(quantizer.quantize_linear(again).eval()(x), layer.eval()(x))
    assert same, (f"{where}: quantizing the same weight twice gives different layers; a saved "
                  "adapter reloads onto a re-quantized base, so quantizing must be deterministic")
    layer.set_weight(-weight)
    assert relative(layer.dequantize(), -weight) < 0.3, f"{where}: set_weight(W) did not make Ŵ ≈ W"
    storage_is_held(layer, f"{where} after set_weight")


def storage_is_held(layer, where: str) -> None:
    """``storage_bytes()`` equals the bytes of the layer's parameters and buffers (shared
    storage once), and no tensor is held outside them (where ``.to()`` would miss it)."""
    import torch

    from qpeft.core.kinds.quantizer import tensor_bytes

    held = tensor_bytes([*layer.parameters(), *layer.buffers()])
    assert layer.storage_bytes() == held, (f"{where}: storage_bytes() reports {layer.storage_bytes()} "
                                           f"bytes; its tensors hold {held}")
    loose = [k for k, v in vars(layer).items() if isinstance(v, torch.Tensor) and k != "source_weight"]
    assert not loose, f"{where}: tensors {loose} are held outside the layer's buffers"


def relative(a, b) -> float:
    import torch

    return (torch.linalg.norm(a.float() - b.float()) / torch.linalg.norm(b.float())).item()
