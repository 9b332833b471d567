"""``int8``: LLM.int8() weights through bitsandbytes (Dettmers et al. 2022).

Dettmers et al., "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale" (2022):

    W (out×in) ──row-wise absmax (§3.1, vector-wise quantization)──▶ CB = round(127·W/SCB) (int8)
                                                                      SCB = max|W_row| (fp32)
    forward (§3.2): activation columns with |x| > threshold stay in 16 bits (mixed-precision
    decomposition); the rest is quantized row-wise and multiplied in int8.

    Storage per weight: 1 byte + 4 bytes per output row.

bitsandbytes decides how to multiply: in eval mode the int8 decomposition above; in train
mode on CPU it dequantizes CB and multiplies in the compute dtype (``MatMul8bitFp``, its
faster CPU path). Either way ``∂L/∂x = ∂L/∂y · Ŵ`` and CB never receives a gradient.
"""
import dataclasses

import torch
from torch import nn

from qpeft import QuantizedLinear, Quantizer, QuantizerOptions, hookimpl, option, tensor_bytes
from qpeft.plugins.quantizers._bnb import import_bitsandbytes


class Int8Linear(QuantizedLinear):
    """A frozen linear layer stored as int8 rows ``CB`` with fp32 row scales ``SCB``."""

    def __init__(self, linear: nn.Linear, threshold: float, compute_dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, linear.bias, compute_dtype)
        self.threshold = threshold
        self.set_weight(linear.weight)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Vector-wise int8 quantization (§3.1), from fp16 as ``bnb.nn.Int8Params`` does."""
        functional = import_bitsandbytes().functional
        with torch.no_grad():
            cb, scb, _ = functional.int8_vectorwise_quant(weight.detach().to(torch.float16).contiguous())
        self.register_buffer("CB", cb)
        self.register_buffer("SCB", scb)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Ŵᵀ`` via ``bitsandbytes.matmul`` with the outlier threshold of §3.2."""
        bnb = import_bitsandbytes()
        state = bnb.MatmulLtState()
        state.CB, state.SCB, state.threshold = self.CB, self.SCB, self.threshold
        state.has_fp16_weights = False
        state.is_training = self.training
        if state.is_training and x.device.type in ("cpu", "xpu"):
            return bnb.matmul(x, self.CB, state=state)  # bitsandbytes' dequantize-and-multiply path
        # The int8 kernels take fp16 input; casting here spares a warning per call.
        return bnb.matmul(x.to(torch.float16), self.CB, state=state).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return (self.CB.float() * (self.SCB.float() / 127).unsqueeze(1)).detach()

    def storage_bytes(self) -> int:
        """int8 codes + one fp32 scale per output row + bias."""
        return tensor_bytes([self.CB, self.SCB] + ([self.bias] if self.bias is not None else []))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, threshold={self.threshold}"


@dataclasses.dataclass
class Int8Options(QuantizerOptions):
    """LLM.int8()'s one knob (Dettmers et al. 2022, §3.2)."""

    threshold: float = option(6.0, "activation magnitude above which a feature stays 16-bit "
                                    "(LLM.int8 §3.2); 0 quantizes every feature")

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"threshold must be >= 0; got {self.threshold} (e.g. int8:threshold=6.0)")
        super().__post_init__()


class Int8(Quantizer):
    name = "int8"
    description = "bitsandbytes LLM.int8(): 8-bit row-wise weights, outlier decomposition"
    Options = Int8Options

    def quantize_linear(self, linear):
        return Int8Linear(linear, self.options.threshold, self.compute_dtype)

    def layer_from_cache(self, tensors, linear):
        layer = Int8Linear.bare(linear.in_features, linear.out_features, tensors.get("bias"), self.compute_dtype)
        layer.threshold = self.options.threshold
        layer.register_buffer("CB", tensors["CB"])
        layer.register_buffer("SCB", tensors["SCB"])
        return layer


@hookimpl
def register_quantizers(register):
    register(Int8)
