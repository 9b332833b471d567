"""Per-task mini-batches — MTLoRA's Algorithm 2 (Agiza et al. 2024): each optimizer step draws
a mini-batch of every task, and the objective is ``Σ_t w_t · L_t``.

:class:`TaskSampler` holds the weights ``w_t`` (``--task-weights``, 1 for a task not named)
and each task's data position ``[epoch, index]`` in that task's own seeded order
(``EncodedBatches.of_task``), which checkpoints keep so a resumed run draws the same batches.
The trainer (``core/train/trainer.py``, ``_task_step``) computes the losses.
:class:`MixedTaskLosses` measures the same ``L_t`` in mixed batches (``--task-sampling mixed``).
"""
import math

import torch

from qpeft.core.base.errors import QpeftError
from qpeft.core.settings.config import task_weight_values


class TaskSampler:
    """The tasks of ``batches`` (an ``EncodedBatches``), their weights and positions."""

    def __init__(self, batches, weights: str):
        tasks = getattr(batches, "tasks", ())
        if not tasks:
            raise QpeftError("--task-sampling per-task needs training examples with a 'task' (docs/data.md); "
                             "none has one: drop the flag or add tasks")
        given = task_weight_values(weights)
        unknown = sorted(set(given) - set(tasks))
        if unknown:
            raise QpeftError(f"--task-weights names task '{unknown[0]}', which no training example has; "
                             f"tasks: {', '.join(tasks)}")
        self.batches = batches
        self.weights = {t: given.get(t, 1.0) for t in tasks}
        if not any(self.weights.values()):
            raise QpeftError("--task-weights gives every task weight 0; nothing would train")
        self.positions = {t: [0, 0] for t in tasks}

    def steps_per_epoch(self, micro: int, grad_accum: int, epochs: float) -> int:
        """Steps of ``epochs`` epochs, an epoch being as many examples as the training set holds."""
        per_step = micro * grad_accum * len(self.weights)
        return max(1, math.ceil(len(self.batches.items) / per_step * epochs))

    def next_batch(self, task: str, size: int, rank: int = 0, world: int = 1) -> tuple[dict, tuple]:
        """``(batch, its rows' tasks)``: the next mini-batch of ``task`` in its own order (its own epochs)."""
        source, pos = self.batches.of_task(task), self.positions[task]
        if pos[1] >= source.num_batches(size):
            pos[0], pos[1] = pos[0] + 1, 0
        batch = source.batch(pos[0], pos[1], size, rank, world)
        pos[1] += 1
        return batch, (task,) * len(batch["input_ids"])

    def state(self) -> dict:
        return {t: list(p) for t, p in self.positions.items()}

    def load(self, state: dict | None) -> None:
        for task, (epoch, index) in (state or {}).items():
            if task in self.positions:
                self.positions[task] = [int(epoch), int(index)]


class MixedTaskLosses:
    """``task_loss/<task>`` of a mixed step (the default ``--task-sampling mixed``): each task's
    token mean over its rows of the step, all micro-batches and processes — the same L_t the
    per-task objective sums, measured here only (the objective stays the step's token mean).
    A task with no supervised token in the step is not logged that step."""

    def __init__(self, tasks: tuple):
        self.tasks = tuple(tasks or ())
        self.sums = {t: 0.0 for t in self.tasks}
        self.counts = {t: 0 for t in self.tasks}
        self._pending: list = []

    def row_sums(self, batch: dict, row_tasks):
        """A zero float32 tensor for ``token_loss_sum(row_sums=…)``, or None when nothing is
        measured (data without tasks)."""
        if not self.tasks or row_tasks is None:
            return None
        out = torch.zeros(batch["labels"].shape[0], dtype=torch.float32)
        supervised = (batch["labels"][:, 1:] != -100).sum(1).tolist()
        self._pending.append((out, row_tasks, supervised))
        return out

    def logged(self, dist) -> dict:
        """The step's ``{"task_loss/<task>": L_t}``, summed over the processes (every process
        calls this with the same tasks, in the same order)."""
        for out, row_tasks, supervised in self._pending:
            for value, task, n in zip(out.tolist(), row_tasks, supervised):
                if task is not None:
                    self.sums[task] += value
                    self.counts[task] += n
        logged = {}
        for task in self.tasks:
            n = dist.sum_int(self.counts[task])
            total = dist.sum_float(self.sums[task])
            if n:
                logged[f"task_loss/{task}"] = total / n
        return logged
