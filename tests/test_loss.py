"""The causal-LM loss: the fused frozen-head path and the checkpointed general path give
transformers' loss and the gradients of plain autograd over full logits."""
import pytest
import torch
import torch.nn.functional as F

from qpeft.core.train.loss import FrozenHeadCrossEntropy, token_loss_sum


def reference(model, batch):
    """Full fp32 logits and ``F.cross_entropy``, summed over supervised tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 300, (3, 17), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100                                 # a prompt that is not supervised
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


@pytest.mark.parametrize("trainable_head", [False, True])
@pytest.mark.parametrize("chunk", [None, 7])
def test_loss_and_gradients_match_full_logits(trainable_head, chunk, batch):
    from qpeft.core.kit.testing import tiny_model

    grads = []
    for fused in (True, False):
        model = tiny_model(vocab_size=300, seed=1)
        model.get_output_embeddings().weight.requires_grad_(trainable_head)   # tied: embeddings too
        norm = model.model.norm.weight                     # a trainable tensor under the head
        if fused:
            total, n = token_loss_sum(model, chunk=chunk, **batch)
            assert n == int((batch["labels"][:, 1:] != -100).sum()) == 44
        else:
            total = reference(model, batch)
        total.backward()
        grads.append((total.detach(), norm.grad.clone()))
    (ours, g_ours), (theirs, g_theirs) = grads
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-4, atol=1e-6)
    assert g_ours.abs().sum() > 0


def test_fused_function_with_bias_and_scaled_upstream_gradient():
    g = torch.Generator().manual_seed(2)
    h = torch.randn(10, 8, generator=g, requires_grad=True)
    w, b = torch.randn(50, 8, generator=g), torch.randn(50, generator=g)
    t = torch.randint(0, 50, (10,), generator=g)
    (3.0 * FrozenHeadCrossEntropy.apply(h, w, b, t, 4)).backward()
    ours = h.grad.clone()
    h.grad = None
    full = F.cross_entropy(h @ w.t() + b, t, reduction="sum")
    (3.0 * full).backward()
    torch.testing.assert_close(ours, h.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(FrozenHeadCrossEntropy.apply(h, w, b, t, 3), full.detach())


def test_evaluation_computes_no_gradient(batch):
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(vocab_size=300).requires_grad_(False)
    with torch.no_grad():
        total, _ = token_loss_sum(model, **batch)
    assert total.grad_fn is None
    torch.testing.assert_close(total, reference(model, batch).detach(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("trainable_head", [False, True])
def test_row_sums_are_each_rows_own_loss(trainable_head, batch):
    """``row_sums`` (the per-task losses of mixed batches) holds each row's Σ token CE: the
    row's loss computed alone, on both paths; the total and its gradient are unchanged."""
    from qpeft.core.kit.testing import tiny_model

    model = tiny_model(vocab_size=300, seed=1)
    model.get_output_embeddings().weight.requires_grad_(trainable_head)
    rows = torch.zeros(3)
    total, n = token_loss_sum(model, chunk=7, row_sums=rows, **batch)
    alone = torch.stack([reference(model, {k: v[i:i + 1] for k, v in batch.items()}) for i in range(3)])
    torch.testing.assert_close(rows, alone.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rows.sum(), total.detach(), rtol=1e-6, atol=1e-5)
    assert not rows.requires_grad and rows[0] < rows[1]           # row 0 has 5 fewer supervised tokens
