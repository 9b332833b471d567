"""How long each stage of a run took (``facts.stage_seconds``, docs/training.md)."""
import time


class Stages:
    """Wall seconds of each stage of a run, for the report's ``facts.stage_seconds`` (load,
    before, prepare: attach + calibration + trainer, train, save, after); the process's start
    (imports) is what a cell's wall time holds beyond their sum."""

    def __init__(self):
        self.seconds, self._since = {}, time.perf_counter()

    def done(self, name: str) -> dict:
        now = time.perf_counter()
        self.seconds[name], self._since = round(now - self._since, 2), now
        return dict(self.seconds)
