"""The calibration stage of a run: data-driven inits (EVA, CorDA, LoRA-GA) look at data.

Between attach and the optimizer, each part of the adapter whose ``calibration_batches()``
is positive gets that many of the run's training batches (:class:`CalibrationBatches`) in
``calibrate(model, batches)`` and returns ``{key: tensor}``; every process then applies it
with ``apply_calibration`` (through ``AdapterMethod.restore_calibration``, which keeps it for
the saved adapter). Under data parallel only rank 0 calibrates and the result is broadcast,
so every rank starts from the same adapter. The states are written to
``RUN_DIR/calibration.safetensors``: ``--resume`` applies them again instead of calibrating,
as loading a saved adapter (``qpeft eval``, ``--init-adapter``) applies the copy saved in it.
"""
import os
import time
from pathlib import Path

import torch

from qpeft.core.base.durable import fsync
from qpeft.core.base.errors import QpeftError
from qpeft.core.dataset.calibration import CalibrationBatches
from qpeft.core.kinds.adapter import calibrated
from qpeft.core.kinds import peft_format

FILE = "calibration.safetensors"


def calibrate(composition, model, source, micro: int, device, world, run_dir: Path, say) -> None:
    """Run each calibrating part on its batches (rank 0), share and apply the states, and
    write them to ``run_dir``. ``source``: the run's EncodedBatches; ``micro``: one process's
    micro-batch size."""
    parts = composition.calibrating
    if not parts:
        return
    states = {}
    for part in parts:
        count = part.calibration_batches()
        state = None
        if world.is_main:
            started = time.perf_counter()
            batches = CalibrationBatches(source, count, micro, device, label=f"calibrating {part.name}", say=say)
            state = calibrated(part, model, batches)
            say(f"qpeft: {part.name} calibrated on {count} training batches ({batches.tokens} labelled "
                f"tokens, {time.perf_counter() - started:.1f} s)")
        states[part.name] = share(state, world)
    composition.method.restore_calibration(model, states)
    if world.is_main:
        write(run_dir / FILE, states)


def share(state: dict | None, world) -> dict:
    """Rank 0's ``state`` in every process (broadcast once under data parallel)."""
    if world.world == 1:
        return state
    box = [state]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def write(path: Path, states: dict) -> None:
    """The states in ``path`` (written beside it, then moved in: never half a file)."""
    from safetensors.torch import save_file

    staged = path.with_name(f".{path.name}.new-{os.getpid()}")
    save_file(peft_format.flat_calibration(states), str(staged), metadata={"format": "pt"})
    with open(staged, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staged, path)
    fsync(path.parent)


def restore(composition, model, run_dir: Path) -> None:
    """On ``--resume``: apply the states the run computed when it started, with no data."""
    if not composition.calibrating:
        return
    path = run_dir / FILE
    if not path.is_file():
        raise QpeftError(f"{path} is missing, so the calibrated init of '{composition.spec}' cannot be rebuilt; "
                         f"start the run again with --overwrite")
    composition.method.restore_calibration(model, peft_format.nested_calibration(peft_format.read_tensors(path)))
