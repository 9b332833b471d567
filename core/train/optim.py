"""Optimizers and learning-rate schedules for the trainer.

AdamW by default. bitsandbytes' paged AdamW (32- and 8-bit) pages optimizer state to
CPU memory under GPU memory pressure (QLoRA §3); it needs CUDA, so on CPU qpeft says so
once and uses torch's AdamW. bitsandbytes is imported through ``import_bitsandbytes``
(core/base/bnb.py), as the quantizers import it.
"""
import math
import sys

import torch


def build_optimizer(params, cfg, device: torch.device):
    """The optimizer named by ``cfg.optimizer`` (falls back to AdamW on CPU, with a message)."""
    if cfg.optimizer != "adamw":
        if device.type == "cuda":
            from qpeft.core.base.bnb import import_bitsandbytes

            bnb = import_bitsandbytes()   # quietly: no Hub lookup for a kernel the optimizers never use
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


def apply_settings(optimizer, scheduler, cfg) -> None:
    """This run's --lr, --weight-decay and schedule over a restored optimizer and scheduler
    state (which hold the values of the run that wrote the checkpoint): a resume may change
    them, and the next step uses them. Unchanged, the values are the same bits as before."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        group["lr"] = cfg.lr * factor(scheduler.last_epoch)
    scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
