"""The "before" numbers of a quantized base, computed once (issue 20, "baseline evaluated once").

Every run with the same base model, quantizer and evaluation data measures the same untrained
quantized model before training; a 15-cell ``qpeft compare`` measured it 15 times. An
evaluator that declares ``reproducible = True`` (perplexity, accuracy, mmlu, prompts: a function
of the weights, the data and its options — not of time or memory, as footprint is) has its
"before" result kept under ``$QPEFT_CACHE/baselines/KEY.json``, where KEY is the SHA-256 of::

    the base model's content     the SHA-256 of each of its files (a .gguf, or a directory's
                                 files), not its path; memoised by (path, size, mtime)
    the quantizer                name, options, origin and ``cache_version`` (the
                                 quantized-base cache's quantizer key); the compute dtype;
                                 whether the adapter keeps float32 activations, and whether
                                 a plugin routes by task (evaluation then scores each task apart)
    the evaluator                name, options, origin and version
    the evaluation data          the validation and test examples themselves (after
                                 --eval-limit), the template, --max-length, --train-on-prompt
    where                        the device type (cpu/cuda), torch's and qpeft's versions

Reading checks that the entry's recorded key equals the run's (a damaged or foreign file is
measured again and replaced). ``--no-cache`` measures everything. The report lists the
evaluators whose "before" came from the cache (``facts.before_cached``).
"""
import dataclasses
import hashlib
import json
import os
from pathlib import Path

from qpeft.core.base.version import __version__
from qpeft.core.model import models, quant_cache
from qpeft.core.model.quant_cache import file_sha256  # noqa: F401  (its home until the quantized-base cache)
from qpeft.core.train.hooks import TrainHooks


def directory() -> Path:
    """``$QPEFT_BASELINES``, else ``$QPEFT_CACHE/baselines``."""
    return Path(os.environ.get("QPEFT_BASELINES") or models.cache_dir() / "baselines").expanduser()


def model_content(spec: str | None) -> str:
    """A SHA-256 standing for the base model's bytes (its files'), whatever path names it: the
    quantized-base cache's (:func:`quant_cache.model_content`), memoised beside the baselines."""
    return quant_cache.model_content(spec, directory() / "file-hashes.json")


def plugin_key(plugin) -> dict:
    origin = getattr(plugin, "origin", None)
    return {"name": plugin.name, "options": dataclasses.asdict(plugin.options),
            "origin": str(origin) if origin else None}


def run_key(cfg, plan, device) -> dict:
    """What every "before" evaluation of this run shares (the evaluator is added per entry)."""
    import torch

    examples = [[dataclasses.asdict(e) for e in split] for split in (plan.validation, plan.test)]
    for split in examples:
        for e in split:
            e.pop("source", None)      # where it was read, not what it is
    return {"format": 1, "model": model_content(cfg.model), "quantizer": quant_cache.quantizer_key(plan.quantizer),
            "compute_dtype": str(plan.quantizer.compute_dtype),
            "float32_activations": bool(plan.adapter.needs_float32_activations),
            "by_task": bool(TrainHooks([plan.quantizer, *plan.adapter.parts, *plan.evaluators]).routes),
            "data": hashlib.sha256(json.dumps(examples, sort_keys=True, default=str).encode()).hexdigest(),
            "template": cfg.template, "max_length": cfg.max_length, "train_on_prompt": cfg.train_on_prompt,
            "device": str(device).split(":")[0], "torch": torch.__version__, "qpeft": __version__}


def entry(shared: dict, evaluator) -> tuple[Path, dict]:
    key = {**shared, "evaluator": plugin_key(evaluator)}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return directory() / f"{digest}.json", key


def read(path: Path, key: dict) -> dict | None:
    """The cached result, or None (absent, damaged, or made for another key)."""
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or json.loads(json.dumps(key, default=str)) != saved.get("key"):
        return None
    result = saved.get("result")
    return result if isinstance(result, dict) and "error" not in result else None


def write(path: Path, key: dict, result: dict, run_dir) -> None:
    """Keep ``result`` (never an evaluator's error); a cache that cannot be written is skipped."""
    if "error" in result:
        return
    try:
        _write_json(path, {"key": key, "result": result, "run": str(run_dir)})
    except OSError:
        pass


_write_json = quant_cache.write_json
