"""``nf4``: bitsandbytes 4-bit NormalFloat (or FP4) with double quantization, as in QLoRA.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3:

    W (out×in) ──blocks of 64──▶ absmax_b = max|W_b|,  codes = nearest NF4 level of W_b / absmax_b
                                 (two 4-bit codes per uint8)
    double quant: absmax (fp32) ──minus its mean (offset)──▶ 8-bit blockwise, blocks of 256,
                                 each with one fp32 absmax of its own

    Storage per weight ≈ 4 bits + 8/64 bits + 32/(64·256) bits ≈ 0.516 bytes.

Backward needs only ``∂L/∂x = ∂L/∂y · Ŵ``: Ŵ is dequantized again there and never stored
(``bitsandbytes.matmul_4bit``), and the codes never receive a gradient (§3, "LoRA on a
frozen 4-bit base").
"""
import dataclasses
from typing import Literal

import torch
from torch import nn

from qpeft import QuantizedLinear, Quantizer, QuantizerOptions, hookimpl, option, tensor_bytes
from qpeft.plugins.quantizers._bnb import import_bitsandbytes

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class Bnb4bitLinear(QuantizedLinear):
    """A frozen linear layer stored as packed 4-bit codes plus the QLoRA quantization state.

    Buffers: ``codes`` (uint8, two weights each), ``absmax`` (fp32 per block, or uint8 with
    double quant), ``code`` (the 16 NF4/FP4 levels) and, with double quant, ``offset``,
    ``absmax2`` and ``code2`` (the 8-bit dynamic map). Keeping them as buffers (rather than
    a ``QuantState`` attribute) lets ``.to(device)`` and ``state_dict`` see them.
    """

    def __init__(self, linear: nn.Linear, quant_type: str, double_quant: bool, blocksize: int,
                 compute_dtype: torch.dtype):
        super().__init__(linear.in_features, linear.out_features, linear.bias, compute_dtype)
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.set_weight(linear.weight)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` blockwise (QLoRA §3: NF4 + double quantization)."""
        functional = import_bitsandbytes().functional
        with torch.no_grad():
            codes, state = functional.quantize_4bit(
                weight.detach().float().contiguous(), blocksize=self.blocksize,
                compress_statistics=self.double_quant, quant_type=self.quant_type)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code.clone())  # per layer, as bnb serialises it
        nested = state.state2 if state.nested else None
        self.register_buffer("offset", state.offset if nested else None)
        self.register_buffer("absmax2", nested.absmax if nested else None)
        self.register_buffer("code2", nested.code.clone() if nested else None)
        self._blocksize2 = nested.blocksize if nested else None

    def quant_state(self):
        """A bitsandbytes ``QuantState`` over this layer's buffers (cheap: no copies)."""
        functional = import_bitsandbytes().functional
        state2 = None
        if self.absmax2 is not None:
            state2 = functional.QuantState(absmax=self.absmax2, code=self.code2,
                                           blocksize=self._blocksize2, dtype=torch.float32)
        return functional.QuantState(
            absmax=self.absmax, shape=torch.Size((self.out_features, self.in_features)),
            code=self.code, blocksize=self.blocksize, quant_type=self.quant_type,
            dtype=self.compute_dtype, offset=self.offset, state2=state2)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Ŵᵀ``; the backward pass dequantizes again and returns ``∂L/∂x`` only."""
        bnb = import_bitsandbytes()
        return bnb.matmul_4bit(x, self.codes.t(), quant_state=self.quant_state())

    def dequantize(self) -> torch.Tensor:
        functional = import_bitsandbytes().functional
        return functional.dequantize_4bit(self.codes, self.quant_state()).float().detach()

    def storage_bytes(self) -> int:
        """Codes + absmax (8-bit with double quant) + offset + nested absmax + both code maps + bias."""
        return tensor_bytes([*self.buffers(), *self.parameters()])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, blocksize={self.blocksize}")


@dataclasses.dataclass
class NF4Options(QuantizerOptions):
    """QLoRA's storage choices (Dettmers et al. 2023, §3)."""

    quant_type: Literal["nf4", "fp4"] = option(
        "nf4", "4-bit data type: nf4 (NormalFloat, QLoRA §3) or fp4 (plain 4-bit float)")
    double_quant: bool = option(
        True, "quantize the per-block absmax to 8 bits too (QLoRA §3, Double Quantization)")
    blocksize: int = option(64, "weights sharing one absmax (64, 128, ... 4096)")

    def __post_init__(self):
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}; "
                             f"got {self.blocksize} (e.g. nf4:blocksize=64)")
        super().__post_init__()


class NF4(Quantizer):
    name = "nf4"
    description = "bitsandbytes 4-bit NF4/FP4 with double quantization (QLoRA)"
    Options = NF4Options

    def quantize_linear(self, linear):
        o = self.options
        return Bnb4bitLinear(linear, o.quant_type, o.double_quant, o.blocksize, self.compute_dtype)


@hookimpl
def register_quantizers(register):
    register(NF4)
