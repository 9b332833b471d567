"""Optimizers and learning-rate schedules for the trainer.

AdamW by default. bitsandbytes' paged AdamW (32- and 8-bit) pages optimizer state to
CPU memory under GPU memory pressure (QLoRA §3); it needs CUDA, so on CPU qpeft says so
once and uses torch's AdamW.
"""
import math
import sys

import torch


def build_optimizer(params, cfg, device: torch.device):
    """The optimizer named by ``cfg.optimizer`` (falls back to AdamW on CPU, with a message)."""
    if cfg.optimizer != "adamw":
        if device.type == "cuda":
            import bitsandbytes as bnb

            cls = {"paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
                   "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[cfg.optimizer]
            return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        print(f"qpeft: --optimizer {cfg.optimizer} pages optimizer state between GPU and CPU and "
              "needs CUDA; on CPU, using torch AdamW", file=sys.stderr)
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def build_schedule(optimizer, cfg, total_steps: int):
    """Linear warmup, then constant (the thesis' setting), cosine or linear decay to zero."""
    warmup = max(0, cfg.warmup_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - progress

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
