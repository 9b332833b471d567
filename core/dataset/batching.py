"""Batches: padding, a seeded group-by-length order, packing, and resumable iteration.

The order of an epoch is a pure function of ``(lengths, batch_size, seed, epoch)``:
:func:`batch_order` returns it as a list of batches of indices, so a trainer resuming at
batch ``k`` of epoch ``e`` calls ``batches(..., epoch=e, start=k)`` and gets exactly the
batches it would have seen.

Group by length (the thesis' setting, as Hugging Face's ``group_by_length``): shuffle,
cut into mega-batches of ``mega_batch_mult × batch_size`` examples, sort each mega-batch by
length, cut it into batches, then shuffle the batches. Batches hold sequences of similar
length, so little compute goes to padding.

Packing (:func:`pack`) concatenates short sequences into rows of at most ``max_length``
tokens. Each row carries ``position_ids`` that restart at 0 for every example; a packed batch
has *no* ``attention_mask``. From ``position_ids`` alone transformers (>= 4.54, any attention
implementation) builds a block-diagonal causal mask, so no example attends to another —
but only when the forward pass has no KV cache: call the model with ``use_cache=False``
(transformers otherwise takes ``config.use_cache``, creates a cache and skips the check,
and attention leaks across examples). The first token of each packed example has label
-100, so no example is trained to predict the next one's first token; the loss sees the
same supervised tokens as without packing. Padding after the last example gets positions of
its own (a separate segment) and label -100.
"""
import dataclasses
import random

from qpeft.core.dataset.templates import IGNORE, Encoded


def collate(batch: list, pad_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """Right-padded tensors ``input_ids``, ``attention_mask``, ``labels`` (and ``position_ids``
    when the items are packed) from a list of :class:`Encoded` or packed rows."""
    import torch

    width = max(len(item.input_ids) for item in batch)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        ids[row, :n] = torch.tensor(item.input_ids, dtype=torch.long)
        labels[row, :n] = torch.tensor(item.labels, dtype=torch.long)
        mask[row, :n] = 1
    if not isinstance(batch[0], Packed):
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    # Padding gets positions 0, 1, ... of its own: a separate "sequence" nobody attends to.
    positions = torch.arange(width, dtype=torch.long).repeat(len(batch), 1)
    for row, item in enumerate(batch):
        n = len(item.input_ids)
        positions[row, :n] = torch.tensor(item.position_ids, dtype=torch.long)
        positions[row, n:] = torch.arange(width - n)
    return {"input_ids": ids, "labels": labels, "position_ids": positions}


class Collator:
    """``collate`` with the pad id bound, for a ``torch.utils.data.DataLoader``."""

    def __init__(self, pad_id: int, pad_to_multiple_of: int | None = None):
        self.pad_id, self.pad_to_multiple_of = pad_id, pad_to_multiple_of

    def __call__(self, batch: list) -> dict:
        return collate(batch, self.pad_id, self.pad_to_multiple_of)


def _rng(seed: int, epoch: int) -> random.Random:
    """A generator that depends only on (seed, epoch)."""
    return random.Random(f"qpeft:{seed}:{epoch}")


def batch_order(lengths: list, batch_size: int, seed: int = 0, epoch: int = 0,
                group_by_length: bool = True, drop_last: bool = False,
                mega_batch_mult: int = 50) -> list:
    """The batches of epoch ``epoch`` as lists of indices into ``lengths``; deterministic."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    rng = _rng(seed, epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if group_by_length:
        mega = batch_size * mega_batch_mult
        order = [i for start in range(0, len(order), mega)
                 for i in sorted(order[start:start + mega], key=lambda i: (-lengths[i], i))]
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if group_by_length:
        rng.shuffle(out)
    if drop_last:  # after the shuffle, so the other batches are the same either way
        out = [b for b in out if len(b) == batch_size]
    return out


def batches(items: list, batch_size: int, pad_id: int, seed: int = 0, epoch: int = 0,
            start: int = 0, group_by_length: bool = True, drop_last: bool = False):
    """Yield collated batches of epoch ``epoch``, skipping its first ``start`` batches."""
    lengths = [len(item.input_ids) for item in items]
    order = batch_order(lengths, batch_size, seed, epoch, group_by_length, drop_last)
    for indices in order[start:]:
        yield collate([items[i] for i in indices], pad_id)


def num_batches(n_items: int, batch_size: int, drop_last: bool = False) -> int:
    """How many batches an epoch of ``n_items`` has."""
    return n_items // batch_size if drop_last else -(-n_items // batch_size)


@dataclasses.dataclass
class Packed(Encoded):
    """Several examples in one row, with ``position_ids`` restarting at 0 for each."""

    position_ids: list = dataclasses.field(default_factory=list)


def pack(items: list, max_length: int, seed: int = 0) -> list:
    """Rows of concatenated examples, each at most ``max_length`` tokens.

    Examples are taken in a seeded shuffled order and added to the current row while they
    fit (examples longer than ``max_length`` are cut to it). The first label of each
    example is set to -100 (see the module docstring).

    A row's ``task`` is its examples' task when they share one, else None (pack each task's
    examples on their own to keep every row's task: the trainer does so with per-task batches).
    """
    order = list(range(len(items)))
    _rng(seed, -1).shuffle(order)
    rows, ids, labels, positions, tasks = [], [], [], [], set()

    def row():
        return Packed(ids, labels, task=next(iter(tasks)) if len(tasks) == 1 else None, position_ids=positions)
    for i in order:
        item_ids = list(items[i].input_ids[:max_length])
        item_labels = [IGNORE] + list(items[i].labels[1:max_length])
        if ids and len(ids) + len(item_ids) > max_length:
            rows.append(row())
            ids, labels, positions, tasks = [], [], [], set()
        ids += item_ids
        labels += item_labels
        positions += list(range(len(item_ids)))
        tasks.add(getattr(items[i], "task", None))
    if ids:
        rows.append(row())
    return rows


def supervised_tokens(items: list) -> int:
    """Labels the loss uses: those that are not -100, past each sequence's first token."""
    return sum(sum(1 for label in item.labels[1:] if label != IGNORE) for item in items)

