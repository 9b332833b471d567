"""One optimizer step of the :class:`~qpeft.core.train.trainer.Trainer`: its micro-batches
accumulated, the gradients applied.

    for each micro-batch: loss = Σ token CE / tokens in the whole step → backward
    (all-reduce grads across processes) → clip → on_gradients → optimizer → schedule → on_step_end

With ``--task-sampling per-task`` (MTLoRA, Agiza et al. 2024, Algorithm 2) each step draws
``batch_size`` examples of every task from that task's own seeded order, and the objective is
``Σ_t w_t · L_t`` with ``L_t`` the token mean over task t's examples of the step; each
``L_t`` is logged as ``task_loss/<task>``.

:class:`OptimizerStep` is a base of ``Trainer``: its methods read the trainer's model, data
position, plugins' hooks, optimizer and schedule.
"""
import math

import torch

from qpeft.core.train import memory
from qpeft.core.base.errors import QpeftError
from qpeft.core.train.loss import token_loss_sum
from qpeft.core.train.task_sampling import MixedTaskLosses


class TrainingError(QpeftError):
    """Training cannot go on (a non-finite loss, say)."""


class OptimizerStep:
    """The step half of the Trainer: ``_optimizer_step`` (mixed batches) or ``_task_step``
    (a mini-batch of every task), each ending in ``_apply_gradients``."""

    def _optimizer_step(self) -> tuple[float, int]:
        if self.tasks is not None:
            return self._task_step()
        micro_batches = [self._next_batch() for _ in range(self.cfg.grad_accum)]
        local = sum(_supervised(b) for b, _ in micro_batches)
        total = self.dist.sum_int(local)
        seen = self._seen(micro_batches)
        if total == 0:
            raise TrainingError(f"step {self.step + 1} has no supervised tokens; check --max-length "
                                "and that responses are not truncated away")
        loss_sum, by_task = 0.0, MixedTaskLosses(getattr(self.batches, "tasks", ()))
        for batch, tasks in micro_batches:
            s, n = self._forward(batch, tasks, by_task.row_sums(batch, tasks))
            # world × mean: all-reduce averages; an extra term weighs as this micro-batch's mean s/n
            weight = n / total * self.dist.world
            self.hooks.add_extra(s / total * self.dist.world, self.model, self.step, weight, n).backward()
            loss_sum += s.item()
        loss = self.dist.sum_float(loss_sum) / total
        self.task_losses = by_task.logged(self.dist)
        self.extra = self.hooks.extra_logged(total, self.dist.sum_float)
        self._apply_gradients(loss)
        return loss, seen

    def _task_step(self) -> tuple[float, int]:
        """One step of MTLoRA's Algorithm 2: a mini-batch of every task, ``Σ_t w_t · L_t``
        (``L_t``: task t's token mean over the step). A constant extra loss term is added
        once (its micro-batch weights sum to 1 over the step)."""
        weights, world = self.tasks.weights, self.dist.world
        drawn = {t: [self.tasks.next_batch(t, self.micro, self.dist.rank, world) for _ in range(self.cfg.grad_accum)]
                 for t in weights}
        counts = {t: self.dist.sum_int(sum(_supervised(b) for b, _ in batches)) for t, batches in drawn.items()}
        empty = [t for t, n in counts.items() if n == 0]
        if empty:
            raise TrainingError(f"step {self.step + 1}: the mini-batch of task '{empty[0]}' has no supervised "
                                "tokens; check --max-length and that responses are not truncated away")
        seen = self._seen([b for batches in drawn.values() for b in batches])
        weight_sum, sums = sum(weights.values()), {}
        for task, batches in drawn.items():
            w, sums[task] = weights[task], 0.0
            for batch, tasks in batches:
                s, n = self._forward(batch, tasks)
                extra_weight = n / counts[task] * w / weight_sum * world
                self.hooks.add_extra(s * (w / counts[task] * world), self.model, self.step, extra_weight,
                                     n).backward()
                sums[task] += s.item()
        per_task = {t: self.dist.sum_float(sums[t]) / counts[t] for t in drawn}
        loss = sum(weights[t] * value for t, value in per_task.items())
        self.task_losses = {f"task_loss/{t}": value for t, value in per_task.items()}
        self.extra = self.hooks.extra_logged(sum(counts.values()), self.dist.sum_float)
        self._apply_gradients(loss)
        return loss, seen

    def _seen(self, micro_batches: list) -> int:
        return self.dist.sum_int(sum(int(b["attention_mask"].sum()) if "attention_mask" in b
                                     else b["input_ids"].numel() for b, _ in micro_batches))

    def _forward(self, batch: dict, tasks, row_sums=None):
        """``(Σ token CE, supervised tokens)`` of one micro-batch, its tasks told to the plugins
        first; ``row_sums`` receives each row's Σ token CE (see :class:`MixedTaskLosses`)."""
        if self.hooks.routes:
            self.hooks.batch(self.model, tasks, self.step)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with memory.autocast(self.device, self.model):
            return token_loss_sum(self.model, row_sums=row_sums, **batch)

    def _apply_gradients(self, loss: float) -> None:
        """All-reduce, clip, ``on_gradients``, the optimizer and schedule steps, ``on_step_end``."""
        if not math.isfinite(loss):
            raise TrainingError(f"the loss became {loss} at step {self.step + 1}; "
                                "lower --lr or check the data")
        self.dist.average_grads(self.params)
        if self.cfg.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.max_grad_norm)
        self.hooks.gradients(self.model, self.step)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.hooks.step_end(self.model, self.step)

    def _next_batch(self) -> tuple[dict, tuple | None]:
        if self.index >= self.batches.num_batches(self.micro):
            self.epoch, self.index = self.epoch + 1, 0
        where = (self.epoch, self.index, self.micro, self.dist.rank, self.dist.world)
        batch = self.batches.batch(*where)
        tasks = self.batches.batch_tasks(*where) if hasattr(self.batches, "batch_tasks") else None
        self.index += 1
        return batch, tasks


def _supervised(batch: dict) -> int:
    """Labels of a batch the loss uses (past each row's first token)."""
    return int((batch["labels"][:, 1:] != -100).sum())
