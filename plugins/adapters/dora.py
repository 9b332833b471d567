"""DoRA — Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation" (arXiv:2402.09353).

DoRA splits each weight into a magnitude and a direction and adapts the direction with
LoRA (§3, Eq. 5)::

    W' = m · (W + s·B·A) / ‖W + s·B·A‖_c        m: one trainable scalar per output row

    x ──▶ base without bias ─────────┐
    │                               (+)──▶ · m/‖W + s·B·A‖ ──▶ (+ bias)
    └──▶ dropout ──▶ A ──▶ B ──▶ ·s ─┘          (norm detached, §4.3)

The norm is taken per output feature over the input dimension (PEFT's
``lora_magnitude_vector``, shape [out]) and treated as a constant in backward (§4.3),
so gradients flow to m, A and B only through the numerator.

Precision: the factor m/‖W + s·B·A‖ starts at exactly 1 and moves by fractions of a
percent; an activation in bf16 cannot carry a change below half its ulp (0.2–0.4 %), so
DoRA declares ``needs_float32_activations``: the stream between layers stays float32 and
only the quantized matmuls run in the compute dtype, as the merged float32 export does.

Efficiency: the out×in weight is never materialised per step. For row i,

    ‖W_i + s·B_i·A‖² = ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ

where A·Wᵀ = ``base.matmul(A)`` (the frozen layer applied to the r rows of A: r
"tokens" of extra work) and ‖W_i‖² is computed once, when the base weight is set.
"""
import torch
from torch import nn

from qpeft import LoRALinear, LowRankMethod, add_low_rank, hookimpl, low_rank_values


class DoRALinear(LoRALinear):
    """A LoRA layer with a learned magnitude per output row (Liu et al. 2024, Eq. 5)."""

    def __init__(self, base, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__(base, r, scaling, dropout, dtype)
        self.lora_magnitude_vector = nn.Parameter(torch.ones(base.out_features, dtype=dtype,
                                                             device=self.lora_A.device))
        self.register_buffer("weight_sq_norm", torch.empty(0), persistent=False)
        self.base_changed()

    def base_changed(self) -> None:
        """Cache ‖W_i‖² of the (re-)quantized frozen weight."""
        weight = self.base.dequantize().to(self.lora_A.device)
        self.weight_sq_norm = weight.pow(2).sum(dim=1)

    @torch.no_grad()
    def finish_init(self) -> None:
        """m = ‖W + s·B·A‖_c after any init modifier ran (= ‖W‖_c when B = 0; §3)."""
        self.lora_magnitude_vector.copy_(self.weight_norm())

    @torch.no_grad()
    def weight_norm(self) -> torch.Tensor:
        """‖W_i + s·B_i·A‖ for every output row i, float32, without forming W + s·B·A."""
        a, b, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        a_wt = self.base.matmul(self.lora_A.to(self.base.compute_dtype)).float()  # A·Wᵀ: r×out
        cross = (b * a_wt.t()).sum(dim=1)
        quad = ((b @ (a @ a.t())) * b).sum(dim=1)
        return (self.weight_sq_norm + 2 * s * cross + s * s * quad).clamp_min(0).sqrt()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(m/‖W + s·B·A‖)·(W·x + s·B·A·dropout(x)) + bias; the norm is a constant (§4.3)."""
        scale = self.lora_magnitude_vector / self.weight_norm().to(self.lora_magnitude_vector.dtype)
        base = self.base.matmul(x.to(self.base.compute_dtype))
        low = self.low_rank()                           # (A, B, s)
        out = (scale * add_low_rank(base.to(low[0].dtype), self.dropout(x), *low)).to(x.dtype)
        return out if self.base.bias is None else out + self.base.bias

    def merged_weight(self) -> torch.Tensor:
        """m · (W + s·B·A) / ‖W + s·B·A‖_c (Eq. 5), folded for inference."""
        weight = super().merged_weight()
        norm = weight.norm(dim=1, keepdim=True)
        return self.lora_magnitude_vector.detach().float()[:, None] * weight / norm

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {**super().adapter_tensors(), "lora_magnitude_vector": self.lora_magnitude_vector}


class DoRA(LowRankMethod):
    name = "dora"
    description = "DoRA: LoRA on the direction plus a learned magnitude per row (Liu et al. 2024)"
    layer_cls = DoRALinear
    needs_float32_activations = True   # m/‖W + s·B·A‖ starts at 1: bf16 rounds its change away
    peft_note = ("PEFT 0.21 computes a trained DoRA adapter over a bitsandbytes 4-bit base wrongly (perplexity "
                 "807,000 against 4.57 over the same weights dequantized, docs/adapters.md); load it in PEFT over "
                 "a full-precision or dequantized base, or ship the merged model: qpeft export RUN --merge")

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Options for a PEFT LoRA adapter with ``use_dora`` true."""
        if config.get("peft_type") != "LORA" or not config.get("use_dora"):
            return None
        return low_rank_values(config)

    def peft_config(self, model: nn.Module) -> dict:
        return {**super().peft_config(model), "use_dora": True}


@hookimpl
def register_adapters(register):
    register(DoRA)
