"""Causal-LM loss without materialising a batch's full fp32 logits.

With a 49k vocabulary, ``B×T×V`` fp32 logits dominate CPU memory (8×128×49152×4 B =
200 MB, and as much again for their gradient). Only supervised positions (labels ≠ -100)
are projected, in chunks, each chunk under activation checkpointing so its logits are
recomputed in backward instead of kept.
"""
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

IGNORE = -100


def _chunk_loss(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return F.cross_entropy(logits, targets, reduction="sum")


def token_loss_sum(model, input_ids, labels, chunk: int = 1024, **inputs):
    """``(sum of token cross-entropies, number of supervised tokens)`` for a causal LM.

    Labels are shifted inside: position t predicts token t+1, as in transformers.
    ``inputs`` (attention_mask, position_ids) go to the decoder unchanged.
    """
    hidden = model.get_decoder()(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state
    head = model.get_output_embeddings()
    targets = labels[:, 1:]
    keep = targets != IGNORE
    h = hidden[:, :-1][keep]
    t = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, t.numel(), chunk):
        hs, ts = h[start:start + chunk], t[start:start + chunk]
        if torch.is_grad_enabled() and hs.requires_grad:
            total = total + checkpoint(_chunk_loss, hs, head, ts, use_reentrant=False)
        else:
            total = total + _chunk_loss(hs, head, ts)
    return total, int(t.numel())


def mean_loss(model, items: list, pad_id: int, batch_size: int = 8, device="cpu") -> tuple[float, int]:
    """``(token-weighted mean loss, tokens)`` of encoded items, without gradients."""
    from qpeft.core.batching import collate

    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(items), batch_size):
            batch = collate(items[start:start + batch_size], pad_id)
            s, n = token_loss_sum(model, **{k: v.to(device) for k, v in batch.items()})
            total, count = total + s.item(), count + n
    return total / max(count, 1), count
