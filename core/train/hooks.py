"""Calling the training hooks that :class:`~qpeft.core.plugin.base.Plugin` declares, in one place.

The trainer and the conformance kit's ``train`` both go through :class:`TrainHooks`, so a
third-party method is exercised by the kit exactly as a run calls it. One optimizer step::

    on_step_begin(step, model)
    for each micro-batch:  on_batch(model=, tasks=, step=) → forward → task loss + Σ extra_loss(model=, step=) → backward
    all-reduce gradients → clip → on_gradients(model=, step=)
    optimizer.step() → schedule.step() → zero_grad → on_step_end(model=, step=)

A hook left at the declared no-op default is not called. Objects that are not plugins (the
trainer's tests pass small stand-ins) may define any subset of the hooks.
"""
import math

from qpeft.core.base.errors import QpeftError
from qpeft.core.plugin.base import DataFacts, Plugin, TrainFacts


def label(plugin) -> str:
    """``adapter 'lora'`` — how a line names a plugin."""
    return f"{getattr(plugin, 'kind', '') or 'hook'} '{getattr(plugin, 'name', '') or type(plugin).__name__}'"


def key(plugin) -> str:
    """Where a plugin's training state goes in a checkpoint: ``kind/name``."""
    return f"{getattr(plugin, 'kind', '') or 'hook'}/{getattr(plugin, 'name', '') or type(plugin).__name__}"


def defines(plugin, hook: str) -> bool:
    """True when ``plugin`` has ``hook`` and it is not Plugin's no-op default."""
    found = getattr(type(plugin), hook, None)
    return callable(found) and found is not getattr(Plugin, hook, None)


class TrainHooks:
    """The run's plugins (quantizer, adapter method, modifiers, evaluators, in that order)
    and the extra loss terms of the current optimizer step."""

    def __init__(self, plugins=()):
        self.plugins = list(plugins)
        self.lossy = [p for p in self.plugins if defines(p, "extra_loss")]
        self.sums: dict[str, float] = {}

    def __iter__(self):
        return iter(self.plugins)

    def _call(self, hook: str, **kwargs) -> None:
        for plugin in self.plugins:
            if defines(plugin, hook):
                getattr(plugin, hook)(**kwargs)

    @property
    def routes(self) -> bool:
        """True when a plugin defines ``on_batch`` (it wants the task of each batch)."""
        return any(defines(p, "on_batch") for p in self.plugins)

    def data(self, facts: DataFacts) -> None:
        self._call("on_data", facts=facts)

    def batch(self, model, tasks, step=None) -> None:
        """``on_batch``: ``tasks`` a tuple (one per row, or one for every row) or None."""
        self._call("on_batch", model=model, tasks=None if tasks is None else tuple(tasks), step=step)

    def train_begin(self, model, facts: TrainFacts) -> None:
        self._call("on_train_begin", model=model, facts=facts)

    def step_begin(self, step: int, model) -> None:
        for plugin in self.plugins:         # positional: its signature predates the others
            if defines(plugin, "on_step_begin"):
                plugin.on_step_begin(step, model)

    def gradients(self, model, step: int) -> None:
        self._call("on_gradients", model=model, step=step)

    def step_end(self, model, step: int) -> None:
        self._call("on_step_end", model=model, step=step)

    def train_end(self, model, facts: TrainFacts) -> None:
        self._call("on_train_end", model=model, facts=facts)

    # -- extra loss terms --------------------------------------------------------------
    def add_extra(self, objective, model, step: int, weight: float, tokens: int = 1):
        """``objective`` + Σ ``weight`` × each plugin's ``extra_loss`` (the weight the task
        loss's micro-batch mean gets); each term's value × ``tokens`` is summed for the log."""
        for plugin in self.lossy:
            term = plugin.extra_loss(model=model, step=step)
            name = f"loss/{getattr(plugin, 'name', '') or type(plugin).__name__}"
            self.sums.setdefault(name, 0.0)
            if term is None:
                continue
            if getattr(term, "ndim", None) != 0:
                raise QpeftError(f"{label(plugin)}: extra_loss returned {type(term).__name__} "
                                 f"{tuple(getattr(term, 'shape', ()))}; return a scalar tensor or None")
            value = float(term.detach())
            if not math.isfinite(value):
                raise QpeftError(f"the extra loss of {label(plugin)} became {value} at step {step + 1}")
            objective = objective + term * weight
            self.sums[name] += value * tokens
        return objective

    def extra_logged(self, total_tokens: int, sum_float=float) -> dict[str, float]:
        """Each term's token-weighted mean over the step (``sum_float`` adds it across
        processes), then cleared for the next step. Every plugin defining ``extra_loss`` has a key."""
        out = {name: sum_float(value) / max(total_tokens, 1) for name, value in sorted(self.sums.items())}
        self.sums = {}
        return out

    # -- training state in checkpoints -------------------------------------------------
    def state(self) -> dict:
        """``{kind/name: state}`` for every plugin that keeps training state."""
        found = {}
        for plugin in self.plugins:
            if defines(plugin, "state_dict"):
                value = plugin.state_dict()
                if value is not None:
                    found[key(plugin)] = value
        return found

    def load(self, saved: dict, where: str, say) -> None:
        """Give each plugin its state from checkpoint ``where``; a plugin that keeps state
        the checkpoint lacks, or state kept for a plugin that keeps none now, is one line."""
        saved = dict(saved or {})
        for plugin in self.plugins:
            k = key(plugin)
            keeps = defines(plugin, "state_dict") and plugin.state_dict() is not None
            if k in saved and keeps:
                plugin.load_state_dict(saved.pop(k))
            elif keeps:
                say(f"qpeft: checkpoint {where} holds no training state of {label(plugin)} (written when "
                    "it kept none); it continues from its initial state")
        for k in saved:
            kind, _, name = k.partition("/")
            say(f"qpeft: checkpoint {where} holds training state of {kind} '{name}', which keeps none "
                "in this run; ignored")
