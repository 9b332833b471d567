"""ICQ, the Information Calibration Quantization of IR-QLoRA — Qin et al. 2024, "Accurate
LoRA-Finetuning Quantization of LLMs via Information Retention" (ICML 2024, arXiv:2402.05445),
§3.1. A private module of the plugins package (``nf4:icq=true`` uses it), not a plugin.

Per quantization block b (the NF4 block of ``blocksize`` weights), a calibration constant τ_b
is subtracted before quantizing and added back after::

    Ŵ_b = deq(Q(W_b − τ_b)) + τ_b          τ_b = argmax_τ H(Q(W_b − τ))        (§3.1, Eqs. 4–6)

where H is the entropy of the block's 4-bit codes: the more evenly the codes are used, the
more information the quantized block retains. τ is searched as the reference code
(htqin/IR-QLoRA ``utils.search``) does: around the block's median τ₀, on the grid

    τ = τ₀ + f·max|W_b − τ₀|,   f ∈ linspace(−λσ, λσ, 2n + 1),   σ = 1/Φ⁻¹(0.9677083)

(λ = ``icq_range``, n = ``icq_steps``; the reference's defaults 0.1 and 100: 201 candidates;
σ ≈ 0.541 maps NF4's outermost quantile to 1), keeping the first f of highest entropy. The
codes are NF4's nearest level of (W_b − τ)/max|W_b − τ|, computed here as bitsandbytes does
(midpoint thresholds; equal to its codes, tests/test_irqlora.py).

τ is stored as the reference stores it: an 8-bit index into bitsandbytes' signed dynamic map
per block, scaled by one fp32 max|τ| per 256 blocks (+0.127 bits per weight). One deviation:
the weight quantized is W − τ̂ with τ̂ the *stored* τ (the reference quantizes W − τ and adds
τ̂ back), so Ŵ = deq(codes) + τ̂ carries only the codes' rounding.
"""
import math

import torch

GROUP = 256            # blocks sharing one fp32 max|τ| (the reference's blocksize2)
CHUNK = 1 << 19        # block × candidate pairs searched at once (~100 MB of edges and counts)


def sigma() -> float:
    """σ = 1/Φ⁻¹(0.9677083): NF4's largest quantile (QLoRA §3) scaled to 1, as the reference's."""
    p = torch.tensor(0.9677083, dtype=torch.float32).double()   # the reference takes it from a float32 linspace
    return 1.0 / torch.special.ndtri(p).item()


def candidates(span: float, steps: int) -> torch.Tensor:
    """The factors f tried, in the reference's order (``np.linspace(-λσ, λσ, 2n + 1)``)."""
    edge = span * sigma()
    return torch.linspace(-edge, edge, 2 * steps + 1, dtype=torch.float64)


def blocks_of(weight: torch.Tensor, blocksize: int) -> tuple[torch.Tensor, int]:
    """``(blocks, pad)``: the flattened weight as (n_blocks × blocksize) float32, the last
    block padded with NaN to full length (bitsandbytes' blocks run over the flattened weight)."""
    flat = weight.detach().float().reshape(-1)
    pad = -flat.numel() % blocksize
    if pad:
        flat = torch.cat([flat, flat.new_full((pad,), math.nan)])
    return flat.view(-1, blocksize), pad


@torch.no_grad()
def search(weight: torch.Tensor, blocksize: int, levels: torch.Tensor, span: float, steps: int) -> torch.Tensor:
    """τ per block (float32, n_blocks) maximising the entropy of its 4-bit codes (§3.1)."""
    blocks, pad = blocks_of(weight, blocksize)
    factors = candidates(span, steps).float().to(blocks.device)
    mids = ((levels[1:] + levels[:-1]) / 2).float().to(blocks.device)
    chunk = max(1, CHUNK // len(factors))
    out = []
    for start in range(0, blocks.shape[0], chunk):
        last = start + chunk >= blocks.shape[0]
        out.append(_search_chunk(blocks[start:start + chunk], pad if last else 0, mids, factors))
    return torch.cat(out)


def _search_chunk(blocks: torch.Tensor, pad: int, mids: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Every candidate of every block at once, from the sorted block: of the codes of
    (w − τ)/m, m = max|w − τ| = max(w_max − τ, τ − w_min), the count of code k is the number
    of w in (τ + m·mid_{k−1}, τ + m·mid_k] — 15 binary searches in 64 sorted values instead of
    64 comparisons and a histogram per candidate, the same counts."""
    tau0 = blocks.nanmedian(dim=1).values            # the lower median, as torch.median (the reference)
    ordered = blocks.nan_to_num(nan=math.inf).sort(dim=1).values   # padding sorts last, is never ≤ a threshold
    n = torch.full_like(tau0, blocks.shape[1], dtype=torch.int32)
    top = ordered[:, -1].clone()
    if pad:
        n[-1] -= pad
        top[-1] = ordered[-1, -1 - pad]
    bottom = ordered[:, 0]
    spread = torch.maximum(top - tau0, tau0 - bottom)
    tau = tau0[:, None] + factors[None, :] * spread[:, None]                       # blocks × candidates
    m = torch.maximum(top[:, None] - tau, tau - bottom[:, None]).clamp_min(torch.finfo(torch.float32).tiny)
    edges = (tau[..., None] + m[..., None] * mids).flatten(1)                      # blocks × (candidates·15)
    below = torch.searchsorted(ordered, edges, right=True, out_int32=True).view(*tau.shape, len(mids))
    counts = torch.cat([below[..., :1], below.diff(dim=-1), n[:, None, None].int() - below[..., -1:]], dim=-1)
    # H = log2 n − Σ_k c_k·log2 c_k / n: with n fixed per block, the highest H is the lowest Σ c·log2 c
    c = torch.arange(blocks.shape[1] + 1, dtype=torch.float32, device=blocks.device)
    plogp = c * torch.log2(c.clamp_min(1))
    best = plogp[counts.long()].sum(dim=-1).argmin(dim=1)   # the first best, as the reference's strict ">"
    return tau.gather(1, best[:, None]).squeeze(1)


def code_entropy(codes: torch.Tensor, n: int, blocksize: int) -> torch.Tensor:
    """Entropy in bits of each block's codes, from bitsandbytes' packed uint8 (two codes a
    byte, the first in the high nibble) of an ``n``-weight tensor."""
    packed = codes.reshape(-1)
    flat = torch.stack([packed // 16, packed % 16], dim=1).reshape(-1)[:n].long()
    pad = -n % blocksize
    weight = torch.ones(n + pad, device=flat.device)
    weight[n:] = 0
    flat = torch.cat([flat, flat.new_zeros(pad)]).view(-1, blocksize)
    weight = weight.view(-1, blocksize)
    count = weight.sum(dim=1, keepdim=True)
    freq = torch.zeros(flat.shape[0], 16, device=flat.device).scatter_add_(1, flat, weight) / count
    return -(freq * torch.log2(freq.clamp_min(1e-30))).sum(dim=1)


# -- storing τ (the reference's 8-bit form) ---------------------------------------------------
def dynamic_map() -> torch.Tensor:
    """bitsandbytes' signed 8-bit dynamic map (256 values in [-1, 1]), τ's code book."""
    from qpeft.plugins.quantizers._bnb import import_bitsandbytes

    return import_bitsandbytes().functional.create_dynamic_map().float()


def store(tau: torch.Tensor, code_book: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tau_code uint8 per block, tau_absmax fp32 per 256 blocks)``: τ/max|τ| to the
    nearest code-book value (the reference's ``quantize_tensor``)."""
    pad = -tau.numel() % GROUP
    grouped = torch.cat([tau, tau.new_zeros(pad)]).view(-1, GROUP)
    absmax = grouped.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    scaled = (grouped / absmax[:, None]).reshape(-1)[:tau.numel()]
    ordered, order = code_book.to(tau.device).sort()
    nearest = torch.bucketize(scaled, (ordered[1:] + ordered[:-1]) / 2)
    return order[nearest].to(torch.uint8), absmax


def restore(tau_code: torch.Tensor, tau_absmax: torch.Tensor, code_book: torch.Tensor) -> torch.Tensor:
    """τ̂ per block (float32) from its stored form."""
    scale = tau_absmax.repeat_interleave(GROUP)[:tau_code.numel()]
    return code_book[tau_code.long()] * scale
