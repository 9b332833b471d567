"""The lean gated-MLP form: same values and gradients as the model's own forward, fewer
bytes held for backward."""
import torch

from qpeft.core.train.lean import SiluMul, gated_silu_mlps, make_lean


def saved_bytes(fn) -> int:
    """Bytes of distinct storages autograd keeps while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def test_silu_mul_matches_autograd():
    g0 = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    u0 = torch.randn(4, 33, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (g0, u0))
    w = torch.randn(4, 33, dtype=torch.float64)
    (SiluMul.apply(g0, u0) * w).sum().backward()
    ours = g0.grad.clone(), u0.grad.clone()
    g0.grad = u0.grad = None
    (torch.nn.functional.silu(g0) * u0 * w).sum().backward()
    torch.testing.assert_close(ours, (g0.grad, u0.grad), rtol=1e-12, atol=1e-12)


def test_lean_model_equals_plain_model_with_less_held():
    from qpeft.core.kit.testing import tiny_model

    ids = torch.randint(0, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    results = []
    for lean in (False, True):
        model = tiny_model(vocab_size=200, layers=2, intermediate=96, seed=4)
        if lean:
            assert make_lean(model) == 2 == len(gated_silu_mlps(model))
        out = {}
        held = saved_bytes(lambda: out.setdefault("logits", model(input_ids=ids).logits))
        out["logits"].square().mean().backward()
        results.append((out["logits"].detach(), model.model.layers[0].mlp.gate_proj.weight.grad.clone(), held))
    (plain, g_plain, held_plain), (ours, g_ours, held_ours) = results
    torch.testing.assert_close(ours, plain, rtol=0, atol=0)
    torch.testing.assert_close(g_ours, g_plain, rtol=1e-5, atol=1e-7)
    assert held_plain - held_ours == 2 * 2 * 9 * 96 * 4      # silu(gate) per layer, float32


def test_only_silu_gated_mlps_change():
    from torch import nn

    class Gelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = self.up_proj = self.down_proj = nn.Linear(2, 2)
            self.act_fn = nn.GELU()
    assert make_lean(nn.Sequential(Gelu())) == 0
