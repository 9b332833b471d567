"""The run's evaluations: the evaluators' context, every evaluator on it, and the stage
``evaluate_before`` (its results kept for ``--resume``, a reproducible one cached).

    eval_context      a factory of :class:`EvalContext` for the model (the run's template and
                      length; ``use_task`` when a plugin routes by task)
    evaluate          every evaluator on one context; a failing one is recorded, not fatal
    evaluate_before   stage 2 of the pipeline (:mod:`qpeft.core.run.pipeline`): before training
    evaluate_variants the extra "after" evaluations an adapter method asks for

Also the pieces the pipeline's training stages share with them: the run's example
``encoder`` and template, task routing (``task_router``) and grouping (``by_task``).
"""
import json
import time
from functools import partial
from pathlib import Path

from qpeft.core.base import progress
from qpeft.core.base.errors import QpeftError
from qpeft.core.dataset import templates
from qpeft.core.kinds.evaluator import EvalContext
from qpeft.core.run import baselines, report
from qpeft.core.settings.config import RunConfig
from qpeft.core.train.hooks import TrainHooks


def encoder(cfg: RunConfig, tokenizer):
    """Example → Encoded with the run's template and length (None when it does not fit)."""
    encode = partial(templates.encode, tokenizer=tokenizer, template=_template(cfg),
                     max_length=cfg.max_length, train_on_prompt=cfg.train_on_prompt)
    return lambda example: encode(example)[0]


def eval_context(cfg: RunConfig, model, tokenizer, device, validation: list, test: list, plugins=()):
    """A factory of :class:`EvalContext` for this model: call it with ``stage`` and ``facts``.
    ``plugins``: the run's; when one routes by task (``on_batch``), ``use_task`` tells it the task."""
    return partial(EvalContext, model=model, tokenizer=tokenizer, device=device, limit=cfg.eval_limit,
                   validation=validation, test=test, encode=encoder(cfg, tokenizer),
                   prompt_ids=partial(templates.prompt_ids, tokenizer=tokenizer, template=_template(cfg)),
                   use_task=task_router(plugins, model))


def task_router(plugins, model):
    """``use_task(name or None)`` calling ``on_batch(model, (name,), None)`` on the plugins that
    route by task; None when none does."""
    hooks = TrainHooks(plugins)
    if not hooks.routes:
        return None
    return lambda task: hooks.batch(model, None if task is None else (task,), None)


def by_task(items: list) -> dict:
    """``{task: items}`` in sorted task order (None, for items without one, first)."""
    groups: dict = {}
    for item in items:
        groups.setdefault(getattr(item, "task", None), []).append(item)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")))


def _template(cfg: RunConfig):
    return cfg.template if cfg.template != "auto" else None


def evaluate(evaluators, ctx: EvalContext, say) -> dict:
    """Every evaluator on one context; a failing evaluator is recorded, not fatal."""
    results = {}
    for ev in evaluators:
        started = time.perf_counter()
        if ctx.use_task is not None:
            ctx.use_task(None)       # no task left over from training or from the last evaluator
        try:
            with progress.evaluating(f"{ctx.stage} {ev.name}" if say is not _quiet else None):
                results[ev.name] = ev.evaluate(ctx)
        except QpeftError as exc:
            results[ev.name] = {"error": str(exc)}
        say(f"  {ctx.stage:>6} {ev.name}: {report.brief(results[ev.name])} "
            f"({time.perf_counter() - started:.1f} s)")
    return results


def evaluate_variants(p, model, ctx, facts, say) -> dict:
    """Extra "after" evaluations an adapter method asks for through the optional hook
    ``report_variants(model) -> {label: apply}`` (QDyLoRA: one per rank). The adapter is
    saved before this, so the variants change only what is evaluated."""
    variants = p.adapter.method.report_variants(model)
    out = {}
    for label, apply in variants.items():
        apply()
        for name, metrics in evaluate(p.evaluators, ctx(stage=f"after {label}", facts=dict(facts)), say).items():
            out[f"{name} [{label}]"] = metrics
    return out


def evaluate_before(cfg: RunConfig, p, ctx, facts: dict, run_dir: Path, resuming: bool, world, say,
                    device="cpu") -> dict:
    """Stage 2: the evaluators on the quantized model before training (kept in
    ``eval_before.json``, so a resumed run does not measure them again). A reproducible
    evaluator's result is read from, or written to, the baseline cache (:mod:`baselines`)
    unless ``--no-cache``; ``facts["before_cached"]`` names those read."""
    before_file = run_dir / "eval_before.json"
    if resuming and before_file.is_file():
        try:
            before = json.loads(before_file.read_bytes())
        except (ValueError, RecursionError) as exc:   # truncated by a kill, or edited
            raise QpeftError(f"{before_file} is damaged ({str(exc).splitlines()[0][:120]}); delete it (it is "
                             f"measured again) and resume: qpeft run --resume {run_dir}") from None
        return before
    cached, entries = {}, {}
    if not cfg.no_cache and any(ev.reproducible for ev in p.evaluators):
        shared = baselines.run_key(cfg, p, device)
        for ev in p.evaluators:
            if ev.reproducible:
                entries[ev.name] = baselines.entry(shared, ev)
                found = baselines.read(*entries[ev.name])
                if found is not None:
                    cached[ev.name] = found
                    say(f"  before {ev.name}: {report.brief(found)} (cached: same model, quantizer and data)")
    measured = evaluate([ev for ev in p.evaluators if ev.name not in cached], ctx(stage="before", facts=dict(facts)), say)
    if world.is_main:
        for name, result in measured.items():
            if name in entries:
                baselines.write(*entries[name], result, run_dir)
    before = {ev.name: cached.get(ev.name, measured.get(ev.name)) for ev in p.evaluators}
    if cached:
        facts["before_cached"] = ", ".join(cached)
    if world.is_main:
        before_file.write_text(json.dumps(before, indent=2))
    return before


def _quiet(line: str) -> None:
    """``say`` for the processes other than rank 0 under torchrun: rank 0 prints the lines."""
