"""Causal-LM loss without materialising a batch's full fp32 logits.

With a 49k vocabulary, ``B×T×V`` fp32 logits dominate CPU memory (8×128×49152×4 B =
200 MB, and as much again for their gradient). Only supervised positions (labels ≠ -100)
are projected, in chunks of rows. Over a frozen output projection (the usual case: no
adapter trains it) the gradient with respect to the hidden states is computed in the
forward pass, chunk by chunk, from ``∂ℓ/∂z = softmax(z) − onehot(t)`` — so neither logits
nor their gradient outlive a chunk and nothing is recomputed in backward ("fused linear
cross-entropy", as in Liger-Kernel, Hsu et al. 2024, §3.2). A trainable or non-Linear
head takes the general route: each chunk under activation checkpointing.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100
CHUNK_ELEMENTS = 1 << 24   # logits per chunk: 64 MB in float32


def _chunk_losses(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="none")


class FrozenHeadCrossEntropy(torch.autograd.Function):
    """``Σ_i CE(h_i Wᵀ + b, t_i)`` for a frozen ``W``; backward is one scaled tensor."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows, token_ce=None):
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(hidden) if want_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], rows):
            h, t = hidden[start:start + rows], targets[start:start + rows]
            z = (h.to(weight.dtype) @ weight.t()).float()
            if bias is not None:
                z += bias.float()
            picked = z.gather(1, t[:, None]).squeeze(1)
            top = z.amax(1, keepdim=True)
            z.sub_(top).exp_()                          # in place: z is now exp(z - max)
            norm = z.sum(1, keepdim=True)
            ce = (norm.log() + top).squeeze(1).sub(picked)             # log-sum-exp − z_t
            total += ce.sum()
            if token_ce is not None:
                token_ce[start:start + rows] = ce
            if want_grad:
                z.div_(norm)                            # softmax(z)
                z[torch.arange(t.numel(), device=t.device), t] -= 1.0   # − onehot(t)
                grad[start:start + rows] = z.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def _frozen_linear(head: torch.nn.Module) -> bool:
    return (type(head) is torch.nn.Linear and not head.weight.requires_grad
            and (head.bias is None or not head.bias.requires_grad))


def token_loss_sum(model, input_ids, labels, chunk: int | None = None, row_sums: torch.Tensor | None = None,
                   **inputs):
    """``(sum of token cross-entropies, number of supervised tokens)`` for a causal LM.

    Labels are shifted inside: position t predicts token t+1, as in transformers.
    ``inputs`` (attention_mask, position_ids) go to the decoder unchanged. ``chunk``: rows
    projected at once (default: ``CHUNK_ELEMENTS`` logits). ``row_sums`` (float32, one entry
    per row of the batch), when given, receives each row's sum of token cross-entropies,
    without gradient (the trainer's per-task losses of mixed batches).
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
    head = model.get_output_embeddings()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    t = targets[keep]
    rows = chunk or max(1, CHUNK_ELEMENTS // head.out_features)
    token_ce = None if row_sums is None else torch.zeros(t.numel(), dtype=torch.float32, device=t.device)
    if _frozen_linear(head):
        if not torch.is_grad_enabled():
            h = h.detach()                # evaluation: no gradient computed in forward
        total = FrozenHeadCrossEntropy.apply(h, head.weight, head.bias, t, rows, token_ce)
    else:
        total = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, t.numel(), rows):
            hs, ts = h[start:start + rows], t[start:start + rows]
            if torch.is_grad_enabled() and hs.requires_grad:
                ce = checkpoint(_chunk_losses, hs, head, ts, use_reentrant=False)
            else:
                ce = _chunk_losses(hs, head, ts)
            total = total + ce.sum()
            if token_ce is not None:
                token_ce[start:start + rows] = ce.detach()
    if row_sums is not None:
        row_sums.index_add_(0, keep.nonzero()[:, 0].to(row_sums.device), token_ce.to(row_sums.device))
    return total, int(t.numel())


def mean_loss(model, items: list, pad_id: int, batch_size: int = 8, device="cpu") -> tuple[float, int]:
    """``(token-weighted mean loss, tokens)`` of encoded items, without gradients; a progress
    bar under the evaluator's name on a terminal (:mod:`qpeft.core.base.progress`)."""
    from qpeft.core.base import progress
    from qpeft.core.dataset.batching import collate

    total, count = 0.0, 0
    with torch.no_grad(), progress.bar(len(items), "example") as shown:
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size], pad_id)
            s, n = token_loss_sum(model, **{k: v.to(device) for k, v in batch.items()})
            total, count = total + s.item(), count + n
            shown.update(len(batch["input_ids"]))
    return total / max(count, 1), count
