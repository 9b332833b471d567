"""What the conformance kit runs on: the tiny reference model and batch (cached), a quantized
copy with an adapter attached and calibrated as a run builds it (``adapt``, ``attach``), the
training hooks' task routing, and the evaluators' context on the tiny model with its real
tokenizer. Re-exported by :mod:`qpeft.core.kit.conformance` (and ``adapt`` by ``qpeft.testing``).
"""
import copy

from qpeft.core.kinds.adapter import Composition

TASKS = ("a", "b")   # the kit's data facts: the tiny batch's two rows are tasks a and b
_CACHE: dict = {}  # the reference model, the evaluation model, each quantizer's gap


def adapt(reference, adapter=None, quantizer="none:compute_dtype=float32", registry=None, seed: int = 0,
          calibration=None):
    """``(model, composition)``: a quantized copy of ``reference`` with ``adapter`` attached.

    ``adapter`` is a spec (``"reslora:r=4+rslora"``, looked up in ``registry``, default the
    process-wide one), a :class:`Composition`, or None (quantized only; composition None);
    ``quantizer`` a spec or a Quantizer instance. Torch is seeded with ``seed`` before attach;
    a calibrating part (EVA) sees ``calibration`` (see :func:`attach`)."""
    from qpeft.core.kinds import adapter as adapters
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    reg = registry or default()
    if isinstance(quantizer, str):
        quantizer = build_plugin("quantizer", quantizer, reg)
    composition = adapters.compose(adapter, reg) if isinstance(adapter, str) else adapter
    return attach(reference, quantizer, composition, seed, calibration), composition


def attach(reference, quantizer, composition: Composition | None, seed: int = 0, calibration=None):
    """A quantized copy of ``reference`` with ``composition`` (if any) attached — and, when a
    part calibrates (EVA), calibrated on ``calibration`` (a list of ``model(**batch)`` dicts;
    default: four seeded batches of random tokens), as a run calibrates it."""
    import torch

    from qpeft.core.plugin.base import DataFacts
    from qpeft.core.train.hooks import TrainHooks

    model = copy.deepcopy(reference)
    quantizer.quantize_model(model, keep_source=composition is not None and composition.needs_source_weights,
                             float32_activations=composition is not None and composition.needs_float32_activations)
    torch.manual_seed(seed)
    if composition is not None:
        TrainHooks(composition.parts).data(DataFacts(TASKS, {t: 1 for t in TASKS}, len(TASKS), 0))
        composition.attach(model)
        if composition.calibrating:
            calibrate(model, composition, calibration or random_batches(reference.config.vocab_size))
    return model


def route(plugins, model, tasks, step=None) -> None:
    """``on_batch`` on every plugin, as the trainer and the evaluators call it."""
    from qpeft.core.train.hooks import TrainHooks

    TrainHooks(plugins).batch(model, tasks, step)


def calibrate(model, composition: Composition, batches: list) -> None:
    """What a run's calibration stage does, on ``batches``: each calibrating part's
    ``calibrate`` (:func:`~qpeft.core.kinds.adapter.calibrated`), its state applied through
    ``restore_calibration``."""
    from qpeft.core.dataset.calibration import CalibrationBatches
    from qpeft.core.kinds.adapter import calibrated

    states = {part.name: calibrated(part, model, CalibrationBatches.of(batches[:part.calibration_batches()]))
              for part in composition.calibrating}
    composition.method.restore_calibration(model, states)


def random_batches(vocab_size: int, count: int = 4, rows: int = 4, length: int = 32, seed: int = 0) -> list:
    """``count`` batches of random token ids (labels: the ids, the first quarter masked), seeded."""
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab_size, (rows, length), generator=g)
        labels = ids.clone()
        labels[:, :length // 4] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def logits(model, batch):
    import torch

    with torch.no_grad():
        return model(batch).logits.float()


def tiny_reference():
    """The kit's reference model: a 2-block tiny Llama, vocabulary 1000, seed 5 (cached)."""
    from qpeft.core.model.tiny import random_llama

    if "model" not in _CACHE:
        _CACHE["model"] = random_llama(vocab_size=1000, seed=5)
    return _CACHE["model"]


def tiny_batch():
    import torch

    return torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(3))


def eval_context():
    """An EvalContext on the tiny model with its real tokenizer, two validation examples
    and two checkable test cases."""
    from functools import partial

    from qpeft.core.dataset import templates
    from qpeft.core.dataset.examples import Example
    from qpeft.core.kinds.evaluator import EvalContext
    from qpeft.core.model.models import load_tokenizer
    from qpeft.core.model.tiny import random_llama

    if "eval" not in _CACHE:
        tokenizer = load_tokenizer(None)
        _CACHE["eval"] = random_llama(len(tokenizer)), tokenizer
    model, tokenizer = _CACHE["eval"]
    model.requires_grad_(False)
    examples = [Example(messages=[{"role": "user", "content": f"Which is larger, {a} or {b}?"}],
                        response=f"{max(a, b)} is larger.", answer=str(max(a, b)))
                for a, b in ((9.11, 9.9), (3.5, 3.25))]
    return EvalContext(model=model.eval(), tokenizer=tokenizer, stage="after",
                       validation=examples, test=examples, limit=2,
                       encode=lambda e: templates.encode(e, tokenizer, max_length=64)[0],
                       prompt_ids=partial(templates.prompt_ids, tokenizer=tokenizer))
