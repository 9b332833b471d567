"""The conformance kit: ``check_quantizer``, ``check_adapter``, ``check_evaluator``.

Each takes a plugin class (registered or not), runs in seconds on a tiny random Llama, and
raises ``AssertionError`` naming the plugin and what failed. What they check::

    quantizer  layer contract (shapes, frozen, forward = x·Ŵᵀ + b, gradient reaches x)
               storage_bytes() = bytes of the tensors the layer holds
               re-quantizing the same weight is exact; set_weight re-quantizes
               + the adapter cell below under every registered adapter method
    adapter    the adapter cell over every registered quantizer (int8 included)
    cell       on_data with two tasks ("a", "b"); loss falls in a few AdamW steps (every
               part's training hooks called as the trainer calls them, on_batch with the
               task of each row; then every row routed to task "a" for the comparisons; its state_dict → checkpoint → load_state_dict exact);
               save → load into a freshly attached model gives identical outputs;
               merge gives a plain model equal to the adapted one, within the quantizer's
               own gap between its matmul and its dequantized weight
               in bf16: a few small steps change the bf16 model as they change its
               merged float32 export (an update rounded away by bf16 activations shows)
    evaluator  returns {metric: number or text}, the same twice; higher_is_better is
               {metric: bool} over metrics it reports

A combination a plugin refuses with a one-line :class:`QpeftError` (``lora+loftq`` over
``none``: nothing to correct) is not a failure: it is returned as ``"refused: …"`` in the
``{name: outcome}`` dict each check returns, for the caller to assert on.

This module holds the checks and the quantizer × adapter cell; what they run on (the tiny
reference model and batch, ``adapt``/``attach``, the evaluation context) is in
:mod:`~qpeft.core.kit.fixtures`, the quantized layer's contract in
:mod:`~qpeft.core.kit.layer_contract`; both are re-exported here.
"""
import contextlib
import copy
import dataclasses
import math
import tempfile
from pathlib import Path

from qpeft.core.kinds.adapter import Adapter, Composition
from qpeft.core.base.errors import QpeftError
from qpeft.core.kit.fixtures import (  # noqa: F401  (re-exported: the kit's names stay importable here)
    _CACHE, TASKS, adapt, attach, calibrate, eval_context, logits, random_batches, route, tiny_batch, tiny_reference)
from qpeft.core.kit.layer_contract import layer_contract, relative, storage_is_held  # noqa: F401

STEPS, LR = 5, 2e-2
QUANT_VALUES = {"compute_dtype": "float32"}  # exact float32 matmuls: differences are the plugin's


def check_quantizer(cls, registry=None, options: dict | None = None, methods=None) -> dict[str, str]:
    """Check quantizer class ``cls`` alone, then under each adapter method (``methods``:
    registered method names; default every one). Returns ``{method: "ok" | "refused: …"}``."""
    from qpeft.core.kinds.quantizer import Quantizer
    from qpeft.core.plugin.registry import default

    reg = registry or default()
    registered(cls, Quantizer, reg)
    quantizer = cls.from_values({**QUANT_VALUES, **(options or {})})
    with stage(f"quantizer '{cls.name}'", "the layer contract"):
        layer_contract(quantizer)
    if methods is None:
        methods = [n for n in reg.names("adapter") if reg.get("adapter", n).role == "method"]
    return {m: cell(quantizer, composer(reg.get("adapter", m), reg)) for m in methods}


def check_adapter(cls, registry=None, options: dict | None = None, quantizers=None) -> dict[str, str]:
    """Check adapter class ``cls`` (a modifier on the most general method with its slot) over each
    quantizer (``quantizers``: registered names; default every one). Returns
    ``{quantizer: "ok" | "refused: …"}``."""
    from qpeft.core.plugin.registry import default

    reg = registry or default()
    registered(cls, Adapter, reg)
    compose = composer(cls, reg, options)
    return {q: cell(reg.get("quantizer", q).from_values(QUANT_VALUES), compose)
            for q in (reg.names("quantizer") if quantizers is None else quantizers)}


def check_evaluator(cls, registry=None, options: dict | None = None) -> dict:
    """Check evaluator class ``cls`` on the tiny model; returns the metrics it reported."""
    from qpeft.core.kinds.evaluator import Evaluator
    from qpeft.core.plugin.registry import default

    registered(cls, Evaluator, registry or default())
    where = f"evaluator '{cls.name}'"
    with stage(where, "evaluate"):
        ev, ctx = cls.from_values(options or {}), eval_context()
        first, again = ev.evaluate(ctx), ev.evaluate(ctx)
    assert isinstance(first, dict), f"{where}: evaluate returned {type(first).__name__}, not a dict"
    for key, value in first.items():
        ok = isinstance(value, (int, float, str)) and not (isinstance(value, float) and not math.isfinite(value))
        assert isinstance(key, str) and ok, f"{where}: metric {key!r} = {value!r}, not a finite number or text"
    assert first == again, f"{where}: two evaluations of the same model differ: {first} vs {again}"
    for metric, better in cls.higher_is_better.items():
        assert isinstance(better, bool), f"{where}: higher_is_better[{metric!r}] = {better!r}, not True/False"
        assert metric in first, f"{where}: higher_is_better names '{metric}', which evaluate did not report"
    return first


# -- the pieces ----------------------------------------------------------------------------
def registered(cls, base, reg) -> None:
    """``cls`` is a ``base`` plugin that registration would accept beside ``reg``'s plugins."""
    assert isinstance(cls, type) and issubclass(cls, base), f"{cls!r} is not a {base.__name__} subclass"
    peers = {**reg.plugins[cls.kind], cls.name: cls}
    problems = cls.problems() + cls.problems_among(peers)
    assert not problems, f"{cls.kind} '{cls.name}' would be refused at registration: {'; '.join(problems)}"


def composer(cls, reg, options: dict | None = None):
    """A function of no arguments building a fresh :class:`Composition` with ``cls`` — a
    modifier on the most general registered method with its slot: one subclassing no other
    host, and of those the one overriding least (``lora`` beside its sibling ``dora``)."""
    if cls.role == "method":
        return lambda: Composition(cls.from_values(options or {}), [], cls.name)
    hosts = [reg.get("adapter", n) for n in reg.names("adapter")]
    hosts = [h for h in hosts if h.role == "method" and cls.modifies in h.slots]
    assert hosts, f"adapter '{cls.name}': no registered method has the '{cls.modifies}' slot"
    roots = [h for h in hosts if not any(o is not h and issubclass(h, o) for o in hosts)]
    host = min(roots, key=lambda h: (len(vars(h)), h.name))   # the one overriding least
    return lambda: Composition(host.from_values({}), [cls.from_values(options or {})], f"{host.name}+{cls.name}")



def cell(quantizer, compose) -> str:
    """Train, reload and merge one quantizer × adapter pair; "ok" or "refused: reason"."""
    reference, batch = tiny_reference(), tiny_batch()
    composition = compose()
    where = f"quantizer '{quantizer.name}' × adapter '{composition.spec}'"
    try:
        with stage(where, "quantize and attach", refusable=True):
            model = attach(reference, quantizer, composition)
    except QpeftError as exc:
        return f"refused: {exc}"
    with stage(where, "training"):
        trained = train(model, batch, (quantizer, *composition.parts), where)
    with tempfile.TemporaryDirectory() as tmp, stage(where, "save → load"):
        composition.method.save(model, Path(tmp), {"spec": composition.spec, "quantizer": quantizer.name})
        again = compose()
        fresh = attach(reference, quantizer, again, seed=1)  # another seed: a skipped load shows
        again.method.load(fresh, Path(tmp))
        route((quantizer, *again.parts), fresh, TASKS[:1])
    reloaded = logits(fresh.eval(), batch)
    assert reloaded.equal(trained), (f"{where}: save → load is not exact: max |Δlogit| = "
                                     f"{(reloaded - trained).abs().max().item():.3g}")
    with stage(where, "merge"):
        merged = again.method.merge(fresh)
    leftover = [n for n, p in merged.named_parameters() if p.requires_grad]
    assert not leftover, f"{where}: the merged model still trains {leftover[:3]}"
    error = (logits(merged, batch) - trained).abs().max().item()
    gap = quantizer_gap(reference, quantizer)
    tolerance = 2e-3 + 1e-3 * trained.abs().max().item() + 3 * gap
    assert error <= tolerance, (f"{where}: merged output differs from the adapted one by {error:.3g} "
                                f"(allowed {tolerance:.3g}; the quantizer's own gap is {gap:.3g})")
    with stage(where, "bf16 update"):
        update_survives(reference, quantizer, compose, where)
    return "ok"


def update_survives(reference, quantizer, compose, where: str) -> float:
    """AdamW steps at lr 3e-4 (the run default) in bf16 compute, every training hook called
    as the trainer calls it, change the model's logits as they change its merged float32
    export: ``c = ⟨Δ16, Δ32⟩ / ⟨Δ32, Δ32⟩`` within 0.4 of 1, where Δ16 is the adapted bf16
    model minus itself before the steps and Δ32 the same for the merged float32 models.

    c is taken once Δ32 has moved the logits by 1.5e-3 of their RMS (3 steps for LoRA, which
    moves them 11 %; 6 for IA³; about 20 for AdaLoRA, whose Λ starts at 0), at most 60 steps: bf16's own
    rounding is uncorrelated with the update and averages out over the 24,000 logits (0.7–1.05
    measured for IA³, 1.00 for LoRA); an update rounded away, as IA³'s l ≈ 1 ± 0.1 % was in a
    bf16 stream, gives c = 0."""
    import torch

    from qpeft.core.train.hooks import TrainFacts, TrainHooks

    values = {**dataclasses.asdict(quantizer.options), "compute_dtype": "bfloat16"}
    q16, composition, batch = type(quantizer).from_values(values), compose(), tiny_batch()
    model = attach(reference, q16, composition)
    route((q16, *composition.parts), model, TASKS[:1])
    before16 = logits(model.eval(), batch)
    before32 = logits(composition.method.merge(copy.deepcopy(model)), batch)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-4, weight_decay=0.0)
    hooks, most = TrainHooks((q16, *composition.parts)), 60
    hooks.train_begin(model, TrainFacts(most, 1, 1, 0, 0, str(params[0].device)))
    for step in range(most):
        model.train()
        hooks.step_begin(step, model)
        hooks.add_extra(model(batch, labels=batch).loss, model, step, 1.0).backward()
        hooks.gradients(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.step_end(model, step)
        if (step + 1) % 3 == 0:        # (an eval forward first: it drops tensors a layer kept from training)
            after16 = logits(model.eval(), batch)
            moved = logits(composition.method.merge(copy.deepcopy(model)), batch) - before32
            if moved.pow(2).mean().sqrt() >= 1.5e-3 * before32.pow(2).mean().sqrt():
                break
    c = ((after16 - before16) * moved).sum().item() / max((moved * moved).sum().item(), 1e-30)
    assert abs(c - 1) <= 0.4, (
        f"{where}: in bf16 the trained update moves the logits {c:.2f}× as far along its direction as it "
        "moves the merged float32 model; declare needs_float32_activations if bf16 activations round it away")
    return c


def train(model, batch, plugins, where: str):
    """A few AdamW steps, calling every plugin's training hooks as the trainer does (one
    micro-batch, clipping at 1.0; core/train/hooks.py); asserts the loss fell and that the
    plugins' state_dict survives a checkpoint, and returns the trained model's logits in eval mode."""
    import torch

    from qpeft.core.train.hooks import TrainFacts, TrainHooks

    params = [p for p in model.parameters() if p.requires_grad]
    assert params, f"{where}: attach left no trainable parameter"
    losses, optimizer = [], torch.optim.AdamW(params, lr=LR)
    hooks, facts = TrainHooks(plugins), TrainFacts(STEPS, 1, 1, 0, 0, str(params[0].device))
    model.train()
    hooks.train_begin(model, facts)
    for step in range(STEPS):
        hooks.step_begin(step, model)
        hooks.batch(model, TASKS, step)
        loss = model(batch, labels=batch).loss
        assert loss.requires_grad, f"{where}: the loss does not depend on the trainable tensors"
        hooks.add_extra(loss, model, step, 1.0).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        hooks.gradients(model, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        hooks.step_end(model, step)
        losses.append(round(loss.item(), 4))
    assert losses[-1] < losses[0] - 1e-3, f"{where}: loss did not fall in {STEPS} steps: {losses}"
    model.eval()
    hooks.train_end(model, facts)
    state_survives(hooks, where)
    hooks.batch(model, TASKS[:1], None)      # every row task "a": what reload and merge must give
    return logits(model, batch)


def state_survives(hooks, where: str) -> None:
    """The plugins' ``state_dict()`` goes through a checkpoint (tensors and JSON, verified)
    and back through ``load_state_dict``, which restores it exactly."""
    from qpeft.core.train import checkpoint

    state, before, after = hooks.state(), {}, {}
    with tempfile.TemporaryDirectory() as tmp, stage(where, "state_dict → checkpoint → load_state_dict"):
        saved = checkpoint.save(Path(tmp) / "step-000001", {"plugins": state})
        hooks.load(checkpoint.load(saved)["plugins"], saved.name, say=lambda line: None)
        shapes = checkpoint.flatten(state, "s", before), checkpoint.flatten(hooks.state(), "s", after)
    same = shapes[0] == shapes[1] and before.keys() == after.keys() and all(before[k].equal(after[k]) for k in before)
    assert same, f"{where}: load_state_dict(state_dict()) through a checkpoint does not restore the state"


@contextlib.contextmanager
def stage(where: str, what: str, refusable: bool = False):
    """Turn an exception a plugin raises into an AssertionError naming it and the stage
    (a one-line QpeftError passes through where the plugin may refuse)."""
    try:
        yield
    except AssertionError:
        raise
    except Exception as exc:
        if refusable and isinstance(exc, QpeftError):
            raise
        raise AssertionError(f"{where}: {what} raised {type(exc).__name__}: {exc}") from exc


def quantizer_gap(reference, quantizer) -> float:
    """Max |Δlogit| between the quantized model and the same model with each layer replaced
    by an ``nn.Linear`` of its dequantized weight (0 for a quantizer that multiplies by Ŵ)."""
    from torch import nn

    from qpeft.core.kinds.quantizer import quantized_layers

    key = ("gap", type(quantizer), repr(quantizer.options))
    if key in _CACHE:
        return _CACHE[key]
    model = copy.deepcopy(reference)
    quantizer.quantize_model(model)
    quantized = logits(model.eval(), tiny_batch())
    for name, layer in quantized_layers(model).items():
        parent, attr = model.get_submodule(name.rpartition(".")[0]), name.rpartition(".")[2]
        plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
        plain.weight.data = layer.dequantize().to(layer.compute_dtype)
        if layer.bias is not None:
            plain.bias.data = layer.bias.detach().clone()
        setattr(parent, attr, plain)
    _CACHE[key] = (logits(model.float(), tiny_batch()) - quantized).abs().max().item()
    return _CACHE[key]
