"""HQQ's half-quadratic zero-point solver, run chunk by chunk of groups in cache.

Badri & Shaji, "Half-Quadratic Quantization of Large Machine Learning Models" (2023), §2:
with the scale s fixed (from min/max), the zero z of each group minimises ‖W − (W_q − z)/s‖_p^p
(p = 0.7) by alternating

    W_e ← shrink_p(W − W_r; β)               W_r = (round(W·s + z) − z)/s            (eq. 5)
    z   ← mean(W_q − (W − W_e)·s)                                                  (eq. 6)

where shrink_p(x; β) = sign(x)·relu(|x| − |x|^(p−1)/β). This is hqq 0.2.8's
``optimize_weights_proximal_legacy`` (β = 10 fixed, at most 20 iterations, p = 0.7), with
changes that leave its iterates unchanged and make each one cheap:

* **Chunks.** Every group's iterates depend on that group only, so ``chunk`` weights are
  solved at a time, groups as columns (g × G: the per-group sums are then vectorised
  reductions over rows): the working set stays in cache for all iterations instead of
  20 × 8 passes over the whole layer in main memory.
* **One residual.** With r = W·s + z − W_q (code units, W·s computed once), W − W_r = r/s and
  W − W_e = W_r + sign(r)·min(|r|/s, t), t = (|r|/s)^(p−1)/β, so eq. 6 is
  z ← z − s·mean(sign(r)·min(|r|/s, t)).
* **No power where it cannot matter.** min(e, e^(p−1)/β) = e whenever e ≤ c = β^(−1/(2−p))
  (the shrinkage is then exactly 0), so eq. 6 is z ← z − mean(r), the least-squares zero for
  the current codes. |r| ≤ max(½, max(W·s) + z − q_max, −(min(W·s) + z)) bounds r per group
  without a pass over the data; only chunks where that exceeds c·s pay for ``pow``.
* **Early stop per chunk.** hqq stops the whole layer when its mean |W − W_r| stops falling;
  here each chunk stops when its ‖W − W_r‖² falls by at most ``tol`` (relative), or when no
  zero moves. Each group keeps its iterate of lowest ‖W − W_r‖ (on the shrink-free path the
  error cannot rise, as both half-steps are least-squares optimal).
* **Codes against the stored constants.** The scale and zero are rounded to the dtype they
  are stored in first, and the codes rounded against those: hqq rounds the codes against
  float32 constants that are then cast to bf16.
"""
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

ITERS, LP_NORM, BETA = 20, 0.7, 10.0  # hqq's opt_params of optimize_weights_proximal


def initial_scale_zero(w: torch.Tensor, q_max: int, round_zero: bool):
    """hqq ``Quantizer.quantize`` for the groups in the columns of ``w``: s = q_max/(max − min)
    (1 where the range ≤ 1e-4, at most 2e4) and z = −min·s, rounded when ``round_zero``;
    also min·s and max·s."""
    lo, hi = torch.aminmax(w, dim=0, keepdim=True)
    denom = hi - lo
    s = (q_max / denom).masked_fill_(denom.abs() <= 1e-4, 1.0).clamp_(max=2e4)
    z = -lo * s
    if round_zero:
        z.round_()
    return s, z, lo * s, hi * s


def zero_step(r: torch.Tensor, s: torch.Tensor, shrink_free: bool, ones: torch.Tensor,
              lp_norm: float = LP_NORM, beta: float = BETA) -> torch.Tensor:
    """z − z_next of eq. 6 from the residual r (g×G, code units): s·mean(sign(r)·min(e, e^(p−1)/β)),
    e = |r|/s; just mean(r) when ``shrink_free`` (every e ≤ β^(−1/(2−p))). ``ones``: 1×g."""
    if shrink_free:
        return (ones @ r).div_(r.shape[0])
    e = r.abs().div_(s)                                      # |W − W_r|
    step = torch.minimum(e, e.pow(lp_norm - 1).div_(beta)).mul_(r.sign())
    return step.mean(dim=0, keepdim=True).mul_(s)


def solve_chunk(w: torch.Tensor, q_max: int, round_zero: bool, iters: int, tol: float,
                lp_norm: float = LP_NORM, beta: float = BETA):
    """Eq. 5–6 on the groups in the columns of ``w`` (float32, g×G, overwritten): returns
    W·s, s and the chosen z (1×G), and the number of zero updates run."""
    s, z, ws_lo, ws_hi = initial_scale_zero(w, q_max, round_zero)
    ws = w.mul_(s)
    c_s = beta ** (-1.0 / (2.0 - lp_norm)) * s            # |r| ≤ c·s ⇒ shrinkage 0
    z_hi, z_lo = c_s - ws_hi + q_max, -(c_s + ws_lo)        # shrink-free while z_lo ≤ z ≤ z_hi
    half_ok = bool((c_s >= 0.5).all())
    inv_s2 = s.pow(-2).view(-1)
    ones = torch.ones(1, w.shape[0], dtype=w.dtype, device=w.device)
    t, q = torch.empty_like(ws), torch.empty_like(ws)
    best_err = torch.full_like(z, float("inf"))
    best_z, last, ran = z, float("inf"), 0
    for i in range(iters + 1):
        torch.add(ws, z, out=t)
        torch.round(t, out=q).clamp_(0, q_max)
        r = t.sub_(q)                                        # r = W·s + z − W_q
        err = torch.linalg.vecdot(r, r, dim=0).unsqueeze_(0)   # s²·‖W − W_r‖² per group
        better = err < best_err
        best_err, best_z = torch.where(better, err, best_err), torch.where(better, z, best_z)
        total = float(torch.dot(err.view(-1), inv_s2))
        if i == iters or (i > 0 and last - total <= tol * last):
            break
        last, ran = total, i + 1
        shrink_free = half_ok and bool(((z >= z_lo) & (z <= z_hi)).all())
        step = zero_step(r, s, shrink_free, ones, lp_norm, beta)
        if not bool(step.any()):                             # every zero a fixed point
            break
        z = z - step
    return ws, s, best_z, ran


def codes_for(ws, s, z, q_max: int, store_dtype: torch.dtype):
    """Scale 1/s and zero rounded to ``store_dtype`` (kept in float32), and the codes
    round(W/scale + zero) against them."""
    scale = s.reciprocal().to(store_dtype).float()
    zero = z.to(store_dtype).float()
    q = ws.mul_((s * scale).reciprocal_()).add_(zero).round_().clamp_(0, q_max)
    return q, scale, zero


@contextmanager
def _one_intra_op_thread():
    """Chunks run side by side on Python threads, each op on one core: on a shared machine
    a core taken by another process then slows one chunk, not every op (OpenMP waits)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def solve(weight: torch.Tensor, nbits: int, group_size: int, axis: int, round_zero: bool,
          store_dtype: torch.dtype = torch.float32, iters: int = ITERS, tol: float = 0.0,
          chunk: int = 1 << 16, threads: int | None = None):
    """hqq's ``Quantizer.quantize`` (optimize=True) up to bit packing: unpacked codes (uint8),
    scale and zero (float32 holding ``store_dtype`` values) in hqq's shapes for ``axis``, and
    the zero updates each chunk ran. ``threads``: chunks solved side by side (default
    ``torch.get_num_threads()``)."""
    q_max, g = 2 ** nbits - 1, group_size
    w = weight.detach()
    if w.device.type != "cpu":       # an accelerator: few large launches, one host thread
        chunk, threads = max(chunk, 1 << 24), 1
    cols = w.reshape(-1, g).t() if axis == 1 else w.reshape(g, -1)  # g × groups
    n = cols.shape[1]
    codes = torch.empty(n, g, dtype=torch.uint8, device=w.device) if axis == 1 else \
        torch.empty(g, n, dtype=torch.uint8, device=w.device)
    scale = torch.empty(1, n, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    width = max(1, chunk // g)

    def one(a: int) -> int:
        b = min(a + width, n)
        block = torch.empty(g, b - a, dtype=torch.float32, device=w.device).copy_(cols[:, a:b])
        ws, s, z, ran = solve_chunk(block, q_max, round_zero, iters, tol)
        q, scale[:, a:b], zero[:, a:b] = codes_for(ws, s, z, q_max, store_dtype)
        (codes[a:b] if axis == 1 else codes[:, a:b]).copy_(q.t() if axis == 1 else q)
        return ran

    workers = threads or torch.get_num_threads()
    with torch.no_grad(), _one_intra_op_thread():
        starts = range(0, n, width)
        if workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(workers) as pool:
                ran = list(pool.map(one, starts))
        else:
            ran = [one(a) for a in starts]
    if axis == 1:
        scale, zero = scale.t().contiguous(), zero.t().contiguous()
    return codes, scale, zero, ran
