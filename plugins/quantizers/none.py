"""``none``: the unquantized baseline, so every comparison has its reference row.

The weight is kept as a plain tensor in the compute dtype (bf16 by default, as the
thesis' baseline; fp32 for parity tests).
"""
import dataclasses

import torch
from torch import nn

from qpeft import QuantizedLinear, Quantizer, QuantizerOptions, hookimpl, tensor_bytes


class PlainLinear(QuantizedLinear):
    """A frozen full-precision linear layer behind the QuantizedLinear contract."""

    def __init__(self, linear: nn.Linear, dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, linear.bias, dtype)
        self.weight = nn.Parameter(linear.weight.detach().to(dtype), requires_grad=False)

    def matmul(self, x):
        return x @ self.weight.t()

    def dequantize(self):
        return self.weight.detach().float()

    def set_weight(self, weight):
        self.weight.data = weight.detach().to(self.weight.device, self.compute_dtype).clone()

    def storage_bytes(self):
        return tensor_bytes([self.weight] + ([self.bias] if self.bias is not None else []))


@dataclasses.dataclass
class NoneOptions(QuantizerOptions):
    """Only the shared options: compute_dtype and include_lm_head."""


class NoQuantization(Quantizer):
    name = "none"
    description = "No quantization: the full-precision baseline (bf16 by default)"
    Options = NoneOptions

    def quantize_linear(self, linear):
        return PlainLinear(linear, self.compute_dtype)

    def layer_from_cache(self, tensors, linear):
        layer = PlainLinear.bare(linear.in_features, linear.out_features, tensors.get("bias"), self.compute_dtype)
        layer.weight = nn.Parameter(tensors["weight"], requires_grad=False)
        return layer


@hookimpl
def register_quantizers(register):
    register(NoQuantization)
