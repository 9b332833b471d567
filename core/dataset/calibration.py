"""The batches a calibrating adapter (EVA, CorDA, LoRA-GA) sees before training starts.

They are the run's own training batches — encoded with its template and ``--max-length``,
labels with the prompt tokens set to -100, padded as the trainer pads them — the first
``count`` of the run's seeded order, in micro-batches of one process's size, so a rerun
with the same seed sees the same tokens and no calibration batch holds more than a training
micro-batch does. Iterating moves each batch to the model's device and shows a bar.
"""
from qpeft.core.base import progress


class CalibrationBatches:
    """``count`` training batches for :meth:`qpeft.Adapter.calibrate`: iterate over it (any
    number of times); each item is a dict of tensors on ``device`` (``input_ids``, ``labels``
    and ``attention_mask``, or ``position_ids`` for packed rows) ready for ``model(**batch)``.
    ``say(line)`` prints a line among the run's own (rank 0's), e.g. what did not converge."""

    def __init__(self, source, count: int, size: int, device="cpu", label: str | None = None, say=None):
        per_epoch = source.num_batches(size)
        self.device, self.label, self.say = device, label, say or _silent
        self._batches = [source.batch(i // per_epoch, i % per_epoch, size) for i in range(count)]

    @classmethod
    def of(cls, batches: list, device="cpu", label: str | None = None, say=None) -> "CalibrationBatches":
        """Calibration batches from a list of collated batches (tests, the conformance kit)."""
        made = cls.__new__(cls)
        made.device, made.label, made.say, made._batches = device, label, say or _silent, list(batches)
        return made

    def __len__(self) -> int:
        return len(self._batches)

    def __iter__(self):
        with progress.evaluating(self.label):
            bar = progress.bar(len(self._batches), "batch")
            try:
                for batch in self._batches:
                    yield {k: v.to(self.device) for k, v in batch.items()}
                    bar.update(1)
            finally:
                bar.close()

    @property
    def tokens(self) -> int:
        """Tokens with a label (not -100) over all the batches: what a label-masked statistic sees."""
        return sum(int((b["labels"] != -100).sum()) for b in self._batches)


def _silent(line: str) -> None:
    """``say`` where nobody listens (the conformance kit)."""
