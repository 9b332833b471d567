"""Trains the tiny model a few steps and saves the adapter; run alone or under torchrun."""
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import adapted_tiny, cfg, source  # noqa: E402

from qpeft.core.testing import tiny_tokenizer  # noqa: E402
from qpeft.core.trainer import Trainer  # noqa: E402

if __name__ == "__main__":
    out = Path(sys.argv[1])
    tokenizer = tiny_tokenizer()
    model = adapted_tiny(tokenizer)
    trainer = Trainer(model, source(tokenizer, 24), cfg(steps=4, batch_size=4), out)
    trainer.train()
    if trainer.dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in trainer.trainable_state().items()}, str(out / "adapter.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
