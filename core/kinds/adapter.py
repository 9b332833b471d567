"""The Adapter plugin kind, and how ``method+modifier+…`` specs are composed.

Two roles:

- a **method** (lora, dora, ia3, qdylora, …) wraps the model's quantized layers and owns
  the trainable parameters. It lists the ``slots`` — replaceable pieces such as
  ``"scaling"`` or ``"init"`` — that modifiers may fill;
- a **modifier** (rslora, loftq, olora, …) fills one slot of a method (``modifies``).

A method may declare ``slots`` as ``{name: Protocol}``: the Protocol lists what a modifier
filling that slot must define, which registration checks (:meth:`Adapter.problems_among`).

``compose`` checks a spec against those declarations only — never against names — so a
third-party modifier composes exactly as a built-in one does, and a combination that
makes no sense (``ia3+loftq``) is refused with a one-line reason.
"""
from collections.abc import Collection, Mapping
from typing import ClassVar, Literal

from qpeft.core.base import spec as specs
from qpeft.core.base.errors import OptionsError, QpeftError, closest
from qpeft.core.plugin.base import Plugin

ROLES = ("method", "modifier")
METHOD_API = ("attach", "save", "load", "merge")
CALIBRATION_API = ("calibration_batches", "calibrate", "apply_calibration")


class Adapter(Plugin):
    """Base of adapter plugins (methods and modifiers)."""

    kind: ClassVar[str] = "adapter"
    role: ClassVar[Literal["method", "modifier"]] = "method"
    slots: ClassVar[Collection[str]] = frozenset()  # method: the pieces modifiers may replace
    modifies: ClassVar[str] = ""              # modifier: the slot it fills
    needs_source_weights: ClassVar[bool] = False  # wants each quantized layer's original W
    # Its effect is a rescaling near 1 of activations (IA³'s l, DoRA's m/‖W'‖): in a bf16
    # stream a factor within half an ulp of 1 (0.2–0.4 %) rounds away, so the model keeps
    # float32 activations between layers and only the quantized matmuls run in bf16.
    needs_float32_activations: ClassVar[bool] = False
    # One line ``qpeft export`` prints beside an adapter written in PEFT's format: where PEFT
    # cannot serve it as qpeft does, and what to use instead ("" when it can everywhere).
    peft_note: ClassVar[str] = ""

    @classmethod
    def listing_extras(cls) -> dict:
        extra = {"role": cls.role}
        if cls.role == "modifier":
            extra["modifies"] = cls.modifies
        elif cls.slots:
            extra["slots"] = sorted(cls.slots)
        return extra

    # -- methods implement these -------------------------------------------------------
    def attach(self, model, modifiers: list["Adapter"]) -> None:
        """Wrap the target layers of ``model`` in place; only adapter tensors stay trainable."""
        raise NotImplementedError(f"adapter '{self.name}' is a modifier; compose it onto a method")

    def save(self, model, directory, meta: dict) -> None:
        """Write the adapter of an attached ``model`` to ``directory`` (PEFT's format where
        PEFT knows the method); ``meta`` holds the quantizer, base model and qpeft version."""
        raise NotImplementedError

    def load(self, model, directory) -> None:
        """Load tensors written by :meth:`save` into ``model`` (attached by the same spec)."""
        raise NotImplementedError

    def merge(self, model, dtype=None):
        """Fold the adapter into the dequantized base: a plain full-precision model."""
        raise NotImplementedError

    # -- reading adapters written by other tools (optional) ----------------------------
    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """This plugin's option values for a Hugging Face PEFT ``adapter_config.json``, or
        None when the plugin does not take part in that adapter.

        Asked of every registered adapter class that defines it itself (an inherited one is
        not asked), with ``target_modules``/``feedforward_modules`` already resolved to
        lists that the ``targets`` option accepts. One method and any modifiers may claim a
        config; a field set in it that no claiming plugin reads is refused
        (``qpeft.core.interop.peft_import``)."""
        return None

    # -- optional hook of a modifier (the default does nothing) ------------------------
    def update_peft_config(self, config: dict) -> None:
        """Set this modifier's fields in the method's PEFT ``adapter_config.json`` (``config``,
        changed in place) — rsLoRA sets ``use_rslora``. Default: none. (A method writes the
        whole config with its own ``peft_config(model) -> dict``.)"""

    def peft_tensors(self, layer, tensors: dict) -> dict:
        """The tensors PEFT's ``adapter_model.safetensors`` holds for ``layer`` (an adapter
        layer), given ``tensors`` (its own under PEFT's key suffixes, or what an earlier part
        returned). Return ``tensors`` itself to change nothing (the default), or a new dict:
        an init that rewrote the base returns an equivalent adapter over the original base
        (CorDA, LoRA-GA: ``[B, −B₀]·[A; A₀]``, rank 2r). A LoRA layer written with another
        rank keeps its scaling in the config (r, lora_alpha or their patterns), and qpeft keeps
        the layer's own tensors in ``qpeft_adapter.safetensors``, which it loads from."""
        return tensors

    # -- optional lifecycle hooks of a method (the defaults do nothing) ---------------
    def report_variants(self, model) -> dict:
        """Extra evaluations after training, ``{label: apply}``: the run report calls each
        ``apply()`` and evaluates again under ``"after LABEL"`` (QDyLoRA: one per rank).
        Called after the adapter is saved. Default: none."""
        return {}

    def report_facts(self, model) -> dict:
        """What the run report says about the trained adapter, under "Adapter" (AdaLoRA: the
        rank each layer ended with). Numbers and strings are listed in report.md; nested
        values go to report.json only. Called after training. Default: nothing."""
        return {}

    # -- optional calibration hook: look at training data before training ---------------
    def calibration_batches(self) -> int:
        """How many of the run's training batches :meth:`calibrate` wants (EVA's
        ``calibration_batches`` option); 0, the default: it is never called."""
        return 0

    def calibrate(self, model, batches) -> dict:
        """Once, in a new run, after attach and before the optimizer is built: look at
        ``batches`` (a :class:`~qpeft.core.dataset.calibration.CalibrationBatches`: the run's
        first training batches, seeded, with labels whose prompt tokens are -100) and return
        the result as ``{key: tensor}`` — EVA: each layer's initial A. May run forward (and
        backward) passes with its own hooks on layers; must leave the model as it found it
        (mode, hooks, gradients). Under data parallel only rank 0 calls it."""
        raise NotImplementedError(f"adapter '{self.name}' asks for calibration batches but defines no calibrate()")

    def apply_calibration(self, model, state: dict) -> None:
        """Set the adapter from what :meth:`calibrate` returned (tensors on the CPU) — on
        every process of a new run, and again wherever the init must be rebuilt without data:
        ``--resume``, loading a saved adapter (``qpeft eval``, ``--init-adapter``). A layer
        may change its rank here (``LoRALinear.set_rank``); the optimizer is built after."""
        raise NotImplementedError(f"adapter '{self.name}' defines calibrate() but no apply_calibration()")

    def select_rank(self, model, rank: int) -> None:
        """Evaluate and export at ``rank`` (``qpeft eval --rank``); a dynamic-rank method
        overrides it. Default: refuse, since the method has one rank."""
        raise QpeftError(f"adapter '{self.name}' has a fixed rank; --rank needs an adapter "
                         "method that defines select_rank()")

    def select_task(self, model, task: str) -> None:
        """Evaluate and export as task ``task`` for good (``qpeft eval --task``, ``qpeft export
        --task``); a multi-task method (MTLoRA) overrides it. Default: refuse."""
        raise QpeftError(f"adapter '{self.name}' has no tasks; --task needs a multi-task adapter "
                         "method that defines select_task(), such as mtlora")

    # -- registration checks -------------------------------------------------------
    @classmethod
    def problems(cls) -> list[str]:
        """Plugin's checks, plus: a valid role; a method defines attach/save/load/merge and
        declares slot names; a modifier names the one slot it fills and declares none."""
        found = super().problems()
        if cls.role not in ROLES:
            return found + [f"has role '{cls.role}', which is neither 'method' nor 'modifier'"
                            + hint(str(cls.role), ROLES)]
        if isinstance(cls.slots, str) or not all(isinstance(s, str) and s.isidentifier() for s in cls.slots):
            found.append(f"declares slots={cls.slots!r}; use a set of slot names or {{name: Protocol}}")
        elif isinstance(cls.slots, Mapping):
            found += [f"declares slots['{slot}'] = {proto!r}, not the Protocol a modifier of it follows"
                      for slot, proto in cls.slots.items() if not isinstance(proto, type)]
        calibrating = [cls.implements(n) for n in CALIBRATION_API]
        if any(calibrating) and not all(calibrating):
            found += [f"defines {', '.join(n for n, c in zip(CALIBRATION_API, calibrating) if c)} but not "
                      f"{', '.join(n for n, c in zip(CALIBRATION_API, calibrating) if not c)}() (a calibrating "
                      "adapter defines all three)"]
        if cls.role == "method":
            found += [f"does not define {name}()" for name in METHOD_API if not cls.implements(name)]
            if cls.modifies:
                found.append(f"is a method but sets modifies='{cls.modifies}'; set role = 'modifier'")
        elif not cls.modifies:
            found.append("is a modifier without 'modifies' (the slot it fills, e.g. 'scaling')")
        elif callable(getattr(cls, "peft_config", None)):
            found.append("is a modifier defining peft_config(); a modifier's hook is "
                         "update_peft_config(config) — rename it")
        elif cls.slots:
            found.append("is a modifier but declares slots; only a method has slots")
        return found

    @classmethod
    def problems_among(cls, peers: dict) -> list[str]:
        """A method's slot that no registered method describes with a Protocol; a modifier
        filling a slot no registered method has, or lacking what the slot's Protocol asks."""
        methods = [c for c in peers.values() if c.role == "method"]
        known = {slot: slot_protocols(methods, slot) for m in methods for slot in m.slots}
        known = {slot: protocols for slot, protocols in known.items() if protocols}
        if cls.role == "method":
            return [f"declares slot '{slot}', which no method describes with a Protocol"
                    + hint(slot, known, f"; declare slots = {{'{slot}': Protocol}}")
                    for slot in cls.slots if slot not in known]
        if cls.modifies not in known:
            return [f"modifies '{cls.modifies}', a slot no adapter method declares" + hint(cls.modifies, known)]
        return [f"fills the '{cls.modifies}' slot but does not define {name}() ({proto.__name__})"
                for proto in known[cls.modifies] for name in protocol_methods(proto)
                if not callable(getattr(cls, name, None))]


def hint(word: str, choices, otherwise: str = "") -> str:
    """"; did you mean 'x'?" for the closest choice, else ``otherwise``."""
    near = closest(word, choices)
    return f"; did you mean '{near}'?" if near else otherwise


def slot_protocols(methods, slot: str) -> list[type]:
    """The Protocols that ``methods`` (or their base classes) give for filling ``slot``."""
    found = []
    for method in methods:
        for c in method.__mro__:
            declared = vars(c).get("slots")
            if isinstance(declared, Mapping) and slot in declared and declared[slot] not in found:
                found.append(declared[slot])
                break
    return found


def protocol_methods(protocol: type) -> list[str]:
    """The public methods a Protocol lists."""
    return sorted(n for n, v in vars(protocol).items() if callable(v) and not n.startswith("_"))


class Composition:
    """One method and the modifiers filling its slots, as built from a spec."""

    def __init__(self, method: Adapter, modifiers: list[Adapter], spec: str):
        self.method, self.modifiers, self.spec = method, modifiers, spec

    @property
    def parts(self) -> list[Adapter]:
        return [self.method, *self.modifiers]

    @property
    def needs_source_weights(self) -> bool:
        """True when a part (LoftQ, say) must see the full-precision W of each layer: the
        quantizer then keeps it as ``layer.source_weight`` (on CPU) until attach."""
        return any(part.needs_source_weights for part in self.parts)

    @property
    def needs_float32_activations(self) -> bool:
        """True when a part's effect would be rounded away by activations in the compute
        dtype (see :attr:`Adapter.needs_float32_activations`): the layers left unquantized
        are then held in float32, and the model's stream with them."""
        return any(part.needs_float32_activations for part in self.parts)

    @property
    def calibrating(self) -> list[Adapter]:
        """The parts that look at training data before training (:meth:`Adapter.calibrate`)."""
        return [part for part in self.parts if getattr(part, "calibration_batches", lambda: 0)() > 0]

    def attach(self, model) -> None:
        self.method.attach(model, self.modifiers)


def calibrated(part: Adapter, model, batches) -> dict:
    """``part.calibrate(model, batches)`` as the run and the conformance kit call it: in eval
    mode, the training mode and cleared gradients restored after, the result checked to be
    ``{name without '/': tensor}`` and moved to the CPU (one line naming the plugin otherwise)."""
    import torch

    training = model.training
    model.eval()
    try:
        state = part.calibrate(model, batches)
    finally:
        model.train(training)
        model.zero_grad(set_to_none=True)
    if not isinstance(state, dict) or not all(isinstance(k, str) and "/" not in k and isinstance(v, torch.Tensor)
                                              for k, v in state.items()):
        raise QpeftError(f"adapter '{part.name}': calibrate() returned {type(state).__name__}; return a dict "
                         "of tensors keyed by names without '/' (e.g. each layer's initial A)")
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


def compose(spec: str, registry=None) -> Composition:
    """A :class:`Composition` from ``"dora+loftq:iters=3"`` (plugins looked up in ``registry``,
    default the process-wide one), or a one-line error."""
    if registry is None:
        from qpeft.core.plugin.registry import default

        registry = default()
    return assemble(specs.parse(spec), registry, spec)


def assemble(parts: list[tuple[str, dict]], registry, spec: str) -> Composition:
    """A :class:`Composition` from ``(name, option values)`` pairs — parsed from a spec, or
    recorded in a run's config.json — checked against each part's role and slots."""
    names = [name for name, _ in parts]
    if len(set(names)) != len(names):
        raise OptionsError(f"'{spec}' names an adapter twice")
    classes = [registry.get("adapter", name) for name in names]
    methods = [cls for cls in classes if cls.role == "method"]
    if len(methods) != 1:
        found = ", ".join(c.name for c in methods) or "none"
        all_methods = [n for n in registry.names("adapter") if registry.get("adapter", n).role == "method"]
        raise OptionsError(f"'{spec}' needs exactly one adapter method (found: {found}); "
                           f"methods: {', '.join(all_methods)}")
    method_cls = methods[0]
    filled: dict[str, str] = {}
    for cls in classes:
        if cls.role != "modifier":
            continue
        if cls.modifies not in method_cls.slots:
            fits = [n for n in registry.names("adapter")
                    if cls.modifies in registry.get("adapter", n).slots]
            raise OptionsError(f"'{cls.name}' replaces the '{cls.modifies}' step of an adapter, which "
                               f"'{method_cls.name}' does not have; use it with: {', '.join(fits) or 'none'}")
        if cls.modifies in filled:
            raise OptionsError(f"'{filled[cls.modifies]}' and '{cls.name}' both set the "
                               f"{cls.modifies}; keep one")
        filled[cls.modifies] = cls.name
    built = [cls.from_values(values) for cls, (_, values) in zip(classes, parts)]
    method = next(b for b in built if b.role == "method")
    return Composition(method, [b for b in built if b.role == "modifier"], spec)
