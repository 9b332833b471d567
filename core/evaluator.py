"""The Evaluator plugin kind: one measurement of a model, before and after training.

The pipeline builds one :class:`EvalContext` per evaluation and hands it to every chosen
evaluator; each returns a flat ``{metric: value}`` dict that lands in the report.
"""
import dataclasses
from typing import Any, ClassVar

from qpeft.core.plugin import Plugin


@dataclasses.dataclass
class EvalContext:
    """What an evaluator may look at. ``stage`` is "before" or "after" training."""

    model: Any
    tokenizer: Any
    stage: str
    device: str = "cpu"
    validation: list = dataclasses.field(default_factory=list)  # held-out Examples (loss/ppl)
    test: list = dataclasses.field(default_factory=list)        # Examples with checkable answers
    encode: Any = None          # Example -> {"input_ids", "labels"} with the run's template
    prompt_ids: Any = None      # Example -> prompt token ids for generation (same template)
    facts: dict = dataclasses.field(default_factory=dict)       # sizes, memory, runtime so far
    limit: int = 0              # the run's --eval-limit (0: all), for evaluators with data of their own


class Evaluator(Plugin):
    """Base of evaluator plugins: implement :meth:`evaluate`."""

    kind: ClassVar[str] = "evaluator"
    higher_is_better: ClassVar[dict] = {}   # metric -> True/False, for comparisons

    def evaluate(self, ctx: EvalContext) -> dict:
        """Measure ``ctx.model``; return ``{metric_name: number or text}``."""
        raise NotImplementedError
