"""qpeft's chunked HQQ zero-point solver against hqq's own (what ``hqq`` ran before), on numbers.

Speed is measured in benchmarks/hqq_speed.py, not here; these tests pin down that the fast
solver computes hqq's update, is no worse than hqq where it counts, and that its early stop stops.
"""
import pytest
import torch
from hqq.core.optimize import optimize_weights_proximal_legacy_step
from hqq.core.quantize import BaseQuantizeConfig, Quantizer as HqqQuantizer

from qpeft.plugins.quantizers._hqq_solver import BETA, LP_NORM, initial_scale_zero, solve, zero_step


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def weight(out=256, inp=512, std=0.02, seed=0):
    """bf16 N(0, std²) like benchmarks/make_random_llama.py's (std 0.02) or N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=g) * std).to(torch.bfloat16)


def errors(w, w_hat):
    d = w.float() - w_hat.float()
    return (d.norm() / w.float().norm()).item(), d.abs().mean().item()


def hqq_errors(w, nbits, axis, store):
    """hqq's ``Quantizer.quantize`` (legacy proximal solver), dequantized with its constants
    cast to ``store`` as ``HQQLinear`` stores them."""
    params = BaseQuantizeConfig(nbits=nbits, group_size=64, axis=axis)["weight_quant_params"]
    w_q, meta = HqqQuantizer.quantize(w, device=w.device, compute_dtype=store, **params)
    meta.update(scale=meta["scale"].to(store), zero=meta["zero"].to(store), compute_dtype=store)
    return errors(w, HqqQuantizer.dequantize(w_q, meta))


def qpeft_errors(w, nbits, axis, store, **kw):
    codes, scale, zero, ran = solve(w, nbits, 64, axis, nbits == 4, store, **kw)
    return errors(w, ((codes.to(store) - zero.to(store)) * scale.to(store)).reshape(w.shape)), ran


@pytest.mark.parametrize("std", [0.02, 1.0])
def test_zero_step_is_hqqs_proximal_update(std):
    """Eq. 6 rewritten on one residual equals hqq's legacy step; the shrink-free form equals
    it exactly where it is used (N(0, 0.02²): every |W − W_r| ≤ 10^(−1/1.3) ≈ 0.17)."""
    w = weight(std=std).float().reshape(-1, 64)                       # hqq's layout, axis=1
    s, z, _, _ = initial_scale_zero(w.t().contiguous(), 15, True)
    z = z + 0.3                                                        # not the starting point
    _, _, hqq_zero, _ = optimize_weights_proximal_legacy_step(w, s.t(), z.t(), [0, 15], BETA, LP_NORM, 1)
    ws = w.t() * s
    r = ws + z - (ws + z).round().clamp(0, 15)
    ones = torch.ones(1, 64)
    general = z - zero_step(r, s, False, ones)
    assert torch.allclose(general.t(), hqq_zero, atol=2e-5, rtol=0)
    if std == 0.02:
        assert (r.abs() / s).max() < BETA ** (-1 / (2 - LP_NORM))
        assert torch.allclose((z - zero_step(r, s, True, ones)).t(), hqq_zero, atol=2e-5, rtol=0)


@pytest.mark.parametrize("std,nbits,axis", [(0.02, 4, 1), (0.02, 4, 0), (1.0, 4, 1), (1.0, 2, 1),
                                            (1.0, 3, 0), (1.0, 8, 1)])
def test_error_no_worse_than_hqq_as_stored(std, nbits, axis):
    """‖W − Ŵ‖/‖W‖ with bf16 constants (the compute dtype here) is at most hqq's, measured
    0.1–20 % lower (8-bit: the codes are rounded against the bf16 constants)."""
    w = weight(std=std)
    ref_rel, ref_l1 = hqq_errors(w, nbits, axis, torch.bfloat16)
    (rel, l1), _ = qpeft_errors(w, nbits, axis, torch.bfloat16)
    assert rel <= ref_rel * (1 + 1e-6)
    if std == 0.02:                  # the 1.17 B model's weights: mean |error| no worse either
        assert l1 <= ref_l1 * (1 + 1e-6)
    else:                            # per group the least-squares iterate: |error| within 0.1 %
        assert l1 <= ref_l1 * 1.001


def test_float32_constants_give_hqqs_error():
    """With float32 constants (compute_dtype=float32) nothing is rounded: hqq's error to 1e-5."""
    w = weight()
    ref_rel, ref_l1 = hqq_errors(w, 4, 1, torch.float32)
    (rel, l1), ran = qpeft_errors(w, 4, 1, torch.float32)
    assert abs(rel - ref_rel) <= 1e-5 * ref_rel and abs(l1 - ref_l1) <= 1e-5 * ref_l1


def test_early_stop_stops():
    """A chunk stops when its error falls by ≤ tol: 20 updates at most, ~14 at tol 1e-4 and ~9
    at 1e-3 (measured), for an error within 0.1 % of tol 0."""
    w = weight()
    (rel0, _), ran0 = qpeft_errors(w, 4, 1, torch.bfloat16, chunk=1 << 14)
    (rel4, _), ran4 = qpeft_errors(w, 4, 1, torch.bfloat16, chunk=1 << 14, tol=1e-4)
    (rel3, _), ran3 = qpeft_errors(w, 4, 1, torch.bfloat16, chunk=1 << 14, tol=1e-3)
    assert len(ran0) == 8 and max(ran0) <= 20
    assert sum(ran3) < sum(ran4) < sum(ran0) and max(ran3) <= 10
    assert rel0 <= rel4 <= rel3 <= rel0 * 1.001


def test_weights_on_the_grid_stop_at_once_and_come_back_exactly():
    """Groups that are exactly 16 levels (0, 1, …, 15)·h: the first zero is a fixed point, so
    every chunk stops after one update, and Ŵ = W."""
    levels = torch.arange(16.0).repeat(4)[torch.randperm(64, generator=torch.Generator().manual_seed(0))]
    w = (levels * 2.0 ** -7).repeat(128, 1).reshape(256, 32).to(torch.bfloat16)
    (rel, l1), ran = qpeft_errors(w, 4, 1, torch.bfloat16)
    assert ran == [1] and rel == 0.0 and l1 == 0.0


def test_threads_give_the_same_codes_in_hqqs_shapes():
    """Chunks are independent: solved on 1 or 2 threads, the output is identical."""
    w = weight(std=1.0)
    one = solve(w, 3, 64, 0, False, torch.bfloat16, chunk=1 << 12, threads=1)
    two = solve(w, 3, 64, 0, False, torch.bfloat16, chunk=1 << 12, threads=2)
    assert all(torch.equal(a, b) for a, b in zip(one[:3], two[:3])) and one[3] == two[3]
    assert one[0].shape == (64, 256 * 512 // 64) and one[1].shape == (1, 256 * 512 // 64)
    assert len(one[3]) == 256 * 512 // (1 << 12)
