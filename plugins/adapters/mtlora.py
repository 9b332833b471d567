"""MTLoRA — Agiza, Neseem, Reda 2024, "MTLoRA: Low-Rank Adaptation Approach for Efficient
Multi-Task Learning" (CVPR 2024, arXiv:2403.20320).

Each adapted layer holds one task-agnostic low-rank update shared by every task and one
task-specific low-rank update per task (§3.2, the TA-LoRA and TS-LoRA modules), routed by
the task of each row of the batch::

    h = Ŵx + s·B·A·d(x) + s_t·B_t·A_t·d(x)       A: r×in, B: out×r (shared); A_t: r_t×in, B_t: out×r_t
    s = α/r,  s_t = α/r_t,  d: one dropout sample for both paths

Training sums the per-task losses, ``L = Σ_t w_t·L_t`` (Algorithm 2): run with
``--task-sampling per-task`` (and ``--task-weights``) so that every step holds a mini-batch
of each task. A row without a task (or of a task it was not trained on) gets the shared
update alone.

Public hooks only: ``on_data`` learns the data's task names before attach (the default of
``tasks``; the resolved names are the option's value, so the saved adapter and the run's
record hold them and ``qpeft eval`` needs no data), ``on_batch`` routes each row, and
``select_task`` fixes one task for ``qpeft eval --task`` and ``qpeft export --task``.

For task t the update is one LoRA of rank r + r_t: ``A' = [s·A; s_t·A_t]``, ``B' = [B, B_t]``,
scale 1 — what ``qpeft export --task t`` writes, a PEFT LoRA adapter (``lora_alpha = r``).
"""
import dataclasses

import torch
from torch import nn

import qpeft
from qpeft import (LoRALinear, LowRankMethod, LowRankOptions, QpeftError, ScalingModifier, adapter_layers,
                   add_low_rank, hookimpl, option, peft_format)


class MTLoRALinear(LoRALinear):
    """The shared ``s·B·A`` (``lora_A``, ``lora_B``) plus ``s_t·B_t·A_t`` per task (``task_A[i]``,
    ``task_B[i]``, i the task's index). ``route``: None (shared only), an index (every row),
    or a tuple of indices (None: shared only), one per row."""

    def __init__(self, base, r: int, scaling: float, dropout: float = 0.0, dtype: torch.dtype = torch.float32,
                 tasks: tuple = (), task_r: int = 4, task_scaling: float = 1.0):
        super().__init__(base, r, scaling, dropout, dtype)
        self.tasks, self.task_r, self.task_scaling = tuple(tasks), task_r, task_scaling
        device = self.lora_A.device
        self.task_A = nn.ParameterList([nn.Parameter(torch.empty(task_r, base.in_features, device=device, dtype=dtype))
                                        for _ in self.tasks])
        self.task_B = nn.ParameterList([nn.Parameter(torch.zeros(base.out_features, task_r, device=device, dtype=dtype))
                                        for _ in self.tasks])
        for a in self.task_A:        # as LoRA's A (Kaiming-uniform, a=√5); B_t = 0: starts at the base
            nn.init.kaiming_uniform_(a, a=5 ** 0.5)
        self.route = None
        self.selected = None         # a task index fixed by select_task (export writes it folded)

    def folded(self, i: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Task i's whole update as one LoRA of rank r + r_t: ``([s·A; s_t·A_t], [B, B_t], 1)``."""
        a = torch.cat([self.lora_A * self.scaling, self.task_A[i] * self.task_scaling])
        return a, torch.cat([self.lora_B, self.task_B[i]], dim=1), 1.0

    def low_rank(self):
        """The update in use: the shared one, or task ``route``'s folded in (merge, export)."""
        if self.route is None:
            return self.lora_A, self.lora_B, self.scaling
        if isinstance(self.route, int):
            return self.folded(self.route)
        raise QpeftError("an MTLoRA layer routed row by row has no single update; select one task "
                         "(qpeft eval/export --task NAME) to merge or export it")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(self.route, tuple):
            return add_low_rank(self.base(x), self.dropout(x), *self.low_rank())
        if len(self.route) != x.shape[0]:
            raise QpeftError(f"MTLoRA was told the tasks of {len(self.route)} rows, but the batch has {x.shape[0]}")
        d = self.dropout(x)
        out = add_low_rank(self.base(x), d, self.lora_A, self.lora_B, self.scaling)
        for i in sorted({t for t in self.route if t is not None}):
            rows = torch.tensor([r for r, t in enumerate(self.route) if t == i], device=x.device)
            a, b = self.task_A[i], self.task_B[i]
            update = ((d.index_select(0, rows).to(a.dtype) @ a.t()) * self.task_scaling) @ b.t()
            out = out.index_add(0, rows, update.to(out.dtype))
        return out

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The shared A, B and each task's under ``task_A.<task>``; task ``selected``'s folded
        update alone, as LoRA's ``lora_A.weight``/``lora_B.weight``, when one is selected."""
        if self.selected is not None:
            a, b, _ = self.folded(self.selected)
            return {"lora_A.weight": a, "lora_B.weight": b}
        out = {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}
        for i, task in enumerate(self.tasks):
            out[f"task_A.{task}"], out[f"task_B.{task}"] = self.task_A[i], self.task_B[i]
        return out

    def extra_repr(self) -> str:
        return f"r={self.r}, task_r={self.task_r}, tasks={len(self.tasks)}, scaling={self.scaling:g}"


@dataclasses.dataclass
class MTLoRAOptions(LowRankOptions):
    """LoRA's shared options; ``r`` is the shared (task-agnostic) rank."""

    r: int = option(8, "rank of the task-agnostic update all tasks share (MTLoRA's TA-LoRA)")
    task_r: int = option(4, "rank of each task's own update (TS-LoRA)")
    tasks: list[str] = option([], "task names, one update each; default: the tasks of the training data")

    def __post_init__(self):
        if self.r < 1 or self.task_r < 1:
            raise ValueError(f"r and task_r must be at least 1, got r={self.r}, task_r={self.task_r}")
        if len(set(self.tasks)) != len(self.tasks) or any(not t or "," in t for t in self.tasks):
            raise ValueError(f"tasks must be distinct non-empty names, got {self.tasks}")
        super().__post_init__()


class MTLoRA(LowRankMethod):
    name = "mtlora"
    description = "MTLoRA: a shared low-rank update plus one per task, routed by the batch's task (Agiza et al. 2024)"
    Options = MTLoRAOptions
    layer_cls = MTLoRALinear
    slots = {"scaling": ScalingModifier}     # rsLoRA scales both paths (α/√r, α/√r_t)
    peft_type = "MTLORA"
    peft_note = ("PEFT has no MTLoRA: export one task as a PEFT LoRA adapter with "
                 "qpeft export RUN --task NAME --out DIR")

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self.layers: dict = {}
        self.selected: str | None = None

    # -- tasks: from the data, then per batch -----------------------------------------
    def on_data(self, facts) -> None:
        """The default ``tasks`` are the data's; given ones must cover the data's."""
        if not self.options.tasks:
            if not facts.tasks:
                raise QpeftError("adapter 'mtlora' needs training examples with a 'task' (docs/data.md), or "
                                 "the task names as mtlora:tasks=NAME,NAME")
            self.options = dataclasses.replace(self.options, tasks=list(facts.tasks))
            return
        missing = [t for t in facts.tasks if t not in self.options.tasks]
        if missing:
            raise QpeftError(f"adapter 'mtlora': the data has task '{missing[0]}', which tasks="
                             f"{','.join(self.options.tasks)} lacks; add it, or drop tasks= to take the data's")

    def index(self, task) -> int | None:
        """The index of ``task`` among the options' tasks; None for none, or one not trained."""
        return self.options.tasks.index(task) if task in self.options.tasks else None

    def on_batch(self, model, tasks, step) -> None:
        """Route every layer: one task for every row, a task per row, or none (shared only)."""
        if self.selected is not None:
            return                             # qpeft eval/export --task: fixed
        if tasks is None:
            route = None
        elif len(set(tasks)) == 1:
            route = self.index(tasks[0])
        else:
            route = tuple(self.index(t) for t in tasks)
        for layer in self.layers.values():
            layer.route = route

    def select_task(self, model, task: str) -> None:
        """Every row routed to ``task``, for good; a save then writes its folded LoRA."""
        i = self.index(task)
        if i is None:
            raise QpeftError(f"adapter 'mtlora' has no task '{task}'; its tasks: {', '.join(self.options.tasks)}")
        self.selected = task
        for layer in adapter_layers(model).values():
            layer.route, layer.selected = i, i

    # -- attach, save, load ----------------------------------------------------------
    def make_layer(self, base, modifiers) -> MTLoRALinear:
        if not self.options.tasks:
            raise QpeftError("adapter 'mtlora' has no tasks: train on examples with a 'task' (docs/data.md), "
                             "or name them: mtlora:tasks=NAME,NAME")
        o = self.options
        return MTLoRALinear(base, o.r, self.scaling(modifiers), o.dropout, qpeft.DTYPES[o.dtype],
                            tuple(o.tasks), o.task_r, self.scaling(modifiers, o.task_r))

    def attach(self, model, modifiers) -> None:
        super().attach(model, modifiers)
        self.layers = adapter_layers(model)

    def peft_config(self, model) -> dict:
        """qpeft's own config (PEFT has no MTLoRA); with a task selected, its folded PEFT LoRA."""
        o = self.options
        if self.selected is not None:
            rank = o.r + o.task_r
            return {"peft_type": "LORA", "r": rank, "lora_alpha": rank, "lora_dropout": o.dropout,
                    "use_rslora": False, "use_dora": False, "init_lora_weights": True,
                    "target_modules": peft_format.target_modules(model)}
        return {"peft_type": self.peft_type, "r": o.r, "task_r": o.task_r, "tasks": list(o.tasks),
                "lora_alpha": o.alpha, "lora_dropout": o.dropout, "target_modules": peft_format.target_modules(model)}

    def save(self, model, directory, meta: dict | None = None) -> None:
        """The adapter with every task; with a task selected, that task's folded update as
        a plain LoRA adapter (``lora:r=r+r_t:alpha=r+r_t``) that PEFT and ``qpeft eval`` load."""
        if self.selected is None:
            return super().save(model, directory, meta)
        o, rank = self.options, self.options.r + self.options.task_r
        lora = qpeft.registry.get("adapter", "lora").from_values(
            {"r": rank, "alpha": rank, "dropout": o.dropout, "targets": o.targets, "dtype": o.dtype})
        spec = f"lora:r={rank}:alpha={rank}"
        peft_format.save(model, directory, self.peft_config(model), [lora],
                         {**(meta or {}), "spec": spec, "mtlora_task": self.selected})

    def report_facts(self, model) -> dict:
        o = self.options
        return {"tasks": ",".join(o.tasks), "shared_rank": o.r, "task_rank": o.task_r}


@hookimpl
def register_adapters(register):
    register(MTLoRA)
