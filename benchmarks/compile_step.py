"""qpeft's training step eager vs every decoder layer under ``torch.compile``, in one process,
alternated step by step (``torch.compiler.set_stance``), so machine drift hits both alike.

    python benchmarks/compile_step.py [--row none-lora] [--steps 6]

Uses ``train_step.py``'s qpeft step (same model, batch 8 × 128, r = 16 on every linear
layer, AdamW). Prints each form's step times, the median ratio and the compilation time.
Needs a C++ compiler (inductor); on CPU it measured 1.07× (docs/benchmarks.md).
"""
import argparse
import json
import os
import statistics
import sys
import time
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    import torch

    import train_step
    from qpeft.core.model import models

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", default="none-lora", help="QUANT-METHOD, as train_step.py's rows")
    ap.add_argument("--steps", type=int, default=6, help="timed steps of each form")
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    quant, method = a.row.split("-")
    cfg = types.SimpleNamespace(model=str(models.resolve(None)), dtype=a.dtype, r=16, alpha=32.0, lr=1e-4,
                                warmup=2, steps=2 * a.steps + 2, batch=8, seq=128)
    with open(os.path.join(cfg.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (cfg.batch, cfg.seq), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    model, step = train_step.qpeft_step(cfg, quant, method, batch, torch.device("cpu"))
    step()                                   # eager warm-up
    started = time.perf_counter()
    for layer in model.model.layers:
        layer.compile(dynamic=False)
    step()                                   # compiles (forward and backward)
    print(f"compilation + first step: {time.perf_counter() - started:.1f} s", flush=True)
    times = {"default": [], "force_eager": []}
    for i in range(a.steps):
        for stance in ("default", "force_eager") if i % 2 == 0 else ("force_eager", "default"):
            torch.compiler.set_stance(stance)
            t = time.perf_counter()
            step()
            times[stance].append(time.perf_counter() - t)
    for stance, label in (("force_eager", "eager"), ("default", "compiled")):
        print(f"{label:>8}: median {statistics.median(times[stance]):.2f} s  "
              f"({', '.join(f'{x:.2f}' for x in times[stance])})")
    print(f"eager ÷ compiled: {statistics.median(times['force_eager']) / statistics.median(times['default']):.3f}")


if __name__ == "__main__":
    main()
