"""SIGINT and SIGTERM around training: what stops a run cleanly, and how the steps after
training (saving, evaluating, reporting) stop at once without leaving a half-written file.
The training loop's own deferral (finish the step, checkpoint, then stop) is in the trainer."""
import contextlib
import signal
import threading

from qpeft.core.base.errors import QpeftError


class Interrupted(QpeftError):
    """SIGINT or SIGTERM stopped training after a completed step and its checkpoint."""

    prefix = "qpeft: "

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.exit_code = 128 + signum        # 130 for SIGINT, 143 for SIGTERM


class Stopped(BaseException):
    """SIGINT or SIGTERM after training (saving, evaluating, reporting): raised at once by
    :class:`StopAtOnce`, a BaseException so that no evaluator's ``except`` swallows it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class StopAtOnce:
    """Inside ``with StopAtOnce() as stops:`` SIGINT/SIGTERM raise :class:`Stopped` at once,
    except within ``with stops.held():`` (writing a file that must not be left half-written),
    where the signal is kept and raised when that block ends. The previous handlers are back
    when the outer block ends, so a signal while the caller handles ``Stopped`` acts as before."""

    kinds = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.holding, self.pending, self.previous = False, None, {}

    def __enter__(self) -> "StopAtOnce":
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.getsignal(s) for s in self.kinds}
            for s in self.kinds:
                signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _handler(self, signum, frame):
        if self.holding:
            self.pending = self.pending or signum
            return
        raise Stopped(signum)

    @contextlib.contextmanager
    def held(self):
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending is not None:
            raise Stopped(self.pending)
