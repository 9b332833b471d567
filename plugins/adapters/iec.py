"""IEC, the Information Elastic Connection of IR-QLoRA — Qin et al. 2024, "Accurate
LoRA-Finetuning Quantization of LLMs via Information Retention" (ICML 2024, arXiv:2402.05445),
§3.2. ``--quant nf4:icq=true --adapter lora+iec`` is IR-QLoRA.

A modifier of LoRA's ``"connection"`` slot: beside A and B, two connections without weight
matrices let the low-rank path see the input and its own r-wide code directly (§3.2)::

    x ──▶ A·x + β₁·G·x ──▶ h (r)        G·x: x split into r consecutive groups, each averaged
    h ──▶ B·h + β₂·R·h ──▶ ·s           R·h: each of the r values repeated over its out/r outputs

β₁, β₂ are one trainable scalar each per layer, zero at the start (as in the reference code,
htqin/IR-QLoRA ``IRQLoraLinear4bit``: ``lora_default_A_scale``/``_B_scale``, the group mean
``x.reshape(…, r, -1).mean(-1)`` and the repeat ``h.unsqueeze(-1)`` over ``out/r``), so the
adapted model starts equal to the base. Where r does not divide in (or out), group k holds the
inputs i with ⌊i·r/in⌋ = k — the same groups when it does.

Both connections are linear, so the update is a LoRA of the same rank::

    s·(B + β₂·R)·(A + β₁·G)            A' = A + β₁·G (r×in),  B' = B + β₂·R (out×r)

which is what the layer computes with (the slot's ``fold``): forward, merge, and the saved
adapter, a plain PEFT LoRA of A', B' that PEFT loads exactly. One difference from the
reference: with dropout > 0, G sees the dropped-out input as A does (the reference feeds it
the undropped x); in evaluation, merge and export they are the same.

    lora+iec      lora:r=16+iec+rslora      lora+iec+pissa
"""
import torch
from torch import nn

from qpeft import Adapter, LoRALinear, OptionsError, hookimpl

# LoRALinear methods that read A and B themselves: a layer overriding one would not see the fold
READERS = ("low_rank", "forward", "lora_delta", "delta_weight", "merged_weight", "adapter_tensors",
           "load_adapter_tensors", "finish_init")


def groups(n: int, r: int, device) -> torch.Tensor:
    """The group (0…r−1) of each of ``n`` positions: ⌊i·r/n⌋ (i // (n/r) when r divides n)."""
    return torch.arange(n, device=device) * r // n


def group_mean(r: int, n: int, device, dtype) -> torch.Tensor:
    """G (r×n): G·x averages each of the r consecutive groups of x (§3.2, the input connection)."""
    member = (groups(n, r, device)[None, :] == torch.arange(r, device=device)[:, None]).to(dtype)
    return member / member.sum(dim=1, keepdim=True).clamp_min(1)


def repeat(n: int, r: int, device, dtype) -> torch.Tensor:
    """R (n×r): R·h repeats each of the r values over its group of the n outputs (§3.2)."""
    return (groups(n, r, device)[:, None] == torch.arange(r, device=device)[None, :]).to(dtype)


class ElasticConnection(nn.Module):
    """One layer's β₁, β₂ and the fold (A, B, s) → (A + β₁·G, B + β₂·R, s)."""

    def __init__(self, device, dtype):
        super().__init__()
        self.beta_in = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))
        self.beta_out = nn.Parameter(torch.zeros(1, device=device, dtype=dtype))

    def fold(self, a: torch.Tensor, b: torch.Tensor, s: float):
        r = a.shape[0]
        if not r:   # a layer left at rank 0 (EVA)
            return a, b, s
        a = a + self.beta_in.to(a.dtype) * group_mean(r, a.shape[1], a.device, a.dtype)
        b = b + self.beta_out.to(b.dtype) * repeat(b.shape[0], r, b.device, b.dtype)
        return a, b, s

    @torch.no_grad()
    def reset(self) -> None:
        """β₁ = β₂ = 0: the fold is the identity (a loaded pair already holds it)."""
        self.beta_in.zero_()
        self.beta_out.zero_()

    def extra_repr(self) -> str:
        return f"beta_in={self.beta_in.item():.4g}, beta_out={self.beta_out.item():.4g}"


class IEC(Adapter):
    name = "iec"
    description = "IEC: group-mean and repeat connections around A and B, two scalars a layer (IR-QLoRA, Qin et al. 2024)"
    role = "modifier"
    modifies = "connection"

    def connect(self, layer) -> ElasticConnection:
        """β₁ = β₂ = 0 beside the layer's A and B (§3.2)."""
        changed = [n for n in READERS if getattr(type(layer), n) is not getattr(LoRALinear, n)]
        if changed:
            raise OptionsError(f"iec folds into LoRA's A and B, but a {type(layer).__name__} computes with them "
                               f"in its own {', '.join(changed)}; use lora+iec")
        return ElasticConnection(layer.lora_A.device, layer.lora_A.dtype)


@hookimpl
def register_adapters(register):
    register(IEC)
