"""QDyLoRA — Rajabzadeh et al. 2024, "QDyLoRA: Quantized Dynamic Low-Rank Adaptation for
Efficient Large Language Model Tuning" (arXiv:2402.10462), after DyLoRA (Valipour et al. 2023,
arXiv:2210.07558).

One adapter trained for every rank at once: each step samples b ~ U{r_min … r_max} and
uses only the first b rows of A and columns of B, scaled for rank b (DyLoRA §3, Eq. 5;
QDyLoRA §3 does this over a 4-bit base)::

    h = base(x) + s(b)·B[:, :b]·A[:b]·dropout(x)       s(b) = α/b, or the scaling modifier's rule

At evaluation (``model.eval()``) and export the rank is ``eval_rank`` (default r_max), so
one training run yields adapters of any rank ≤ r_max; a saved adapter is a plain LoRA of
rank ``eval_rank``.

Rank sampling uses the training hook ``on_step_begin(step, model)``, which the trainer
calls on every plugin of a run that defines it (docs/adapters.md).
"""
import dataclasses

import torch
from torch import nn

from qpeft import LoRALinear, LowRankMethod, LowRankOptions, QpeftError, adapter_layers, hookimpl, option


class QDyLoRALinear(LoRALinear):
    """A LoRA layer that runs at the first ``b`` of its ``r_max`` ranks (DyLoRA §3)."""

    resizable = False   # the method owns the rank

    def __init__(self, base, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32, scales: list[float] | None = None):
        super().__init__(base, r, scaling, dropout, dtype)
        self.scales = scales or [scaling * r / b for b in range(1, r + 1)]  # s(b), b = 1…r
        self.train_rank = self.eval_rank = r

    @property
    def rank(self) -> int:
        """The rank in use: the sampled one in training, ``eval_rank`` otherwise."""
        return self.train_rank if self.training else self.eval_rank

    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """The first ``b`` ranks and their scale s(b)."""
        b = self.rank
        return self.lora_A[:b], self.lora_B[:, :b], self.scales[b - 1]

    def delta_weight(self) -> torch.Tensor:
        b = self.eval_rank
        return self.lora_B[:, :b].detach().float() @ self.lora_A[:b].detach().float() * self.scales[b - 1]

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """A plain LoRA of rank ``eval_rank`` (views into the full tensors)."""
        b = self.eval_rank
        return {"lora_A.weight": self.lora_A[:b], "lora_B.weight": self.lora_B[:, :b]}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.eval_rank = tensors["lora_A.weight"].shape[0]
        super().load_adapter_tensors(tensors)

    def extra_repr(self) -> str:
        return f"r_max={self.r}, eval_rank={self.eval_rank}"


@dataclasses.dataclass
class QDyLoRAOptions(LowRankOptions):
    """LoRA's shared options (α scales the update at rank b by α/b) plus the rank range."""

    r_max: int = option(16, "largest rank trained (DyLoRA §3)")
    r_min: int = option(1, "smallest rank sampled in training")
    eval_rank: int = option(0, "rank used for evaluation and export; 0: r_max")
    seed: int = option(0, "seed of the per-step rank sampling")

    def __post_init__(self):
        if not 1 <= self.r_min <= self.r_max:
            raise ValueError(f"need 1 ≤ r_min ≤ r_max, got r_min={self.r_min}, r_max={self.r_max}")
        if not 0 <= self.eval_rank <= self.r_max:
            raise ValueError(f"eval_rank must be in [0, r_max={self.r_max}], got {self.eval_rank}")
        super().__post_init__()


class QDyLoRA(LowRankMethod):
    name = "qdylora"
    description = "QDyLoRA: train every rank up to r_max at once; pick the rank after training (Rajabzadeh et al. 2024)"
    Options = QDyLoRAOptions
    layer_cls = QDyLoRALinear

    @property
    def rank(self) -> int:
        return self.options.r_max

    @property
    def eval_rank(self) -> int:
        return self.options.eval_rank or self.options.r_max

    def make_layer(self, base, modifiers) -> QDyLoRALinear:
        scales = [self.scaling(modifiers, b) for b in range(1, self.rank + 1)]
        layer = self.layer_cls(base, self.rank, scales[-1], self.options.dropout,
                               getattr(torch, self.options.dtype), scales)
        layer.eval_rank = self.eval_rank
        return layer

    def on_step_begin(self, step: int, model: nn.Module) -> None:
        """Sample this step's rank b ~ U{r_min … r_max}, the same for every layer (DyLoRA §3)."""
        gen = torch.Generator().manual_seed(self.options.seed * 1_000_003 + step)
        b = int(torch.randint(self.options.r_min, self.options.r_max + 1, (1,), generator=gen))
        set_rank(model, train=b)

    def select_rank(self, model: nn.Module, rank: int) -> None:
        """Evaluate and export at ``rank`` ≤ the saved rank (DyLoRA §3); for --rank."""
        saved = min(layer.eval_rank for layer in adapter_layers(model).values())
        if not 1 <= rank <= saved:
            raise QpeftError(f"the saved adapter has rank {saved}; pass --rank between 1 and {saved}")
        set_rank(model, eval=rank)

    def report_variants(self, model: nn.Module) -> dict:
        """Ranks the run report evaluates after training (QDyLoRA §4 reports quality per
        rank): r_min, r_max/4, r_max/2 and r_max, each as ``{"rank=b": set that rank}``."""
        o = self.options
        ranks = sorted({o.r_min, max(o.r_min, o.r_max // 4), max(o.r_min, o.r_max // 2), o.r_max})
        return {f"rank={b}": (lambda b=b: set_rank(model, eval=b)) for b in ranks}

    def peft_config(self, model: nn.Module) -> dict:
        """A plain LoRA config at the layers' evaluation rank (see :func:`set_rank`)."""
        ranks = {layer.eval_rank for layer in adapter_layers(model).values()}
        return {**super().peft_config(model), "r": max(ranks)}


def set_rank(model: nn.Module, train: int | None = None, eval: int | None = None) -> None:
    """Set the training and/or evaluation rank of every QDyLoRA layer of ``model``."""
    for layer in adapter_layers(model).values():
        if isinstance(layer, QDyLoRALinear):
            layer.train_rank = train if train is not None else layer.train_rank
            layer.eval_rank = eval if eval is not None else layer.eval_rank


@hookimpl
def register_adapters(register):
    register(QDyLoRA)
