"""Trains the tiny model a few steps and saves every process's adapter; run alone or under torchrun.

Each process initialises its adapter from a different seed (its rank), so the replicas agree
at the end only if the trainer broadcasts rank 0's adapter before the first step.
``STEPS`` (4) and ``TASK_SAMPLING`` (mixed) set the run; :func:`one_and_two` runs it in one
process and in two gloo processes and reads back what each process saved.
"""
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from test_trainer import adapted_tiny, cfg, source  # noqa: E402

from qpeft.core.kit.testing import tiny_tokenizer  # noqa: E402
from qpeft.core.train.trainer import Trainer  # noqa: E402
from qpeft import adapter_layers  # noqa: E402

def one_and_two(tmp_path: Path, spec: str, port: int, **env) -> tuple[dict, list[dict]]:
    """Run this worker in one process (``tmp_path/one``) and under ``torchrun --nproc_per_node=2``
    (``tmp_path/two``); return the single process's saved tensors and each rank's."""
    from safetensors.torch import load_file

    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", **env}
    for where, launch in (("one", []), ("two", ["-m", "torch.distributed.run", "--nproc_per_node=2",
                                                f"--master_port={port}"])):
        done = subprocess.run([sys.executable, *launch, __file__, str(tmp_path / where), spec], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
    return (load_file(tmp_path / "one" / "adapter-rank0.safetensors"),
            [load_file(tmp_path / "two" / f"adapter-rank{r}.safetensors") for r in (0, 1)])


if __name__ == "__main__":
    out, spec = Path(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "lora:r=4:alpha=8:dropout=0")
    tokenizer = tiny_tokenizer()
    rank = int(os.environ.get("RANK", "0"))
    model, composition = adapted_tiny(tokenizer, adapter_seed=rank, spec=spec, composition=True)
    if composition.calibrating:   # each rank is given other data: only rank 0's calibration may count
        from qpeft.core.run import calibration
        from qpeft.core.train import distributed

        out.mkdir(parents=True, exist_ok=True)
        calibration.calibrate(composition, model, source(tokenizer, 24, seed=1 + rank), 2, "cpu",
                              distributed.current(), out, print)
    initial = {f"initial.{name}": layer.lora_A.detach().clone()     # the init each rank starts from
               for name, layer in adapter_layers(model).items()} if composition.calibrating else {}
    trainer = Trainer(model, source(tokenizer, 24), cfg(steps=int(os.environ.get("STEPS", "4")), batch_size=4,
                                                        task_sampling=os.environ.get("TASK_SAMPLING", "mixed")),
                      out, hooks=composition.parts)
    trainer.train()
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in trainer.trainable_state().items()}
    state.update(initial)
    state.update({f"kept.{name}": layer.kept.to(torch.uint8)    # AdaLoRA's masks, derived from gradients
                  for name, layer in adapter_layers(model).items() if hasattr(layer, "kept")})
    save_file(state, str(out / f"adapter-rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
