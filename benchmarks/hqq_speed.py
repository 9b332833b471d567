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
    a = ap.parse_args()
    store = DTYPES[a.store]
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
