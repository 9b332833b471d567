"""Two qpeft methods' training steps, interleaved in one process: the step-time ratio
without the ±15 % that separate processes add on a shared machine.

    python benchmarks/method_pair.py [--quant nf4] [--pair lora,dora] [--rounds 5]

Both models are loaded first (same embedded model, batch 8 × 128, r = 16, α = 32, dropout 0,
AdamW as in train_step.py); after one warm-up step each, the rounds alternate the two steps
and the median of each is compared. Answers issue 9's "DoRA step ≤ 1.15 × LoRA step".
"""
import argparse
import statistics
import time

import torch

import train_step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quant", default="nf4", choices=train_step.QUANTS)
    ap.add_argument("--pair", default="lora,dora", help="two of " + ", ".join(train_step.METHODS))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    from qpeft.core.model import models
    from qpeft.core.kinds.quantizer import native_dtype

    pair = a.pair.split(",")
    if len(pair) != 2 or not set(pair) <= set(train_step.METHODS):
        ap.error(f"--pair takes two of {', '.join(train_step.METHODS)}, e.g. lora,dora")
    cfg = argparse.Namespace(dtype=native_dtype() if a.dtype == "auto" else a.dtype, r=16, alpha=32.0,
                             model=str(models.resolve(None)), warmup=1, steps=a.rounds, batch=8, lr=1e-4)
    ids = torch.randint(0, 49152, (8, 128), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    steps = {m: train_step.qpeft_step(cfg, a.quant, m, batch, torch.device("cpu"))[1] for m in pair}
    for step in steps.values():
        step()                                        # warm-up
    times = {m: [] for m in pair}
    for i in range(a.rounds):
        for m in pair if i % 2 == 0 else pair[::-1]:
            start = time.perf_counter()
            steps[m]()
            times[m].append(time.perf_counter() - start)
    med = {m: statistics.median(t) for m, t in times.items()}
    print(f"{a.quant}, {cfg.dtype}, {a.rounds} rounds: " + ", ".join(
        f"{m} {med[m]:.2f} s ({min(times[m]):.2f}–{max(times[m]):.2f})" for m in pair)
        + f"; {pair[1]} ÷ {pair[0]} = {med[pair[1]] / med[pair[0]]:.2f}")


if __name__ == "__main__":
    main()
