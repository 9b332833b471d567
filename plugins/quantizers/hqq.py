"""``hqq``: Half-Quadratic Quantization, calibration-free (Badri & Shaji 2023).

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023):

    W (out×in) ──groups of 64 along `axis`──▶ affine codes  W_q = round(W/s + z) ∈ [0, 2ᵇ−1]
    the zero-points z are optimised by a half-quadratic solver for a sparsity-promoting
    ‖W − s(W_q − z)‖_p, p = 0.7 (§2, "Optimization"); scale s from min/max, no data needed.

    Storage per weight: b bits (packed; 3-bit in int32 words) + fp16/bf16 scale and zero
    per group ≈ b/8 + 4/64 bytes (0.5625 at 4 bits).

The zero-points come from ``_hqq_solver``: hqq's own proximal solver
(``optimize_weights_proximal``, with ``BaseQuantizeConfig``'s parameters) run in cache-sized
chunks of groups, ~20× less CPU time than hqq's whole-layer passes, with no higher error
(benchmarks/hqq_speed.py). The codes are packed by hqq's ``BitPack`` and dequantized by its
``Quantizer.dequantize``, in hqq's layout; they are held here as buffers, so
``.to(device)`` and ``state_dict`` work (``HQQLinear.to`` is a no-op) and hqq never touches
CUDA on a CPU run.
"""
import dataclasses

import torch
from torch import nn

from qpeft import OptionsError, QuantizedLinear, Quantizer, QuantizerOptions, hookimpl, option, tensor_bytes
from qpeft.plugins.quantizers._hqq_solver import solve

NBITS = (1, 2, 3, 4, 8)


class _DequantizeMatmul(torch.autograd.Function):
    """``y = x·Ŵᵀ`` that keeps no Ŵ for backward: it dequantizes again (as hqq's
    ``HQQMatmulNoCacheMul``), so training memory holds only the packed codes."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x @ layer.weight_hat(x.dtype).t()

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out @ ctx.layer.weight_hat(grad_out.dtype), None


class HQQLinear(QuantizedLinear):
    """A frozen linear layer stored as hqq bit-packed codes ``W_q`` with ``scale`` and ``zero``."""

    def __init__(self, linear: nn.Linear, nbits: int, group_size: int, axis: int,
                 compute_dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, linear.bias, compute_dtype)
        self.nbits, self.group_size, self.axis = nbits, group_size, axis
        self.set_weight(linear.weight)

    def _describe(self, shape: torch.Size) -> None:
        """hqq's meta data of the packed codes (what ``Quantizer.dequantize`` reads)."""
        from hqq.core.quantize import Quantizer as HqqQuantizer

        packing = HqqQuantizer.bit_to_packing[self.nbits]
        self._meta = {"nbits": self.nbits, "group_size": self.group_size, "shape": shape,
                      "axis": self.axis, "packing": packing, "view_as_float": False,
                      "unpack_view_dtype": HqqQuantizer.unpack_view_dtype[packing]}

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` with the half-quadratic zero-point solver (paper §2), codes
        packed as hqq's ``Quantizer.quantize`` packs them."""
        from hqq.core.quantize import BaseQuantizeConfig, Quantizer as HqqQuantizer

        params = BaseQuantizeConfig(nbits=self.nbits, group_size=self.group_size,
                                    axis=self.axis)["weight_quant_params"]
        codes, scale, zero, _ = solve(weight, self.nbits, self.group_size, self.axis,
                                      params["round_zero"], self.compute_dtype)
        packing = HqqQuantizer.bit_to_packing[self.nbits]
        # As HQQLinear.cuda(): scale and zero are kept in the compute dtype.
        self.register_buffer("W_q", HqqQuantizer.pack[packing](codes).contiguous())
        self.register_buffer("scale", scale.to(self.compute_dtype))
        self.register_buffer("zero", zero.to(self.compute_dtype))
        self._describe(weight.shape)

    def weight_hat(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Ŵ = (unpack(W_q) − zero)·scale, reshaped to out×in (hqq ``Quantizer.dequantize``)."""
        from hqq.core.quantize import Quantizer as HqqQuantizer

        meta = {**self._meta, "scale": self.scale, "zero": self.zero,
                "compute_dtype": self.compute_dtype}
        w = HqqQuantizer.dequantize(self.W_q, meta)
        return w if dtype is None else w.to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return _DequantizeMatmul.apply(x, self)

    def dequantize(self) -> torch.Tensor:
        with torch.no_grad():
            return self.weight_hat().float()

    def storage_bytes(self) -> int:
        """Packed codes + scale + zero (compute dtype, one each per group) + bias."""
        return tensor_bytes([self.W_q, self.scale, self.zero] + ([self.bias] if self.bias is not None else []))

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, nbits={self.nbits}, group_size={self.group_size}, "
                f"axis={self.axis}")


@dataclasses.dataclass
class HQQOptions(QuantizerOptions):
    """The parameters of hqq's ``BaseQuantizeConfig`` that change the stored model."""

    nbits: int = option(4, "bits per weight: 1, 2, 3, 4 or 8")
    group_size: int = option(64, "weights sharing one scale and zero (a multiple of 8)")
    axis: int = option(1, "grouping axis: 1 = consecutive weights of a row, 0 = hqq's strided layout")

    def __post_init__(self):
        if self.nbits not in NBITS:
            raise ValueError(f"nbits must be one of {', '.join(map(str, NBITS))}; got "
                             f"{self.nbits} (e.g. hqq:nbits=4)")
        if self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"group_size must be a positive multiple of 8; got "
                             f"{self.group_size} (e.g. hqq:group_size=64)")
        if self.axis not in (0, 1):
            raise ValueError(f"axis must be 0 or 1; got {self.axis} (e.g. hqq:axis=1)")
        super().__post_init__()


class HQQ(Quantizer):
    name = "hqq"
    description = "Half-Quadratic Quantization, 1-8 bits, calibration-free (Badri & Shaji 2023)"
    Options = HQQOptions
    cache_version = 2   # the solver's chunked zero-points (_hqq_solver) changed the stored tensors

    def quantize_linear(self, linear):
        o = self.options
        if linear.weight.numel() % o.group_size:
            raise OptionsError(
                f"hqq: a {linear.out_features}×{linear.in_features} layer cannot be split into "
                f"groups of {o.group_size}; pick a group_size dividing its size, e.g. hqq:group_size=32")
        return HQQLinear(linear, o.nbits, o.group_size, o.axis, self.compute_dtype)

    def layer_from_cache(self, tensors, linear):
        o = self.options
        layer = HQQLinear.bare(linear.in_features, linear.out_features, tensors.get("bias"), self.compute_dtype)
        layer.nbits, layer.group_size, layer.axis = o.nbits, o.group_size, o.axis
        for name in ("W_q", "scale", "zero"):
            layer.register_buffer(name, tensors[name])
        layer._describe(torch.Size((linear.out_features, linear.in_features)))
        return layer


@hookimpl
def register_quantizers(register):
    register(HQQ)
