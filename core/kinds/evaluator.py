"""The Evaluator plugin kind: one measurement of a model, before and after training.

The pipeline builds one :class:`EvalContext` per evaluation and hands it to every chosen
evaluator; each returns a flat ``{metric: value}`` dict that lands in the report.
``higher_is_better`` says which metrics are a quality (comparisons show them and can score
them); ``primary_metric`` is the one ``--edge-quality NAME`` means.
"""
import dataclasses
from typing import Any, ClassVar

from qpeft.core.plugin.base import Plugin


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
    # Route the model's task-aware plugins (MTLoRA) to one task for the forward passes that
    # follow (None: no task): call it per task and score each task's examples on their own.
    # None when no plugin of the run routes by task; then score the examples together.
    use_task: Any = None


class Evaluator(Plugin):
    """Base of evaluator plugins: implement :meth:`evaluate`."""

    kind: ClassVar[str] = "evaluator"
    required_methods = ("evaluate",)
    higher_is_better: ClassVar[dict] = {}   # metric -> True/False: the metrics comparisons show
    primary_metric: ClassVar[str | None] = None   # what --edge-quality NAME scores (None: the
                                                  # only key of higher_is_better, if just one)
    stages: ClassVar[tuple] = ("before", "after")  # the stages comparisons show ("after" for
                                                   # measures of the trained adapter alone)
    # True: the result depends only on the weights, the evaluation data and the options (not on
    # time, memory or the process), so the "before" numbers of a quantized base are computed once
    # and reused by every run of the same model, quantizer, evaluator and data (issue 20).
    reproducible: ClassVar[bool] = False

    def evaluate(self, ctx: EvalContext) -> dict:
        """Measure ``ctx.model``; return ``{metric_name: number or text}``."""
        raise NotImplementedError

    @classmethod
    def primary(cls) -> str | None:
        """The metric that stands for this evaluator's quality, or None when it names none."""
        if cls.primary_metric:
            return cls.primary_metric
        return next(iter(cls.higher_is_better)) if len(cls.higher_is_better) == 1 else None


def direction(better: dict, metric: str) -> bool | None:
    """Whether a higher ``metric`` is better by ``better`` (``{metric: bool}``); None when it
    is not declared. A grouped name ``group/name`` or ``group/name,filter`` that is not
    declared itself takes the direction of ``name`` (``qpeft_mc/acc`` → ``acc``)."""
    if metric in better:
        return bool(better[metric])
    base = metric.split(",")[0].rsplit("/", 1)[-1]
    return bool(better[base]) if "/" in metric and base in better else None
