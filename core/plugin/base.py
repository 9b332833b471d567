"""What every plugin is: a class with a name, a one-line description and an Options dataclass.

The three kinds (Quantizer, Adapter, Evaluator) subclass :class:`Plugin`. The registry
stamps each registered class with its :class:`Origin` — the distribution that provided it.

The lifecycle is declared, never probed: every method the core may call on a plugin is a
method of its kind's base class — ``required_methods`` that a plugin must define, and
optional hooks with documented no-op defaults. :meth:`Plugin.problems` checks a class
against them at registration, so a missing method or a misspelled hook (``on_step_begun``)
is reported then, not discovered mid-run.
"""
import dataclasses
import difflib
from typing import ClassVar

from qpeft.core.base import options as opts


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a plugin came from: a distribution name and version ("qpeft" for built-ins)."""

    distribution: str
    version: str

    def __str__(self) -> str:
        return f"{self.distribution} {self.version}"


@dataclasses.dataclass(frozen=True)
class TrainFacts:
    """What :meth:`Plugin.on_train_begin` and :meth:`Plugin.on_train_end` receive."""

    total_steps: int      # optimizer steps of the whole run
    grad_accum: int       # micro-batches per optimizer step (in each process)
    world_size: int       # data-parallel processes
    rank: int             # this process (0: the one that logs and checkpoints)
    start_step: int       # 0, or the step a resumed run continues from
    device: str           # where the model trains ("cpu", "cuda:0")


@dataclasses.dataclass(frozen=True)
class DataFacts:
    """What :meth:`Plugin.on_data` receives: the run's training data, before anything loads."""

    tasks: tuple = ()            # the task names the training examples carry, sorted ("" never)
    task_examples: dict = dataclasses.field(default_factory=dict)   # task → training examples
    examples: int = 0            # training examples (with or without a task)
    untasked: int = 0            # training examples without a task


class Plugin:
    """Base of the three plugin kinds. Subclasses set ``name`` and ``description``."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    Options: ClassVar[type] = opts.NoOptions
    origin: ClassVar[Origin | None] = None
    required_methods: ClassVar[tuple[str, ...]] = ()   # a concrete plugin must define these

    def __init__(self, options=None, **values):
        """Build from an Options instance, or from keyword values checked against Options."""
        if options is None:
            options = opts.build(self.Options, values, f"{self.kind} '{self.name}'")
        elif values:
            raise TypeError("pass either an Options instance or keyword values, not both")
        self.options = options

    @classmethod
    def from_values(cls, values: dict | None):
        """An instance from a dict of option values (strings are parsed)."""
        return cls(opts.build(cls.Options, values, f"{cls.kind} '{cls.name}'"))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.options})"

    # -- data hooks (optional; the defaults do nothing) ---------------------------------
    def on_data(self, facts: "DataFacts") -> None:
        """Once, when the run's data is read and before the model loads or the adapter is
        attached (so an adapter may size itself to ``facts.tasks``); also before ``qpeft eval``
        rebuilds a run. Called with keyword arguments."""

    def on_batch(self, model, tasks: tuple | None, step: int | None) -> None:
        """Before the forward passes over a batch: ``tasks`` holds the task of each row (None
        for a row without one), or one name for every row of the passes that follow; None:
        the data carries no task. ``step``: the optimizer step in training, None in evaluation
        (the validation loss, an evaluator scoring one task). MTLoRA routes rows by it."""

    # -- training hooks (optional; the defaults do nothing) -----------------------------
    # The trainer calls them on every plugin of a run — quantizer, adapter method, its
    # modifiers, evaluators, in that order — with keyword arguments (except on_step_begin),
    # so a hook may gain arguments later. When each runs: docs/writing-plugins.md.
    def on_train_begin(self, model, facts: "TrainFacts") -> None:
        """Once, before the first step of this process's training (after a resume restored
        the weights and :meth:`load_state_dict`; ``facts.start_step`` says where it starts)."""

    def on_step_begin(self, step: int, model) -> None:
        """Before optimizer step ``step`` (0-based), before its first micro-batch — QDyLoRA
        samples its rank here. Called positionally."""

    def extra_loss(self, model, step: int):
        """A scalar tensor added to each micro-batch's loss after its forward pass, weighted
        as that micro-batch's mean task loss is (so it is averaged like it), and logged as
        ``loss/<name>`` in metrics.jsonl. None: no term for this micro-batch."""
        return None

    def on_gradients(self, model, step: int) -> None:
        """Once per optimizer step, after every micro-batch's backward, the all-reduce across
        processes and clipping; before the optimizer steps (the gradients are in ``.grad``)."""

    def on_step_end(self, model, step: int) -> None:
        """After optimizer step ``step``, the schedule's step and ``zero_grad`` (``.grad`` is
        None by then), before the step is logged, evaluated and checkpointed."""

    def on_train_end(self, model, facts: "TrainFacts") -> None:
        """Once, when every step is done, after the final checkpoint (the model in eval mode).
        Not called when a signal or an error stops training."""

    def state_dict(self) -> dict | None:
        """This plugin's own training state (EMA scores, masks): nested dicts and lists of
        tensors, numbers and strings, saved in every checkpoint. None: it keeps none."""
        return None

    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned (tensors come back on the CPU), on
        ``--resume`` before :meth:`on_train_begin`."""

    @classmethod
    def listing_extras(cls) -> dict:
        """Extra fields ``qpeft list`` shows for this class (an adapter's role). Default: none."""
        return {}

    # -- registration checks -------------------------------------------------------------
    @classmethod
    def implements(cls, hook: str) -> bool:
        """True when this class overrides the declared default of ``hook``."""
        owners = [c for c in cls.__mro__ if hook in vars(c)]
        return bool(owners) and owners[0] is not owners[-1]

    @classmethod
    def problems(cls) -> list[str]:
        """What makes this class unusable as a plugin, one short phrase each (empty: none).

        A kind or plugin base adds its own checks by extending this list."""
        found = [f"does not define {name}()" for name in cls.required_methods
                 if not cls.implements(name)]
        return found + near_misses(cls, Plugin)

    @classmethod
    def problems_among(cls, peers: dict) -> list[str]:
        """Problems that show only beside the other registered plugins of its kind
        (``peers``: name → class), checked once every plugin is registered. Default: none."""
        return []


def declared_names(classes) -> set[str]:
    """Public names that qpeft's own classes among ``classes`` declare."""
    return {n for c in classes if c.__module__.startswith("qpeft.")
            for n in vars(c) if not n.startswith("_")}


def near_misses(cls: type, base: type) -> list[str]:
    """Names ``cls`` (or a class between it and ``base``) defines that are a near miss of a
    name its qpeft ancestors declare (``finish_inits`` for ``finish_init``): a misspelled
    hook would never run."""
    found = []
    for c in cls.__mro__:
        if c is base or not issubclass(c, base) or c.__module__.startswith("qpeft.core"):
            continue
        declared = declared_names(c.__mro__[1:])
        for name in vars(c):
            near = difflib.get_close_matches(name, declared, n=1, cutoff=0.85)
            if near and not name.startswith("_") and name not in declared:
                found.append(f"defines '{name}', which nothing calls; did you mean '{near[0]}'?")
    return found
