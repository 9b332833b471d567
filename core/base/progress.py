"""Progress of long work that shared helpers do on an evaluator's behalf.

An evaluator calls :func:`qpeft.generate` or :func:`qpeft.mean_loss`; neither knows which
evaluator it serves. The pipeline names the work once — ``with evaluating("after accuracy"):``
— and those helpers show a bar under that name (items done/total, rate, ETA) while they run,
so every evaluator built on them, a third party's too, has progress without asking for it.
Bars go to stderr and only to a terminal (tqdm's ``disable=None``), never into logs or CI.
"""
import contextlib
import contextvars

_LABEL: contextvars.ContextVar[str | None] = contextvars.ContextVar("qpeft_progress_label", default=None)


@contextlib.contextmanager
def evaluating(label: str | None):
    """Name the work done inside (``None``: no bars, e.g. on ranks other than 0)."""
    token = _LABEL.set(label)
    try:
        yield
    finally:
        _LABEL.reset(token)


def bar(total: int, unit: str):
    """A bar over ``total`` items under the current name, or a no-op bar outside any."""
    label = _LABEL.get()
    return _tqdm(total=total, desc=label, unit=unit, leave=False, disable=None if label else True)


def _tqdm(**settings):
    from tqdm.auto import tqdm

    return tqdm(**settings)
