"""AdaLoRA — Zhang et al. 2023, "Adaptive Budget Allocation for Parameter-Efficient
Fine-Tuning" (ICLR 2023, arXiv:2303.10512).

Each adapted layer holds its update in SVD form (§3.1, Eq. 3) and a shared rank budget is
moved, during training, to the layers whose singular triplets matter most::

    h = base(x) + s · P · Λ · Q · dropout(x)       P: out×r (lora_B), Λ: r×1 (lora_E), Q: r×in (lora_A)
    s = α / (init_r + 1e-5)                         (as PEFT: the initial rank, never the pruned one)

- **Orthogonality** (Eq. 4): ``R = mean over P and Q of ‖PᵀP − I‖_F, ‖QQᵀ − I‖_F`` is added
  to the task loss, weighted ``orth_reg_weight`` (the ``extra_loss`` hook; logged as
  ``loss/adalora``).
- **Importance** (§3.2, Eqs. 8–11): for every entry w of P, Λ, Q, the sensitivity
  ``I = |w · ∂L/∂w|``, smoothed ``Ī ← β1·Ī + (1−β1)·I`` and its uncertainty
  ``Ū ← β2·Ū + (1−β2)·|I − Ī|``; a triplet i scores ``S_i = s(λ_i) + mean_j s(Q_ij) +
  mean_k s(P_ki)`` with ``s = Ī·Ū``.
- **Budget** (§3.3, Eq. 12): ``b(t)`` falls cubically from ``init_r × layers`` to
  ``target_r × layers`` between step ``tinit`` and step ``T − tfinal``; every ``delta_t``
  steps the λ of every triplet scoring at or below the ``(b(0) − b(t))``-th smallest score
  is set to 0. From ``T − tfinal`` on the ranks are fixed (the last mask is re-applied each step).

The order within a step follows PEFT 0.21's ``update_and_allocate`` (called after the
optimizer step, before ``zero_grad``): the gradients are taken in ``on_gradients`` (after
accumulation, the all-reduce and clipping, so every process scores alike) and the scores and
masks computed in ``on_step_end`` with the weights the optimizer just wrote. ``T`` is the
run's own step count (``TrainFacts.total_steps``): nobody types ``total_step``.

A saved adapter is PEFT's ADALORA format: only each layer's kept triplets, and
``rank_pattern`` saying which they were, so ``PeftModel.from_pretrained`` loads it.
"""
import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from qpeft import (LoRALinear, LowRankMethod, LowRankOptions, QpeftError, TensorShapeError, adapter_layers,
                   hookimpl, option, peft_format)

EPS = 1e-5   # PEFT's ranknum + 1e-5


class SVDLinear(LoRALinear):
    """``h = base(x) + s·P·(Λ ⊙ Q)·dropout(x)`` (Zhang et al. 2023, Eq. 3). ``lora_A`` is Q,
    ``lora_B`` is P, ``lora_E`` the singular values Λ (r×1); ``kept`` marks the triplets the
    budget leaves (a pruned one has λ = 0)."""

    resizable = False   # the method owns the rank

    def __init__(self, base, r: int, scaling: float, dropout: float = 0.0, dtype: torch.dtype = torch.float32):
        super().__init__(base, r, scaling, dropout, dtype)
        self.lora_E = nn.Parameter(torch.zeros(r, 1, device=self.lora_A.device, dtype=dtype))
        self.register_buffer("kept", torch.ones(r, dtype=torch.bool, device=self.lora_A.device), persistent=False)

    def reset_parameters(self) -> None:
        """P, Q ~ N(0, 0.02²) and Λ = 0 (PEFT's AdaLoRA init), so the update starts at 0."""
        nn.init.normal_(self.lora_A, mean=0.0, std=0.02)
        nn.init.normal_(self.lora_B, mean=0.0, std=0.02)

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        return self.lora_A * self.lora_E, self.lora_B, self.scaling

    @torch.no_grad()
    def apply_mask(self) -> None:
        """λ_i = 0 for every pruned triplet."""
        self.lora_E.masked_fill_(~self.kept[:, None], 0.0)

    @property
    def rank(self) -> int:
        """Triplets kept."""
        return int(self.kept.sum())

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The kept triplets only, as PEFT saves an AdaLoRA adapter with a ``rank_pattern``."""
        kept = self.kept
        if bool(kept.all()):
            return {"lora_A": self.lora_A, "lora_B": self.lora_B, "lora_E": self.lora_E}
        return {"lora_A": self.lora_A[kept], "lora_B": self.lora_B[:, kept], "lora_E": self.lora_E[kept]}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Saved triplets into the slots ``kept`` marks (set from ``rank_pattern`` by the
        method's ``load``; else the first k slots); the other λ are 0."""
        missing = sorted({"lora_A", "lora_B", "lora_E"} - set(tensors))
        if missing:
            raise QpeftError(f"saved adapter lacks {', '.join(missing)} for an {type(self).__name__}")
        k = tensors["lora_E"].shape[0]
        expected = {"lora_A": (k, self.base.in_features), "lora_B": (self.base.out_features, k), "lora_E": (k, 1)}
        for key, shape in expected.items():
            if k > self.r or tuple(tensors[key].shape) != shape:
                raise TensorShapeError(f"{key} is {list(tensors[key].shape)}, but this model's layer needs "
                                       f"{list(shape)} with a rank of at most {self.r}")
        if int(self.kept.sum()) != k:
            self.kept.zero_()
            self.kept[:k] = True
        with torch.no_grad():
            self.lora_E.zero_()
            self.lora_E[self.kept] = tensors["lora_E"].to(self.lora_E.dtype)
            self.lora_A[self.kept] = tensors["lora_A"].to(self.lora_A.dtype)
            self.lora_B[:, self.kept] = tensors["lora_B"].to(self.lora_B.dtype)

    def extra_repr(self) -> str:
        return f"init_r={self.r}, kept={self.rank}, scaling={self.scaling:g}"


@dataclasses.dataclass
class AdaLoRAOptions(LowRankOptions):
    """LoRA's shared options (s = α/init_r) plus the budget schedule (PEFT's AdaLoraConfig names)."""

    init_r: int = option(12, "rank every layer starts with (AdaLoRA §3.3)")
    target_r: int = option(8, "average rank per layer the budget ends at")
    tinit: int = option(-1, "steps trained at the full budget before pruning starts; -1: a tenth of the run")
    tfinal: int = option(-1, "last steps trained at the final ranks; -1: a fifth of the run")
    delta_t: int = option(1, "steps between two budget allocations (PEFT's deltaT)")
    beta1: float = option(0.85, "EMA factor of the sensitivity (Eq. 9)")
    beta2: float = option(0.85, "EMA factor of the uncertainty (Eq. 10)")
    orth_reg_weight: float = option(0.5, "weight of the orthogonality regulariser (Eq. 4)")

    def __post_init__(self):
        if not 1 <= self.target_r <= self.init_r:
            raise ValueError(f"need 1 ≤ target_r ≤ init_r, got target_r={self.target_r}, init_r={self.init_r}")
        if not (0 < self.beta1 < 1 and 0 < self.beta2 < 1):
            raise ValueError(f"beta1 and beta2 must be in (0, 1), got {self.beta1}, {self.beta2}")
        if self.orth_reg_weight < 0:
            raise ValueError(f"orth_reg_weight must be ≥ 0, got {self.orth_reg_weight}")
        if self.delta_t < 1 or self.tinit < -1 or self.tfinal < -1:
            raise ValueError("delta_t must be ≥ 1, tinit and tfinal ≥ 0 (or -1 for the default share of the run)")
        super().__post_init__()


class AdaLoRA(LowRankMethod):
    name = "adalora"
    description = "AdaLoRA: SVD-form LoRA whose rank budget moves to the layers that matter (Zhang et al. 2023)"
    Options = AdaLoRAOptions
    layer_cls = SVDLinear
    slots: dict = {}            # no scaling or init modifier: Λ·Q·P has its own init and scale
    peft_type = "ADALORA"
    # Λ starts at 0 and P, Q at 0.02: the first updates are ~1e-6 of W, far under half a bf16
    # ulp of an activation, so a bf16 stream rounds them away (the kit measured c = −1.0 over hqq)
    needs_float32_activations = True

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self.total = self.start = self.end = 0          # T, tinit, T - tfinal (set at on_train_begin)
        self.ipt: dict[str, torch.Tensor] = {}          # Ī per tensor (Eq. 9)
        self.unc: dict[str, torch.Tensor] = {}          # Ū per tensor (Eq. 10)
        self.grads: dict[str, torch.Tensor] = {}        # this step's gradients, taken in on_gradients
        self.layers: dict = {}                          # the layers attach made (masks are training state)

    @property
    def rank(self) -> int:
        return self.options.init_r

    def scaling(self, modifiers, r: int | None = None) -> float:
        return self.options.alpha / (self.options.init_r + EPS)

    # -- the schedule (§3.3) -------------------------------------------------------------
    def on_train_begin(self, model, facts) -> None:
        o = self.options
        self.total = facts.total_steps
        self.start = o.tinit if o.tinit >= 0 else facts.total_steps // 10
        tfinal = o.tfinal if o.tfinal >= 0 else facts.total_steps // 5
        self.end = facts.total_steps - tfinal
        if self.start >= self.end:
            raise QpeftError(f"adapter 'adalora': tinit={self.start} and tfinal={tfinal} leave no step to prune "
                             f"ranks in a run of {facts.total_steps} steps; lower them or train longer")

    def budget(self, step: int, layers: int) -> tuple[int, bool]:
        """``(b(t), mask now?)`` — PEFT's ``budget_schedule``: b(0) until ``tinit``, then
        ``b_T + (b(0) − b_T)·(1 − (t − tinit)/(T − tfinal − tinit))³``."""
        initial, target = self.options.init_r * layers, self.options.target_r * layers
        if step <= self.start:
            return initial, False
        if step > self.end:
            return target, True
        left = 1 - (step - self.start) / (self.end - self.start)
        return int((initial - target) * left ** 3 + target), step % self.options.delta_t == 0

    def extra_loss(self, model, step: int):
        """``orth_reg_weight · R`` (Eq. 4), R averaged over every P and Q as PEFT does."""
        if self.options.orth_reg_weight == 0:
            return None
        terms = []
        for layer in self.layers.values():
            for gram in (layer.lora_A @ layer.lora_A.t(), layer.lora_B.t() @ layer.lora_B):
                eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
                terms.append(torch.linalg.matrix_norm(gram - eye))
        return self.options.orth_reg_weight * torch.stack(terms).mean() if terms else None

    def on_gradients(self, model, step: int) -> None:
        """Keep this step's gradients of P, Λ, Q for the scores (before T − tfinal)."""
        if step < self.end:
            self.grads = {key: p.grad.detach().clone() for key, p in self.tensors().items()
                          if p.grad is not None}

    @torch.no_grad()
    def on_step_end(self, model, step: int) -> None:
        """PEFT's ``update_and_allocate(step)``: update the scores; prune to b(t) when due;
        at ``T − tfinal`` the final allocation; after it, the final mask re-applied."""
        layers = self.layers
        if step < self.end:
            self.update_scores()
            budget, due = self.budget(step, len(layers))
            if due:
                self.mask_to_budget(layers, budget)
        elif step == self.end:
            self.mask_to_budget(layers, self.budget(step, len(layers))[0])
            self.ipt, self.unc = {}, {}
        else:
            for layer in layers.values():
                layer.apply_mask()

    def on_train_end(self, model, facts) -> None:
        """The saved adapter is the trained one: λ of pruned triplets back to 0 (they may have
        regrown since the last allocation when ``delta_t`` > 1)."""
        for layer in self.layers.values():
            layer.apply_mask()

    def tensors(self) -> dict[str, torch.Tensor]:
        """P, Λ, Q of every layer, keyed ``<layer>.lora_A`` …"""
        return {f"{name}.{key}": getattr(layer, key) for name, layer in self.layers.items()
                for key in ("lora_A", "lora_B", "lora_E")}

    def update_scores(self) -> None:
        """Ī and Ū of every entry (Eqs. 8–10) from ``|w · grad|``."""
        b1, b2 = self.options.beta1, self.options.beta2
        for key, p in self.tensors().items():
            if key not in self.grads:
                continue
            sensitivity = (p * self.grads[key]).abs()
            ipt = self.ipt.get(key, torch.zeros_like(p))
            unc = self.unc.get(key, torch.zeros_like(p))
            self.ipt[key] = b1 * ipt + (1 - b1) * sensitivity
            self.unc[key] = b2 * unc + (1 - b2) * (sensitivity - self.ipt[key]).abs()
        self.grads = {}

    def triplet_scores(self, name: str) -> torch.Tensor:
        """S_i = s(λ_i) + (mean_j s(Q_ij) + mean_k s(P_ki)) with s = Ī·Ū (Eq. 11)."""
        score = {k: self.ipt[f"{name}.{k}"] * self.unc[f"{name}.{k}"] for k in ("lora_A", "lora_B", "lora_E")}
        return score["lora_E"].view(-1) + (score["lora_A"].mean(dim=1) + score["lora_B"].mean(dim=0))

    def mask_to_budget(self, layers: dict, budget: int) -> None:
        """Prune every triplet scoring ≤ the (b(0) − budget)-th smallest score (PEFT's ``mask_to_budget``)."""
        if any(f"{name}.lora_E" not in self.ipt for name in layers):
            return                                   # no gradient seen yet
        scores = {name: self.triplet_scores(name) for name in layers}
        k = sum(layer.r for layer in layers.values()) - budget
        if k <= 0:
            return
        threshold = torch.kthvalue(torch.cat(list(scores.values())), k=k)[0].item()
        for name, layer in layers.items():
            layer.kept.copy_(scores[name] > threshold)
            layer.apply_mask()

    # -- training state in checkpoints ---------------------------------------------------
    def attach(self, model, modifiers) -> None:
        super().attach(model, modifiers)
        self.layers = adapter_layers(model)

    def state_dict(self) -> dict:
        """Ī, Ū and each layer's kept triplets: a resumed run prunes as an uninterrupted one."""
        kept = {name: layer.kept.clone() for name, layer in self.layers.items()}
        return {"ipt": dict(self.ipt), "unc": dict(self.unc), "kept": kept}

    def load_state_dict(self, state: dict) -> None:
        self.ipt, self.unc = dict(state["ipt"]), dict(state["unc"])
        for name, kept in state["kept"].items():
            self.layers[name].kept.copy_(kept.bool())

    # -- save and load (PEFT's ADALORA format) -------------------------------------------
    def peft_config(self, model) -> dict:
        o, layers = self.options, adapter_layers(model)
        pruned = any(not bool(layer.kept.all()) for layer in layers.values())
        total = self.total or (max(o.tinit, 0) + max(o.tfinal, 0) + 1)
        config = {"peft_type": "ADALORA", "init_r": o.init_r, "target_r": o.target_r, "lora_alpha": o.alpha,
                  "lora_dropout": o.dropout, "tinit": self.start if self.total else max(o.tinit, 0),
                  "tfinal": self.total - self.end if self.total else max(o.tfinal, 0), "deltaT": o.delta_t,
                  "beta1": o.beta1, "beta2": o.beta2, "orth_reg_weight": o.orth_reg_weight, "total_step": total,
                  "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                  "target_modules": peft_format.target_modules(model),
                  "rank_pattern": {f"{name}.lora_E": layer.kept.tolist() for name, layer in layers.items()}
                  if pruned else None}
        return config

    def load(self, model, directory) -> None:
        """Attach, mark each layer's kept triplets from ``rank_pattern``, load the tensors into them."""
        if not adapter_layers(model):
            self.attach(model, [])
        pattern = json.loads((Path(directory) / peft_format.CONFIG).read_text()).get("rank_pattern") or {}
        for name, layer in adapter_layers(model).items():
            kept = pattern.get(f"{name}.lora_E")
            if kept is not None and len(kept) == layer.r:
                layer.kept.copy_(torch.tensor(kept, dtype=torch.bool))
        peft_format.load_tensors(model, directory)

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Options for a PEFT AdaLoRA adapter (its schedule is kept, for a later resume of training)."""
        if config.get("peft_type") != "ADALORA":
            return None
        for known in ("rank_pattern", "total_step", "r"):   # read, so the import accepts them: rank_pattern
            config.get(known)                               # is applied by load; T and r are not options
        return {"init_r": config.get("init_r", 12), "target_r": config.get("target_r", 8),
                "alpha": config.get("lora_alpha", 8), "dropout": config.get("lora_dropout") or 0.0,
                "targets": config["target_modules"], "tinit": config.get("tinit", 0),
                "tfinal": config.get("tfinal", 0), "delta_t": config.get("deltaT", 1),
                "beta1": config.get("beta1", 0.85), "beta2": config.get("beta2", 0.85),
                "orth_reg_weight": config.get("orth_reg_weight", 0.5)}

    def report_facts(self, model) -> dict:
        """The final rank of every layer (the budget's allocation, §3.3)."""
        ranks = {name: layer.rank for name, layer in adapter_layers(model).items()}
        values = list(ranks.values()) or [0]
        return {"ranks_total": sum(values), "rank_mean": round(sum(values) / len(values), 2),
                "rank_min": min(values), "rank_max": max(values), "ranks": ranks}


@hookimpl
def register_adapters(register):
    register(AdaLoRA)
