"""``nf4``: bitsandbytes 4-bit NormalFloat (or FP4) with double quantization, as in QLoRA.

Dettmers et al. 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", §3:

    W (out×in) ──blocks of 64──▶ absmax_b = max|W_b|,  codes = nearest NF4 level of W_b / absmax_b
                                 (two 4-bit codes per uint8)
    double quant: absmax (fp32) ──minus its mean (offset)──▶ 8-bit blockwise, blocks of 256,
                                 each with one fp32 absmax of its own

    Storage per weight ≈ 4 bits + 8/64 bits + 32/(64·256) bits ≈ 0.516 bytes.

With ``icq=true`` (IR-QLoRA's Information Calibration Quantization, Qin et al. 2024, §3.1;
``plugins/quantizers/_icq.py``) each block is shifted by the τ that maximises its codes'
entropy before quantizing, and τ is stored beside the block's absmax (8 bits a block, one fp32
per 256 blocks: ≈ 0.532 bytes per weight)::

    Ŵ_b = deq(Q(W_b − τ_b)) + τ_b          y = x·deq(Q(W − τ))ᵀ + Σ_b τ_b·(Σ_{i∈b} x_i)

The τ term is exact and cheap: with ``in_features`` a multiple of ``blocksize`` each row's
blocks are consecutive slices of x, so it is (x summed per block) · Tᵀ, T the (out × in/blocksize)
matrix of τ — 1/blocksize of the main matmul's work (else x·T_fullᵀ with τ spread per weight).
bitsandbytes' kernel multiplies by the codes only; the τ term is added beside it.

Backward needs only ``∂L/∂x = ∂L/∂y · Ŵ``: Ŵ is dequantized again there and never stored
(``bitsandbytes.matmul_4bit``), and the codes never receive a gradient (§3, "LoRA on a
frozen 4-bit base").
"""
import dataclasses
from typing import Literal

import torch
from torch import nn

from qpeft import QuantizedLinear, Quantizer, QuantizerOptions, hookimpl, option, tensor_bytes
from qpeft.plugins.quantizers import _icq
from qpeft.plugins.quantizers._bnb import import_bitsandbytes

BLOCKSIZES = (64, 128, 256, 512, 1024, 2048, 4096)


class Bnb4bitLinear(QuantizedLinear):
    """A frozen linear layer stored as packed 4-bit codes plus the QLoRA quantization state.

    Buffers: ``codes`` (uint8, two weights each), ``absmax`` (fp32 per block, or uint8 with
    double quant), ``code`` (the 16 NF4/FP4 levels) and, with double quant, ``offset``,
    ``absmax2`` and ``code2`` (the 8-bit dynamic map); with ICQ (``icq=(range, steps)``) also
    ``tau_code`` (uint8 per block), ``tau_absmax`` (fp32 per 256 blocks) and ``tau_map`` (τ's
    256-value code book). Keeping them as buffers (rather than a ``QuantState`` attribute) lets
    ``.to(device)`` and ``state_dict`` see them.
    """

    def __init__(self, linear: nn.Linear, quant_type: str, double_quant: bool, blocksize: int,
                 compute_dtype: torch.dtype, icq: tuple[float, int] | None = None):
        super().__init__(linear.in_features, linear.out_features, linear.bias, compute_dtype)
        self.quant_type, self.double_quant, self.blocksize = quant_type, double_quant, blocksize
        self.icq = icq
        self.set_weight(linear.weight)

    def set_weight(self, weight: torch.Tensor) -> None:
        """Quantize ``weight`` blockwise (QLoRA §3: NF4 + double quantization), after
        subtracting each block's τ with ICQ (IR-QLoRA §3.1)."""
        functional = import_bitsandbytes().functional
        weight = weight.detach().float().contiguous()
        if self.icq is not None:
            weight = self._calibrate(weight)
        with torch.no_grad():
            codes, state = functional.quantize_4bit(
                weight, blocksize=self.blocksize,
                compress_statistics=self.double_quant, quant_type=self.quant_type)
        self.register_buffer("codes", codes)
        self.register_buffer("absmax", state.absmax)
        self.register_buffer("code", state.code.clone())  # per layer, as bnb serialises it
        nested = state.state2 if state.nested else None
        self.register_buffer("offset", state.offset if nested else None)
        self.register_buffer("absmax2", nested.absmax if nested else None)
        self.register_buffer("code2", nested.code.clone() if nested else None)
        self._blocksize2 = nested.blocksize if nested else None

    @torch.no_grad()
    def _calibrate(self, weight: torch.Tensor) -> torch.Tensor:
        """Search and store τ per block (IR-QLoRA §3.1); returns W − τ̂, what is quantized."""
        levels = import_bitsandbytes().functional.get_4bit_type(self.quant_type, device=weight.device)
        tau = _icq.search(weight, self.blocksize, levels, *self.icq)
        book = _icq.dynamic_map().to(weight.device)
        code, absmax = _icq.store(tau, book)
        self.register_buffer("tau_code", code)
        self.register_buffer("tau_absmax", absmax)
        self.register_buffer("tau_map", book)
        return weight - self.tau_full()

    def tau(self) -> torch.Tensor:
        """τ̂ per block, float32 (ICQ only)."""
        return _icq.restore(self.tau_code, self.tau_absmax, self.tau_map)

    def tau_full(self) -> torch.Tensor:
        """τ̂ spread over every weight it shifts, out×in float32 (ICQ only)."""
        n = self.out_features * self.in_features
        return self.tau().repeat_interleave(self.blocksize)[:n].view(self.out_features, self.in_features)

    def tau_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x·τ̂ᵀ``, τ̂ as an out×in matrix, exactly and without forming it when each row
        is whole blocks: (x summed per block)·Tᵀ, T = τ̂ as out × (in/blocksize)."""
        if self.in_features % self.blocksize:
            return x @ self.tau_full().to(x.dtype).t()
        per_row = self.in_features // self.blocksize
        sums = x.unflatten(-1, (per_row, self.blocksize)).sum(-1)
        return sums @ self.tau().view(self.out_features, per_row).to(x.dtype).t()

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
        y = bnb.matmul_4bit(x, self.codes.t(), quant_state=self.quant_state())
        return y if self.icq is None else y + self.tau_matmul(x)

    def dequantize(self) -> torch.Tensor:
        """Ŵ = deq(codes), plus τ̂ per block with ICQ (what merge and every export read)."""
        functional = import_bitsandbytes().functional
        weight = functional.dequantize_4bit(self.codes, self.quant_state()).float().detach()
        return weight if self.icq is None else weight + self.tau_full().to(weight.device)

    def code_entropy(self) -> torch.Tensor:
        """Entropy in bits of each block's 4-bit codes (ICQ maximises it; at most 4)."""
        return _icq.code_entropy(self.codes, self.out_features * self.in_features, self.blocksize)

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        """The buffers and bias, plus the nested blocksize (double quant) as a 0-d tensor."""
        tensors = super().cache_tensors()
        if self._blocksize2 is not None:
            tensors["blocksize2"] = torch.tensor(self._blocksize2)
        return tensors

    def storage_bytes(self) -> int:
        """Codes + absmax (8-bit with double quant) + offset + nested absmax + both code maps
        (+ τ's codes, scales and map with ICQ) + bias."""
        return tensor_bytes([*self.buffers(), *self.parameters()])

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, quant_type={self.quant_type}, "
                f"double_quant={self.double_quant}, blocksize={self.blocksize}"
                + ("" if self.icq is None else f", icq=range {self.icq[0]:g} steps {self.icq[1]}"))


@dataclasses.dataclass
class NF4Options(QuantizerOptions):
    """QLoRA's storage choices (Dettmers et al. 2023, §3)."""

    quant_type: Literal["nf4", "fp4"] = option(
        "nf4", "4-bit data type: nf4 (NormalFloat, QLoRA §3) or fp4 (plain 4-bit float)")
    double_quant: bool = option(
        True, "quantize the per-block absmax to 8 bits too (QLoRA §3, Double Quantization)")
    blocksize: int = option(64, "weights sharing one absmax (64, 128, ... 4096)")
    icq: bool = option(False, "IR-QLoRA's Information Calibration Quantization: shift each block by the τ "
                              "maximising its codes' entropy, stored beside its absmax (Qin et al. 2024, §3.1)")
    icq_range: float = option(0.1, "ICQ: τ searched within ±icq_range·σ·max|W_b − median| of the block's "
                                   "median (the reference's tau_lambda)")
    icq_steps: int = option(100, "ICQ: candidates on each side of the median (the reference's tau_n; 2n+1 tried)")

    def __post_init__(self):
        if self.blocksize not in BLOCKSIZES:
            raise ValueError(f"blocksize must be one of {', '.join(map(str, BLOCKSIZES))}; "
                             f"got {self.blocksize} (e.g. nf4:blocksize=64)")
        if not 0 < self.icq_range <= 1:
            raise ValueError(f"icq_range must be in (0, 1], got {self.icq_range} (e.g. nf4:icq=true:icq_range=0.1)")
        if self.icq_steps < 1:
            raise ValueError(f"icq_steps must be at least 1, got {self.icq_steps}")
        if not self.icq and (self.icq_range, self.icq_steps) != (0.1, 100):
            raise ValueError("icq_range and icq_steps tune ICQ, which is off; add icq=true (nf4:icq=true:icq_steps=50)")
        super().__post_init__()


class NF4(Quantizer):
    name = "nf4"
    description = "bitsandbytes 4-bit NF4/FP4 with double quantization (QLoRA); icq=true: IR-QLoRA's ICQ"
    Options = NF4Options

    def quantize_linear(self, linear):
        o = self.options
        icq = (o.icq_range, o.icq_steps) if o.icq else None
        return Bnb4bitLinear(linear, o.quant_type, o.double_quant, o.blocksize, self.compute_dtype, icq)

    def layer_from_cache(self, tensors, linear):
        o = self.options
        layer = Bnb4bitLinear.bare(linear.in_features, linear.out_features, tensors.get("bias"), self.compute_dtype)
        layer.quant_type, layer.double_quant, layer.blocksize = o.quant_type, o.double_quant, o.blocksize
        layer.icq = (o.icq_range, o.icq_steps) if o.icq else None
        for name in ("tau_code", "tau_absmax", "tau_map") if o.icq else ():
            layer.register_buffer(name, tensors[name])
        for name in ("codes", "absmax", "code", "offset", "absmax2", "code2"):
            layer.register_buffer(name, tensors.get(name))
        nested = tensors.get("blocksize2")
        layer._blocksize2 = None if nested is None else int(nested)
        return layer


@hookimpl
def register_quantizers(register):
    register(NF4)
