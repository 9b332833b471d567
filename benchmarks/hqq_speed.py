"""HQQ's zero-point solver: hqq's own (the reference, what qpeft ran before) beside qpeft's.

    same seeded bf16 layers ──hqq Quantizer.quantize (optimize_weights_proximal)──▶ codes, s, z
                            ──qpeft _hqq_solver.solve (chunked, same iterates)────▶ codes, s, z
    both dequantized with the constants as stored (bf16 by default), timed interleaved

Layers: the shapes of the 1.17 B random Llama (benchmarks/make_random_llama.py: q/o 2048², k/v
256×2048, gate/up 5632×2048, down 2048×5632), N(0, 0.02²) in bf16 like its weights, or the
real tensors of a checkpoint with ``--model DIR``. Reports per layer: wall and CPU seconds,
‖W − Ŵ‖/‖W‖ and mean |W − Ŵ| for each solver, and the iterations qpeft's chunks ran.

    python benchmarks/hqq_speed.py                         # 4-bit, the default layers
    python benchmarks/hqq_speed.py --nbits 2 --tol 0,1e-4 --threads 1,2 --repeats 2
    python benchmarks/hqq_speed.py --model /tmp/llama-1b --layers 0
    python benchmarks/hqq_speed.py --ablation      # which change matters: 20 fixed iterations,
                                                   # hqq's step whole-layer vs in chunks, pow or not
"""
import argparse
import json
import time

import torch

SHAPES = {"q_proj": (2048, 2048), "k_proj": (256, 2048), "gate_proj": (5632, 2048),
          "down_proj": (2048, 5632)}
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


def layers(model: str | None, blocks: list[int], seed: int = 0) -> dict[str, torch.Tensor]:
    """Name → bf16 weight: seeded N(0, 0.02²) of the 1.17 B model's shapes, or ``model``'s."""
    if model is None:
        g = torch.Generator().manual_seed(seed)
        return {n: (torch.randn(s, generator=g) * 0.02).to(torch.bfloat16) for n, s in SHAPES.items()}
    from pathlib import Path

    from safetensors import safe_open

    out = {}
    for file in sorted(Path(model).glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            for key in f.keys():
                part = key.split(".")
                if (key.endswith("proj.weight") and len(part) > 2 and part[2].isdigit()
                        and int(part[2]) in blocks):
                    out[key.removeprefix("model.").removesuffix(".weight")] = f.get_tensor(key)
    return out


def reference(w, nbits, group_size, axis, store):
    """hqq's ``Quantizer.quantize`` as qpeft called it before: Ŵ with the stored constants."""
    from hqq.core.quantize import BaseQuantizeConfig, Quantizer

    params = BaseQuantizeConfig(nbits=nbits, group_size=group_size, axis=axis)["weight_quant_params"]
    w_q, meta = Quantizer.quantize(w, device=w.device, compute_dtype=store, **params)
    meta.update(scale=meta["scale"].to(store), zero=meta["zero"].to(store), compute_dtype=store)
    return Quantizer.dequantize(w_q, meta), None


def qpeft(w, nbits, group_size, axis, store, tol, threads):
    """qpeft's solver, packed and dequantized as ``HQQLinear`` does."""
    from qpeft.plugins.quantizers._hqq_solver import solve

    round_zero = nbits == 4  # hqq's BaseQuantizeConfig
    codes, scale, zero, ran = solve(w, nbits, group_size, axis, round_zero, store, tol=tol,
                                    threads=threads)
    w_hat = ((codes.to(store) - zero.to(store)) * scale.to(store)).reshape(w.shape)
    return w_hat, sum(ran) / len(ran)


def ablation(w, nbits, group_size, axis, store, iters: int = 20, chunk: int = 1 << 16):
    """CPU seconds of ``iters`` fixed iterations (no early stop) four ways: hqq's legacy step
    over the whole layer (as hqq runs it), the same step chunk by chunk, qpeft's step with the
    power always computed, and qpeft's as shipped (power skipped where the shrinkage is 0)."""
    from hqq.core.optimize import optimize_weights_proximal_legacy_step as hqq_step

    from qpeft.plugins.quantizers import _hqq_solver as solver

    def hqq_steps(rows):
        grouped = w.float().reshape(-1, group_size)
        for a in range(0, grouped.shape[0], rows):
            wf = grouped[a:a + rows]
            lo, hi = wf.min(1, keepdim=True)[0], wf.max(1, keepdim=True)[0]
            s = (2 ** nbits - 1) / (hi - lo)
            z = (-lo * s).round()
            for _ in range(iters):
                _, _, z, _ = hqq_step(wf, s, z, [0, 2 ** nbits - 1], 10.0, 0.7, 1)

    def ours(shrink_free: bool):
        step = solver.zero_step
        solver.zero_step = lambda r, s, free, *a: step(r, s, free and shrink_free, *a)
        try:
            solver.solve(w, nbits, group_size, axis, nbits == 4, store, tol=-1.0, chunk=chunk, threads=1)
        finally:
            solver.zero_step = step

    out = {}
    for label, fn in [("hqq step, whole layer", lambda: hqq_steps(w.numel())),
                      ("hqq step, chunks", lambda: hqq_steps(chunk // group_size)),
                      ("qpeft, pow always", lambda: ours(False)),
                      ("qpeft", lambda: ours(True))]:
        cpu = time.process_time()
        fn()
        out[label] = time.process_time() - cpu
    return out


def timed(fn, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    w_hat, iters = fn(*args)
    return w_hat, time.perf_counter() - wall, time.process_time() - cpu, iters


def errors(w, w_hat):
    w, d = w.float(), w.float() - w_hat.float()
    return (d.norm() / w.norm()).item(), d.abs().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a checkpoint directory: its real layers instead of random ones")
    ap.add_argument("--layers", default="0", help="block indices to take from --model, e.g. 0,11")
    ap.add_argument("--nbits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--axis", type=int, default=1)
    ap.add_argument("--store", default="bfloat16", choices=DTYPES, help="dtype scale and zero are kept in")
    ap.add_argument("--tol", default="0", help="qpeft's early-stop tolerances to time, e.g. 0,1e-4")
    ap.add_argument("--threads", default=str(torch.get_num_threads()), help="e.g. 1,2")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--no-reference", action="store_true", help="skip hqq's own solver (slow)")
    ap.add_argument("--json", help="write every measurement here")
    ap.add_argument("--ablation", action="store_true", help="time 20 fixed iterations four ways (one thread)")
    a = ap.parse_args()
    store = DTYPES[a.store]
    if a.ablation:
        torch.set_num_threads(1)
        print("| layer | " + " | ".join(["hqq step, whole layer", "hqq step, chunks", "qpeft, pow always",
                                           "qpeft"]) + " |  (CPU seconds, 20 iterations, 1 thread)")
        for name, w in layers(a.model, [int(b) for b in a.layers.split(",")]).items():
            cpu = ablation(w, a.nbits, a.group_size, a.axis, store)
            print(f"| {name} {tuple(w.shape)} | " + " | ".join(f"{v:.2f}" for v in cpu.values()) + " |", flush=True)
        return
    variants = [(float(t), int(n)) for t in a.tol.split(",") for n in a.threads.split(",")]
    rows = []
    print("| layer | solver | wall s | CPU s | ‖W−Ŵ‖/‖W‖ | mean abs err | iterations |")
    print("|---|---|---|---|---|---|---|")
    for name, w in layers(a.model, [int(b) for b in a.layers.split(",")]).items():
        for r in range(a.repeats):  # interleaved: the reference, then each variant, per round
            runs = [] if a.no_reference else [("hqq reference", reference, ())]
            runs += [(f"qpeft tol={t:g} threads={n}", qpeft, (t, n)) for t, n in variants]
            for label, fn, extra in runs:
                torch.set_num_threads(max(n for _, n in variants))
                w_hat, wall, cpu, iters = timed(fn, w, a.nbits, a.group_size, a.axis, store, *extra)
                rel, l1 = errors(w, w_hat)
                rows.append({"layer": name, "shape": list(w.shape), "solver": label, "round": r,
                             "wall": wall, "cpu": cpu, "rel": rel, "l1": l1, "iters": iters})
                it = "—" if iters is None else f"{iters:.1f}"
                print(f"| {name} {tuple(w.shape)} | {label} | {wall:.2f} | {cpu:.2f} | {rel:.6f} | "
                      f"{l1:.4e} | {it} |", flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
