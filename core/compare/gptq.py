"""Re-quantization with error feedback: GPTQ's column-by-column rounding onto a fixed grid.

Frantar, Ashkboos, Hoefler, Alistarh 2023, "GPTQ: Accurate Post-Training Quantization for
Generative Pre-trained Transformers" (ICLR 2023, arXiv:2210.17323), Algorithm 1::

    H = 2·X·Xᵀ (+ λ·I, λ = damp·mean diag H)        X: the layer's inputs, in × tokens (§3, "Step 3")
    U = Cholesky(H⁻¹)ᵀ, upper                       (§3, "Step 3: Cholesky reformulation")
    for each lazy batch of B columns (§3, "Step 2"), for each column j in it:
        Q[:, j] = round(W[:, j])                    onto the grid below
        E[:, j] = (W[:, j] − Q[:, j]) / U[j, j]
        W[:, j:] −= E[:, j] · U[j, j:]              (OBS update of the columns not yet rounded, Eq. 3)
    W[:, later] −= E_batch · U[batch, later]        once per lazy batch

so each column's rounding error is absorbed by the columns after it, weighted by the inputs'
second moments: the layer's outputs X·Qᵀ approach X·Wᵀ, where plain rounding only brings each
weight to its nearest level.

**The grid is the target format's, fixed before rounding** (GPTQ's "static groups"): a
:class:`Grid` holds each weight's scale, offset and allowed levels, taken from the block it
belongs to in the file format — NF4's blockwise absmax (QLoRA §3) or a GGUF block's d (and m).
A re-quantizer derives those constants again from the weights it is given (bitsandbytes
takes absmax = max|block|; gguf's q4_0 takes d = the block's largest-magnitude value / −8), so
the entry that defines them is *pinned* to the level that reproduces them (NF4: ±1, q4_0: −8,
q4_1: 0 and 15): packing GPTQ's output gives GPTQ's codes back, not a rescaled rounding.
"""
import dataclasses

import torch

DAMP = 0.01          # λ = 1 % of the mean diagonal of H, GPTQ's default (§4, "percdamp")
LAZY_BATCH = 128     # B of §3, Step 2


@dataclasses.dataclass
class Grid:
    """Where each weight of an (out×in) matrix may go: ``offset + levels[k]·scale``.

    ``scale``/``offset`` are (out×in) (``offset`` None: 0); ``levels`` ascending; ``pinned``
    (out×in, int64) is the level index an entry must take, −1 where rounding chooses."""

    scale: torch.Tensor
    levels: torch.Tensor
    pinned: torch.Tensor
    offset: torch.Tensor | None = None

    def round(self, w: torch.Tensor, cols: slice | int = slice(None)) -> torch.Tensor:
        """The nearest grid values to ``w`` (the columns ``cols`` of the matrix), pins applied."""
        scale, pin = self.scale[:, cols], self.pinned[:, cols]
        off = 0 if self.offset is None else self.offset[:, cols]
        safe = torch.where(scale == 0, torch.ones_like(scale), scale)
        x = (w - off) / safe
        mids = (self.levels[1:] + self.levels[:-1]) / 2
        k = torch.bucketize(x, mids)
        k = torch.where(pin >= 0, pin, k)
        return off + self.levels[k] * scale


def hessian(inputs: torch.Tensor) -> torch.Tensor:
    """``2·X·Xᵀ / n`` of inputs (n × in): GPTQ's H up to the constant (§3)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return 2 * x.t() @ x / max(1, x.shape[0])


def inverse_cholesky(h: torch.Tensor, damp: float = DAMP) -> torch.Tensor:
    """Upper Cholesky factor of (H + λI)⁻¹ (§3, Step 3); inputs never seen (diag 0) get H_jj = 1."""
    h = h.clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    h.diagonal().add_(damp * torch.mean(torch.diag(h)))
    low = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(low), upper=True)


@torch.no_grad()
def gptq(weight: torch.Tensor, h: torch.Tensor, grid: Grid, damp: float = DAMP,
         lazy_batch: int = LAZY_BATCH) -> torch.Tensor:
    """Algorithm 1 of Frantar et al. 2023: ``weight`` (out×in) rounded onto ``grid`` column by
    column, each column's error fed forward through the Cholesky factor of H⁻¹; float32."""
    w = weight.detach().float().clone()
    u = inverse_cholesky(h.float(), damp)
    q = torch.empty_like(w)
    columns = w.shape[1]
    for i1 in range(0, columns, lazy_batch):
        i2 = min(i1 + lazy_batch, columns)
        block, ub = w[:, i1:i2], u[i1:i2, i1:i2]
        errors = torch.empty_like(block)
        for j in range(i2 - i1):
            col = block[:, j]
            rounded = grid.round(col, i1 + j)
            q[:, i1 + j] = rounded
            err = (col - rounded) / ub[j, j]
            block[:, j:] -= err[:, None] * ub[j, j:][None, :]
            errors[:, j] = err
        w[:, i2:] -= errors @ u[i1:i2, i2:]
    return q


def output_error(weight: torch.Tensor, quantized: torch.Tensor, h: torch.Tensor) -> float:
    """‖X·(W − Q)ᵀ‖² / ‖X·Wᵀ‖² from H ∝ X·Xᵀ: the relative error of the layer's outputs on the
    calibration inputs (what GPTQ minimises, §3 Eq. 1)."""
    d = (weight.float() - quantized.float())
    num = torch.einsum("oi,ij,oj->", d, h, d)
    den = torch.einsum("oi,ij,oj->", weight.float(), h, weight.float())
    return float(num / den) if den > 0 else 0.0


# -- grids -------------------------------------------------------------------------------------
def _blocks(t: torch.Tensor, size: int) -> tuple[torch.Tensor, int]:
    """``t`` flattened row-major into blocks of ``size`` (the last one zero-padded), and the pad."""
    flat = t.reshape(-1)
    pad = (-flat.numel()) % size
    return torch.nn.functional.pad(flat, (0, pad)).reshape(-1, size), pad


def _unblock(blocks: torch.Tensor, pad: int, shape) -> torch.Tensor:
    flat = blocks.reshape(-1)
    return (flat[:flat.numel() - pad] if pad else flat).reshape(shape)


def _pin(blocks: torch.Tensor, where: torch.Tensor, level: torch.Tensor, pinned: torch.Tensor) -> None:
    """Set ``pinned`` (blocks' shape) to ``level`` at each block's index ``where`` (n×1)."""
    pinned.scatter_(1, where, level.expand_as(where) if level.dim() == 0 else level)


def blockwise_absmax_grid(weight: torch.Tensor, scales: torch.Tensor, levels: torch.Tensor,
                          blocksize: int) -> Grid:
    """NF4/FP4 (QLoRA §3): block b of ``blocksize`` consecutive weights (row-major, as
    bitsandbytes flattens) holds ``levels[k]·scales[b]``; the block's largest |w| is pinned to
    the level ±1 that bitsandbytes' absmax = max|block| gives back. ``scales``: the absmax a
    dequantization uses (with double quantization, the 8-bit-stored ones)."""
    blocks, pad = _blocks(weight.float(), blocksize)
    where = blocks.abs().argmax(1, keepdim=True)
    top = torch.where(torch.gather(blocks, 1, where) >= 0, int(torch.argmax(levels)), int(torch.argmin(levels)))
    pinned = torch.full_like(blocks, -1, dtype=torch.long)
    _pin(blocks, where, top, pinned)
    scale = scales.float().reshape(-1, 1).expand_as(blocks)
    return Grid(_unblock(scale, pad, weight.shape), levels.float().sort().values,
                _unblock(pinned, pad, weight.shape))


# GGUF block formats the gguf package writes (llama.cpp's ggml-quants.c reference rounding):
# symmetric q = round(x/d) + half with d = (largest-magnitude value)/−half, or affine
# q = round((x − m)/d) with m = min, d = (max − min)/(2^bits − 1); q8_0: d = max|x|/127.
GGUF_GRIDS = {"Q4_0": ("symmetric", 4), "Q5_0": ("symmetric", 5), "Q4_1": ("affine", 4),
              "Q5_1": ("affine", 5), "Q8_0": ("absmax", 8)}
GGUF_BLOCK = 32


def gguf_grid(weight: torch.Tensor, type_name: str) -> Grid:
    """The grid of GGUF type ``type_name`` (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) for ``weight``, its
    rows split in blocks of 32 (the caller checks they split). d (and m) are taken as
    gguf.quants takes them from ``weight`` and rounded to float16 as the file stores them; the
    values that define them are pinned, so gguf.quants re-derives the same d and m."""
    kind, bits = GGUF_GRIDS[type_name]
    x = weight.float().reshape(-1, GGUF_BLOCK)
    pinned = torch.full_like(x, -1, dtype=torch.long)
    f16 = lambda t: t.to(torch.float16).float()  # noqa: E731
    offset = None
    if kind == "symmetric":
        half = 2 ** (bits - 1)
        where = x.abs().argmax(1, keepdim=True)
        d = f16(torch.gather(x, 1, where) / -half)
        levels = torch.arange(-half, half, dtype=torch.float32)
        _pin(x, where, torch.tensor(0), pinned)              # code 0: −half·d = the largest magnitude
    elif kind == "affine":
        top = 2 ** bits - 1
        lo, hi = x.min(1, keepdim=True), x.max(1, keepdim=True)
        d, offset = f16((hi.values - lo.values) / top), f16(lo.values)
        levels = torch.arange(0, top + 1, dtype=torch.float32)
        _pin(x, hi.indices, torch.tensor(top), pinned)
        _pin(x, lo.indices, torch.tensor(0), pinned)         # min last: a constant block pins code 0
        offset = offset.expand_as(x).reshape(weight.shape)
    else:
        where = x.abs().argmax(1, keepdim=True)
        d = f16(torch.gather(x, 1, where).abs() / 127)
        levels = torch.arange(-127, 128, dtype=torch.float32)
        sign = torch.where(torch.gather(x, 1, where) >= 0, 254, 0)
        _pin(x, where, sign, pinned)
    return Grid(d.expand_as(x).reshape(weight.shape), levels, pinned.reshape(weight.shape), offset)
