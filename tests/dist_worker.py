"""Trains the tiny model a few steps and saves every process's adapter; run alone or under torchrun.

Each process initialises its adapter from a different seed (its rank), so the replicas agree
at the end only if the trainer broadcasts rank 0's adapter before the first step.
"""
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import adapted_tiny, cfg, source  # noqa: E402

from qpeft.core.kit.testing import tiny_tokenizer  # noqa: E402
from qpeft.core.train.trainer import Trainer  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    tokenizer = tiny_tokenizer()
    rank = int(os.environ.get("RANK", "0"))
    model = adapted_tiny(tokenizer, adapter_seed=rank)
    trainer = Trainer(model, source(tokenizer, 24), cfg(steps=4, batch_size=4), out)
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in trainer.trainable_state().items()},
              str(out / f"adapter-rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
