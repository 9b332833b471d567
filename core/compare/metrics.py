"""What a comparison reads from the evaluators: its metric columns and the edge quality.

A metric is compared when its evaluator declares a direction for it (``higher_is_better``,
as the class declares it and as the run recorded it); it gets one column per stage the
evaluator declares (``stages``), keyed ``<evaluator>:<metric>:<stage>``. The edge quality
``EVALUATOR[:METRIC]`` is checked against the registry; ``EVALUATOR`` alone means its
``primary_metric``. Built-in and third-party evaluators are read the same way.
"""
import dataclasses

from qpeft.core.base.errors import QpeftError, unknown
from qpeft.core.kinds.evaluator import direction

VARIANT = " ["   # "<evaluator> [rank 4]": an adapter's extra "after" evaluation, not compared


@dataclasses.dataclass(frozen=True)
class Quality:
    """The edge score's quality term: one evaluator's metric after training."""

    evaluator: str
    metric: str
    higher: bool

    @property
    def key(self) -> str:
        return metric_key(self.evaluator, self.metric, "after")

    @property
    def label(self) -> str:
        return f"{heading(self.evaluator, self.metric, 'after')} ({'higher' if self.higher else 'lower'} is better)"


def metric_key(evaluator: str, metric: str, stage: str) -> str:
    """The row key of one evaluator's metric at one stage: ``ppl:ppl:after``."""
    return f"{evaluator}:{metric}:{stage}"


def heading(evaluator: str, metric: str, stage: str) -> str:
    """``<evaluator> <metric> <stage>``, the metric left out when it repeats the evaluator."""
    return f"{evaluator if metric == evaluator else f'{evaluator} {metric}'} {stage}"


def _declared(reg, name: str):
    """The registered evaluator class ``name``, or None (uninstalled since the run)."""
    try:
        return reg.get("evaluator", name)
    except QpeftError:
        return None


def metrics(report: dict, reg) -> dict:
    """``{metric_key: number}`` of every compared metric in a run's report.json: evaluators in
    the run's order, their metrics in declared order, each metric's stages side by side; a
    metric's sample size ``<metric>_n``, where its evaluator reports one, rides along under its
    own key (:mod:`qpeft.core.compare.summary` reads it)."""
    return {key: value for key, value, _ in _compared(report, reg)}


def directions(report: dict, reg) -> dict:
    """``{metric_key: higher_is_better}`` of the compared metrics of a run's report.json."""
    return {key: higher for key, _, higher in _compared(report, reg) if higher is not None}


def _compared(report: dict, reg):
    """``(metric_key, value, higher)`` of each compared metric and stage (higher None for a count)."""
    recorded = report.get("higher_is_better") or {}
    names = dict.fromkeys([*report.get("after", {}), *report.get("before", {})])
    for name in names:
        if VARIANT in name:
            continue
        cls = _declared(reg, name)
        better = {**(cls.higher_is_better if cls else {}), **(recorded.get(name) or {})}
        stages = cls.stages if cls else ("before", "after")
        values = {stage: report.get(stage, {}).get(name) or {} for stage in stages}
        reported = dict.fromkeys(m for v in values.values() if isinstance(v, dict) for m in v)
        for metric in [*(m for m in better if m in reported), *(m for m in reported if m not in better)]:
            higher = direction(better, metric)
            if higher is None:
                continue
            for stage, section in values.items():
                section = section if isinstance(section, dict) else {}
                value, n = section.get(metric), section.get(f"{metric}_n")
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    yield metric_key(name, metric, stage), value, higher
                    if isinstance(n, int) and not isinstance(n, bool):
                        yield metric_key(name, f"{metric}_n", stage), n, None


def columns(keys) -> dict:
    """``{metric_key: heading}`` of the metric keys, duplicates dropped, in first-seen order."""
    return {k: heading(*k.rsplit(":", 2)) for k in dict.fromkeys(keys)}


def evaluator_names(specs: list) -> list[str]:
    """The evaluator names of a run's specs: ``["a", "b:n=2"]`` → ``["a", "b"]``."""
    from qpeft.core.base.spec import parse

    return [parse(s)[0][0] for s in specs]


def resolve_quality(text: str | None, evaluators: list, reg, flag: str = "--edge-quality") -> Quality:
    """The edge quality of ``--edge-quality EVALUATOR[:METRIC]`` (None: the first of the run's
    ``evaluators`` that declares a primary metric), checked against the registry and the
    run's evaluators; one line naming the valid choices otherwise."""
    names = evaluator_names(evaluators)
    if not text:
        for name in names:
            cls = _declared(reg, name)
            primary = cls.primary() if cls is not None else None
            higher = direction(cls.higher_is_better, primary) if primary else None
            if higher is not None:
                return Quality(name, primary, higher)
        raise QpeftError(f"no evaluator of --evaluators ({';'.join(evaluators) or 'none'}) declares a "
                         f"primary metric; pass {flag} EVALUATOR:METRIC")
    name, _, metric = text.partition(":")
    if name not in reg.names("evaluator"):
        raise QpeftError(unknown("evaluator", name, reg.names("evaluator"),
                                 lead=f"{flag} '{text}': unknown evaluator '{name}'"))
    cls = reg.get("evaluator", name)
    choices = ", ".join(f"{name}:{m}" for m in cls.higher_is_better) or "none: it declares no higher_is_better"
    metric = metric or cls.primary() or ""
    if not metric:
        raise QpeftError(f"{flag} '{text}': evaluator '{name}' has no primary metric; "
                         f"name one: {choices}")
    higher = direction(cls.higher_is_better, metric)
    if higher is None:
        raise QpeftError(f"{flag} '{text}': evaluator '{name}' declares no direction for "
                         f"'{metric}'; use one of {choices}")
    if name not in names:
        fix = (f"add it, e.g. --evaluators \"{';'.join([*evaluators, name])}\"" if flag == "--edge-quality"
               else f"use one the run measured: {', '.join(dict.fromkeys(names))}")
        raise QpeftError(f"{flag} '{text}': '{name}' is not among --evaluators ({';'.join(evaluators)}); {fix}")
    return Quality(name, metric, higher)
