"""The trainer's view of the data: batch ``index`` of ``epoch``, this process's shard.

The order of an epoch depends only on (seed, epoch) — group-by-length batches from
:func:`qpeft.core.dataset.batching.batch_order` — so a resumed run continues at the exact batch
where it stopped, and every process of a data-parallel run agrees on the global batch
and takes rows ``rank::world`` of it.

Examples with a ``task`` (docs/data.md): :meth:`EncodedBatches.batch_tasks` says the task of
each row of a batch, and :meth:`EncodedBatches.of_task` gives one task's examples as batches
of their own, ordered with a seed of their own — the per-task mini-batches of MTLoRA's
Algorithm 2 (``--task-sampling per-task``).
"""
from qpeft.core.dataset.batching import batch_order, collate, num_batches


class EncodedBatches:
    """Batches of encoded examples for :class:`qpeft.core.train.trainer.Trainer`."""

    def __init__(self, items: list, pad_id: int, seed: int = 0, group_by_length: bool = True):
        if not items:
            from qpeft.core.base.errors import QpeftError

            raise QpeftError("no training examples are left after encoding; check --data and --max-length")
        self.items, self.pad_id, self.seed = items, pad_id, seed
        self.group_by_length = group_by_length
        self.lengths = [len(i.input_ids) for i in items]
        self._orders: dict = {}
        self.tasks = tuple(sorted({t for t in (getattr(i, "task", None) for i in items) if t is not None}))
        self._by_task: dict = {}

    def _order(self, epoch: int, size: int) -> list:
        key = (epoch, size)
        if key not in self._orders:
            self._orders = {key: batch_order(self.lengths, size, self.seed, epoch,
                                             self.group_by_length, self._drop_last(size))}
        return self._orders[key]

    def num_batches(self, size: int) -> int:
        """Batches per epoch, counted without ordering (the trainer asks every micro-step)."""
        return num_batches(len(self.items), size, drop_last=self._drop_last(size))

    def _drop_last(self, size: int) -> bool:
        return len(self.items) >= size

    def batch(self, epoch: int, index: int, size: int, rank: int = 0, world: int = 1) -> dict:
        """Collated rows ``rank::world`` of global batch ``index`` of ``epoch``."""
        rows = self._order(epoch, size)[index][rank::world]
        return collate([self.items[i] for i in rows], self.pad_id)

    def batch_tasks(self, epoch: int, index: int, size: int, rank: int = 0, world: int = 1) -> tuple | None:
        """The task of each row :meth:`batch` returns (None for a row without one); None when
        no example has a task."""
        if not self.tasks:
            return None
        return tuple(getattr(self.items[i], "task", None) for i in self._order(epoch, size)[index][rank::world])

    def of_task(self, task: str) -> "EncodedBatches":
        """The batches of ``task``'s examples alone, in an order of their own (seed and task)."""
        if task not in self._by_task:
            if task not in self.tasks:
                from qpeft.core.base.errors import QpeftError

                raise QpeftError(f"no training example has task '{task}'; tasks: {', '.join(self.tasks) or 'none'}")
            items = [i for i in self.items if getattr(i, "task", None) == task]
            self._by_task[task] = EncodedBatches(items, self.pad_id, f"{self.seed}:{task}", self.group_by_length)
        return self._by_task[task]
