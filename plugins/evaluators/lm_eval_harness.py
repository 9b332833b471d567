"""``lm-eval``: any lm-evaluation-harness task on the model, offline.

EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4, https://github.com/EleutherAI/lm-evaluation-harness)
runs the task; qpeft's model answers through lm-eval's model API::

    tasks, include_path ─▶ lm_eval TaskManager: the bundled qpeft_* tasks and your YAMLs
                           (lm-eval's own catalogue only when a name is not found there)
        ─▶ lm_eval.simple_evaluate(QpeftLM(model, tokenizer), tasks, num_fewshot, limit)
           with the Hugging Face Hub and datasets offline
        ─▶ {"<task>/<metric>": value, "<task>/<metric>_stderr": …, "<task>/n": documents}

Data must be local: a task YAML with ``dataset_path: json`` and ``dataset_kwargs:
{data_files: …}`` (paths relative to the YAML work), or a dataset already in the Hugging
Face cache. The module is named so as not to shadow the ``lm_eval`` package; ``lm_eval``
is imported only when the evaluator runs (``pip install 'qpeft[lm-eval]'``).
"""
import contextlib
import dataclasses
import importlib.util
import logging
import os
import random
import sys
from importlib import resources
from pathlib import Path

from qpeft import Evaluator, QpeftError, closest, hookimpl, option

INSTALL = "pip install 'qpeft[lm-eval]'"
MINIMUM = (0, 4, 12)            # TaskFactory, which the local-data paths rely on
DEFAULT_LIMIT = 100             # documents per task when neither the option nor the run says
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


@dataclasses.dataclass
class LmEvalOptions:
    tasks: list[str] = option(["qpeft_mc", "qpeft_gen"],
                              "lm-eval task or group names, comma-separated: lm-eval:tasks=a,b")
    include_path: str = option("", "folder of task YAMLs, searched with the bundled qpeft_* tasks")
    num_fewshot: int | None = option(None, "examples before each question; none: the task's own (0 if unset)")
    limit: int | None = option(None, f"at most N documents per task; 0: all; none: the run's --eval-limit, "
                                     f"or {DEFAULT_LIMIT} when that is 0")
    batch_size: int = option(8, "sequences per forward pass or generation batch")
    max_length: int = option(0, "tokens the model reads (cut from the left); 0: its context, at most 2048")
    max_gen_toks: int = option(256, "tokens generated when a task does not set max_gen_toks")
    chat_template: bool = option(False, "render prompts with the tokenizer's chat template (lm-eval's "
                                        "--apply_chat_template)")
    bootstrap_iters: int = option(100, "bootstrap samples for the standard errors of non-mean metrics; "
                                       "0: no standard errors")

    def __post_init__(self):
        if not self.tasks:
            raise ValueError("name at least one task, e.g. lm-eval:tasks=qpeft_mc")
        if self.include_path and not Path(self.include_path).expanduser().is_dir():
            raise ValueError(f"include_path '{self.include_path}' is not a folder; give the folder "
                             "holding your task YAMLs")
        if self.batch_size < 1 or self.max_length < 0 or self.max_gen_toks < 1 or self.bootstrap_iters < 0 \
                or (self.limit or 0) < 0 or (self.num_fewshot or 0) < 0:
            raise ValueError("batch_size and max_gen_toks must be ≥ 1, the other numbers ≥ 0 "
                             "(e.g. lm-eval:limit=50:num_fewshot=5)")
        if importlib.util.find_spec("lm_eval") is None:
            raise ValueError(f"lm_eval is not installed: {INSTALL}")


class LmEval(Evaluator):
    name = "lm-eval"
    description = "Any lm-evaluation-harness task (log-likelihood and generation), local data, offline"
    Options = LmEvalOptions
    # Keys are "<task>/<metric>"; by metric name here, and by full key after a run (from
    # lm-eval's own higher_is_better for each task).
    higher_is_better = {"acc": True, "acc_norm": True, "exact_match": True, "f1": True, "mcc": True,
                        "bleu": True, "word_perplexity": False, "byte_perplexity": False,
                        "bits_per_byte": False, "perplexity": False}

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self._managers = {}     # (folders, with lm-eval's own tasks) → TaskManager, kept across stages

    def evaluate(self, ctx):
        harness = import_harness()
        o = self.options
        limit = o.limit if o.limit is not None else ctx.limit or DEFAULT_LIMIT
        context = min(getattr(ctx.model.config, "max_position_embeddings", 2048), 2048)
        lm = harness.QpeftLM(ctx.model, ctx.tokenizer, ctx.device, o.batch_size,
                             o.max_length or context, o.max_gen_toks)
        with offline(), quiet(), kept_random_state():
            manager = self.manager(harness)
            try:
                results = harness_evaluate(lm, manager, o, limit or None)
            except Exception as exc:   # noqa: BLE001 — lm-eval and datasets raise many kinds
                raise QpeftError(explain(exc, harness.remote_task(manager))) from exc
        metrics, better = flatten(results)
        self.higher_is_better = {**type(self).higher_is_better, **better}
        return metrics

    def manager(self, harness):
        """A TaskManager that knows every requested name: the bundled tasks and include_path
        first (fast), lm-eval's ~14,000 own only when a name is not among them."""
        folders = [bundled_tasks()] + ([Path(self.options.include_path).expanduser().resolve()]
                                       if self.options.include_path else [])
        for defaults in (False, True):
            key = (tuple(folders), defaults)
            if key not in self._managers:
                self._managers[key] = harness.task_manager(folders, defaults)
            manager = self._managers[key]
            missing = [t for t in self.options.tasks if t not in manager.all_tasks]
            if not missing:
                return manager
        near = closest(missing[0], manager.all_tasks)
        raise QpeftError(f"no lm-eval task or group '{missing[0]}'"
                         + (f"; did you mean '{near}'?" if near else ".")
                         + f" Searched {', '.join(str(f) for f in folders)} and lm-eval's own tasks; "
                         "a task YAML names itself with 'task:'")


def harness_evaluate(lm, manager, o: LmEvalOptions, limit: int | None) -> dict:
    import lm_eval

    return lm_eval.simple_evaluate(
        model=lm, tasks=list(o.tasks), num_fewshot=o.num_fewshot, limit=limit, task_manager=manager,
        bootstrap_iters=o.bootstrap_iters, log_samples=False, apply_chat_template=o.chat_template)


def flatten(results: dict) -> tuple[dict, dict]:
    """``({"<task>/<metric>": number, …, "<task>/n": documents, "tasks", "documents"},
    {"<task>/<metric>": higher is better})``; a filter other than lm-eval's "none" is kept
    after a comma, as lm-eval writes it (``gsm8k/exact_match,strict-match``)."""
    metrics, better, documents = {}, {}, 0
    counts = results.get("n-samples", {})
    for task, values in sorted(results["results"].items()):
        for key, value in values.items():
            metric, _, how = key.partition(",")
            if not how or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            name = f"{task}/{metric}" + ("" if how == "none" else f",{how}")
            metrics[name] = round(float(value), 4)
            hib = results.get("higher_is_better", {}).get(task, {}).get(metric)
            if hib is not None:
                better[name] = bool(hib)
        if task in counts:
            metrics[f"{task}/n"] = counts[task]["effective"]
            documents += counts[task]["effective"]
    return {"tasks": len(counts), "documents": documents, **metrics}, better


def explain(exc: Exception, remote: tuple | None) -> str:
    """One line for a failed lm-eval run: the task that needs the Hub (``remote``, the task
    being loaded when it failed, and its dataset), else lm-eval's own message."""
    if remote and _network_error(exc):
        return (f"task {remote[0]} needs data from the hub ({remote[1]}); give a local dataset path via "
                "a task YAML in include_path (dataset_path: json, dataset_kwargs: {data_files: FILE})")
    text = " ".join(str(exc).split())
    return f"lm-eval failed ({type(exc).__name__}): {text[:300]}"


def _network_error(exc: Exception) -> bool:
    """Whether ``exc`` or what caused it is the Hub being out of reach."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    words = ("offline", "on the hub", "couldn't reach", "connection")
    return any(isinstance(e, ConnectionError) or type(e).__name__ in
               ("DatasetNotFoundError", "OfflineModeIsEnabled", "LocalEntryNotFoundError")
               or any(w in str(e).lower() for w in words) for e in chain)


# -- environment -------------------------------------------------------------------------
def import_harness():
    """The ``_harness`` module (which imports lm_eval), or a one-line error naming the install."""
    from importlib.metadata import version

    try:
        found = version("lm_eval")
        # imported before offline(): datasets reads the offline switches once, when first imported
        from qpeft.plugins.evaluators import _harness
    except ImportError:
        raise QpeftError(f"lm-eval needs the lm_eval package: {INSTALL}") from None
    numbers = tuple(int(p) for p in found.split(".")[:3] if p.isdigit())
    if numbers < MINIMUM or numbers >= (0, 5):
        raise QpeftError(f"lm-eval needs lm_eval ≥ 0.4.12, < 0.5 (found {found}): {INSTALL}")
    return _harness


def bundled_tasks() -> Path:
    """The folder of the bundled sample tasks (``qpeft_mc``, ``qpeft_gen``, ``qpeft_text``)."""
    return Path(str(resources.files("qpeft.core").joinpath("resources", "lm_eval")))


@contextlib.contextmanager
def offline():
    """Hugging Face Hub and datasets offline, in the environment and in the modules that
    already read it; everything as it was afterwards."""
    saved_env = {k: os.environ.get(k) for k in OFFLINE_ENV}
    os.environ.update({k: "1" for k in OFFLINE_ENV})
    switches = [("huggingface_hub.constants", "HF_HUB_OFFLINE"), ("datasets.config", "HF_HUB_OFFLINE"),
                ("datasets.config", "HF_DATASETS_OFFLINE")]
    saved = [(sys.modules[m], a, getattr(sys.modules[m], a)) for m, a in switches
             if m in sys.modules and hasattr(sys.modules[m], a)]
    for module, attr, _ in saved:
        setattr(module, attr, True)
    try:
        yield
    finally:
        for module, attr, value in saved:
            setattr(module, attr, value)
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def quiet():
    """lm-eval's INFO/WARNING chatter and datasets' progress bars off (errors still show)."""
    import datasets

    logger, bars = logging.getLogger("lm_eval"), datasets.is_progress_bar_enabled()
    level = logger.level
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


@contextlib.contextmanager
def kept_random_state():
    """simple_evaluate seeds random, numpy and torch; put the run's generators back."""
    import numpy as np
    import torch

    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@hookimpl
def register_evaluators(register):
    register(LmEval)
