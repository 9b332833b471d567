"""The training loss as the trainer logs it: one step's loss is one (micro-)batch's, a noisy
point; a run is judged by the mean over each logging window and by an EMA, both logged in
metrics.jsonl beside the step's own loss, and "final loss" is the mean over the last window."""
import math


class LossLog:
    """Per-step losses folded into ``loss_mean`` (the steps since the last log line) and
    ``loss_ema`` (β = 0.9, bias-corrected as Adam's moments are: ``ema / (1 − β^t)``)."""

    def __init__(self, beta: float = 0.9):
        self.beta, self.ema, self.count, self.window = beta, 0.0, 0, []
        self.last_mean = math.nan      # the mean of the window most recently logged

    def add(self, loss: float) -> None:
        self.count += 1
        self.ema = self.beta * self.ema + (1 - self.beta) * loss
        self.window.append(loss)

    def fields(self) -> dict:
        """``{"loss_mean", "loss_ema"}`` for a log line; starts the next window."""
        self.last_mean = sum(self.window) / len(self.window) if self.window else math.nan
        self.window = []
        ema = self.ema / (1 - self.beta ** self.count) if self.count else math.nan
        return {"loss_mean": self.last_mean, "loss_ema": ema}

    def state(self) -> dict:
        return {"ema": self.ema, "count": self.count, "window": list(self.window), "last_mean": self.last_mean}

    def load(self, state: dict | None) -> None:
        """Restore :meth:`state` (a checkpoint from before this log existed: start afresh)."""
        if state:
            self.ema, self.count = float(state["ema"]), int(state["count"])
            self.window, self.last_mean = [float(x) for x in state["window"]], float(state["last_mean"])
