"""Low-rank adaptation — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

The low-rank core every LoRA-family method builds on (the built-in ``lora``, ``dora`` and
``qdylora`` plugins use it exactly as a third-party method would)::

    x ──▶ base (quantized, frozen) ─────────────────────┐
    │                                                    (+)──▶ h = Ŵx + s·B·A·dropout(x)   (§4.1, Eq. 3)
    └──▶ dropout ──▶ A (r×in) ──▶ B (out×r) ──▶ ·s ──────┘

A is Kaiming-uniform (a=√5, as PEFT), B is zero, so the adapted model starts equal to the
base model; s = α/r. The pieces a variant may replace:

- **slots** filled by modifier plugins (see :class:`ScalingModifier`, :class:`InitModifier`):
  ``"scaling"`` (rsLoRA: α/√r), ``"init"`` (LoftQ, OLoRA: A, B and possibly the base weight)
  and ``"connection"`` (IR-QLoRA's IEC: a linear map folded into the A, B in use);
- **methods of** :class:`LoRALinear` overridden by subclassing methods (DoRA, QDyLoRA):
  ``forward``, ``low_rank`` (the A, B, s in use), ``lora_delta``, ``merged_weight``,
  ``finish_init``, ``base_changed``, ``adapter_tensors``.

Everything here reaches the frozen weight only through the QuantizedLinear contract
(``matmul``, ``dequantize``, ``set_weight``), so it works over any quantizer.
"""
import dataclasses
import math
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from qpeft.core.kinds import peft_format
from qpeft.core.kinds.adapter import Adapter
from qpeft.core.kinds.adapter_layers import ALL_LINEAR, AdapterLayer, adapter_layers, layer_device
from qpeft.core.kinds.adapter_method import AdapterMethod
from qpeft.core.base.errors import QpeftError
from qpeft.core.base.options import option
from qpeft.core.plugin.base import near_misses
from qpeft.core.kinds.quantizer import DTYPES, QuantizedLinear


# -- the slot protocol -------------------------------------------------------------------
class ScalingModifier(Protocol):
    """What a modifier with ``modifies = "scaling"`` provides."""

    def scaling(self, r: int, alpha: float) -> float:
        """The factor s multiplying B·A for rank ``r`` (LoRA: α/r)."""


class InitModifier(Protocol):
    """What a modifier with ``modifies = "init"`` provides.

    ``initialize`` runs once per layer at attach time, after the default initialisation
    and before the method's own :meth:`LoRALinear.finish_init` (DoRA's magnitude). It may
    overwrite ``layer.lora_A``/``layer.lora_B`` and rewrite the frozen weight with
    ``layer.set_base_weight(W)`` (never ``layer.base.set_weight``, so cached statistics
    follow). It must be deterministic: loading a saved adapter runs it again.
    """

    def initialize(self, layer: "LoRALinear", scaling: float) -> None:
        """Set the initial A, B (and possibly the base weight) of ``layer``."""


class ConnectionModifier(Protocol):
    """What a modifier with ``modifies = "connection"`` provides (IEC, IR-QLoRA §3.2).

    A linear map around the low-rank pair that folds into an equivalent pair of the same rank.
    ``connect`` runs once per layer at attach, before the init modifier, and returns a module
    the layer keeps as ``layer.connection`` (its parameters train beside A and B). That module
    has ``fold(A, B, s) -> (A', B', s')``, the pair the layer then computes with — forward,
    merge and save (a saved adapter is a plain LoRA of the folded pair, so PEFT loads it) — and
    ``reset()``, after which ``fold`` is the identity: loading a saved pair calls it.
    """

    def connect(self, layer: "LoRALinear") -> nn.Module:
        """The connection module of ``layer``."""



class LoRALinear(AdapterLayer):
    """``h = base(x) + s·B·A·dropout(x)`` (Hu et al. 2021, §4.1, Eq. 3).

    A (r×in) and B (out×r) are held in ``dtype`` (float32 by default); the input is cast
    to it for the low-rank path and the result cast back to the base's compute dtype.
    """

    resizable: ClassVar[bool] = True   # False: the method owns the rank (QDyLoRA), set_rank refuses

    def __init__(self, base: QuantizedLinear, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        device = layer_device(base)
        self.base, self.r, self.scaling = base, r, scaling
        self.lora_alpha = scaling * r                  # LowRankMethod.wrap sets the option's α
        self.scale_for = lambda rank, alpha: alpha / rank   # … and the method's rule (α, r) → s
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base_rewritten = False
        self.connection: nn.Module | None = None   # a "connection" modifier's module (ConnectionModifier)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """A Kaiming-uniform with a=√5 (PEFT's default), B zero: the update starts at 0 (§4.1)."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    # -- hooks for init modifiers and subclasses -------------------------------------
    def set_base_weight(self, weight: torch.Tensor) -> None:
        """Re-quantize the frozen weight (LoftQ, OLoRA) and refresh what depends on it."""
        self.base.set_weight(weight)
        self.base_rewritten = True
        self.base_changed()

    def base_changed(self) -> None:
        """Called after the frozen weight changed; DoRA recomputes its cached row norms."""

    def set_rank(self, r: int, alpha: float) -> None:
        """Give this layer rank ``r`` (0: no update) and α ``alpha``: new zero A (r×in) and
        B (out×r), scaling from the method's rule for (r, α). A data-driven init that
        redistributes ranks across layers (EVA) calls it before the optimizer is built, then
        sets A; save writes the ranks as PEFT's ``rank_pattern``/``alpha_pattern``."""
        if not self.resizable:
            raise QpeftError(f"a {type(self).__name__} sets its own rank; a rank pattern cannot be "
                             "applied to it (e.g. use eva:rho=1)")
        a, b = self.lora_A, self.lora_B
        self.lora_A = nn.Parameter(a.new_zeros(r, a.shape[1]), requires_grad=a.requires_grad)
        self.lora_B = nn.Parameter(b.new_zeros(b.shape[0], r), requires_grad=b.requires_grad)
        self.r, self.lora_alpha = r, alpha
        self.scaling = self.scale_for(r, alpha) if r else 0.0

    def finish_init(self) -> None:
        """Called once after the init modifier ran; DoRA sets its magnitude here."""

    # -- forward -------------------------------------------------------------------
    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` in use: the update is ``s·B·A`` (QDyLoRA returns a rank slice), folded
        through the connection if one is attached."""
        pair = self.lora_A, self.lora_B, self.scaling
        return pair if self.connection is None else self.connection.fold(*pair)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·B·A·x`` in the adapter dtype (``x`` already dropped out)."""
        return low_rank_update(x, *self.low_rank())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(self.base(x), self.dropout(x), *self.low_rank())

    # -- merge and save ------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as a float32 (out×in) tensor, from :meth:`low_rank` (so a layer that
        overrides only ``low_rank`` merges what it computes)."""
        a, b, s = self.low_rank()
        return (b.detach().float() @ a.detach().float()) * s

    def merged_weight(self) -> torch.Tensor:
        """``Ŵ + s·B·A`` (Hu et al. 2021, §4.2: no inference latency once merged)."""
        return self.base.dequantize().to(self.lora_A.device) + self.delta_weight()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        a, b = (self.lora_A, self.lora_B) if self.connection is None else self.low_rank()[:2]
        return {"lora_A.weight": a, "lora_B.weight": b}

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """A saved pair has the connection folded in: it is loaded into A, B and the
        connection reset, which computes the same."""
        connection = self.connection
        if connection is None:
            return super().load_adapter_tensors(tensors)
        connection.reset()
        self.connection = None
        try:
            super().load_adapter_tensors(tensors)
        finally:
            self.connection = connection

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def low_rank_update(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, s: float) -> torch.Tensor:
    """``s·(x·Aᵀ)·Bᵀ`` (Hu et al. 2021, Eq. 3's second term) in the adapter dtype, the scale
    applied on the r-wide side."""
    return ((x.to(a.dtype) @ a.t()) * s) @ b.t()


def add_low_rank(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 s: float) -> torch.Tensor:
    """``out + s·(x·Aᵀ)·Bᵀ`` (Eq. 3's sum), written into ``out``: the base layer's fresh
    output (the QuantizedLinear contract). Where ``out`` is in the adapter dtype the scale
    and the sum ride inside one in-place GEMM (``addmm_``: C ← C + s·P·Bᵀ), so the out-wide
    update is never a tensor of its own and no elementwise pass reads it back."""
    if not a.shape[0]:           # rank 0: a layer EVA (or AdaLoRA) left without an update
        return out
    if out.dtype != b.dtype or not out.is_contiguous():
        return out + low_rank_update(x, a, b, s).to(out.dtype)
    z = x.to(a.dtype) @ a.t()    # bf16 under CUDA autocast, which leaves in-place addmm_ alone
    out.view(-1, out.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]).to(out.dtype), b.t(), alpha=s)
    return out


# -- the method --------------------------------------------------------------------------
@dataclasses.dataclass
class LowRankOptions:
    """Options every low-rank method shares (LoRA, DoRA, QDyLoRA, ResLoRA, …)."""

    alpha: float = option(32.0, "α: the update is scaled by α/r, or as the scaling modifier says")
    dropout: float = option(0.05, "dropout on the input of the low-rank path")
    targets: list[str] = option([ALL_LINEAR], "layer-name suffixes to adapt (q_proj,v_proj,…); "
                                "all-linear: every quantized layer but the output projection")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "dtype of the adapter weights")

    def __post_init__(self):
        if self.alpha <= 0:
            raise ValueError(f"alpha must be positive, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not self.targets:
            raise ValueError("targets is empty; name layers such as q_proj,v_proj or use all-linear")


@dataclasses.dataclass
class LoRAOptions(LowRankOptions):
    """Options of LoRA and of the methods built on it."""

    r: int = option(16, "rank r of the update B·A (Hu et al. 2021, §4.1)")

    def __post_init__(self):
        if self.r < 1:
            raise ValueError(f"r must be at least 1, got {self.r}")
        super().__post_init__()



class LowRankMethod(AdapterMethod):
    """A LoRA-family method: a subclass gives ``name`` and ``description`` and may replace
    ``layer_cls``, ``Options``, ``make_layer`` or ``peft_config`` (LoRA, DoRA, QDyLoRA)."""

    slots = {"scaling": ScalingModifier, "init": InitModifier,   # slot -> what fills it
             "connection": ConnectionModifier}
    Options = LoRAOptions
    layer_cls: ClassVar[type[LoRALinear]] = LoRALinear
    peft_type = "LORA"

    @classmethod
    def problems(cls) -> list[str]:
        """Adapter's checks, plus: ``layer_cls`` is a LoRALinear with no misspelled hook."""
        if not (isinstance(cls.layer_cls, type) and issubclass(cls.layer_cls, LoRALinear)):
            return [*super().problems(), f"has layer_cls={cls.layer_cls!r}, not a LoRALinear subclass"]
        return [*super().problems(), *(f"{cls.layer_cls.__name__} {p}"
                                       for p in near_misses(cls.layer_cls, LoRALinear))]

    @property
    def rank(self) -> int:
        """The rank of the A and B tensors each layer holds."""
        return self.options.r

    def scaling(self, modifiers: list[Adapter], r: int | None = None, alpha: float | None = None) -> float:
        """s for rank ``r`` and ``alpha`` (default: the options'): the "scaling" modifier's
        rule, else α/r (§4.1)."""
        r = self.rank if r is None else r
        alpha = self.options.alpha if alpha is None else alpha
        rule = _filling(modifiers, "scaling")
        return rule.scaling(r, alpha) if rule else alpha / r

    def make_layer(self, base: QuantizedLinear, modifiers: list[Adapter]) -> LoRALinear:
        """The adapter layer wrapping ``base`` (subclasses pass extra arguments here)."""
        return self.layer_cls(base, self.rank, self.scaling(modifiers), self.options.dropout,
                              DTYPES[self.options.dtype])

    def wrap(self, name: str, base: QuantizedLinear, modifiers: list[Adapter]) -> LoRALinear:
        """:meth:`make_layer`, then the init modifier (if any), then the layer's ``finish_init``."""
        layer, init = self.make_layer(base, modifiers), _filling(modifiers, "init")
        layer.lora_alpha, modifiers = self.options.alpha, list(modifiers)
        layer.scale_for = lambda r, alpha: self.scaling(modifiers, r, alpha)
        connection = _filling(modifiers, "connection")
        if connection is not None:
            layer.connection = connection.connect(layer)
        if init is not None:
            init.initialize(layer, layer.scaling)
        layer.finish_init()
        if init is None or not getattr(init, "calibration_batches", lambda: 0)():   # a calibrating init drops it once applied
            base.source_weight = None   # the full-precision copy kept for the init modifier, if any
        return layer

    def peft_config(self, model: nn.Module) -> dict:
        """LoRA's ``adapter_config.json`` fields; each modifier adds its own through
        ``update_peft_config(config)`` (rsLoRA sets ``use_rslora``)."""
        layers = adapter_layers(model)
        kept = {name for name, layer in layers.items() if getattr(layer, "r", 1)}   # rank 0: no update
        config = {"peft_type": self.peft_type, "r": self.rank, "lora_alpha": self.options.alpha,
                  "lora_dropout": self.options.dropout, "use_rslora": False, "use_dora": False,
                  "init_lora_weights": True, "target_modules": peft_format.target_modules(model, kept)}
        ranks = {name: layers[name].r for name in sorted(kept) if getattr(layers[name], "r", self.rank) != self.rank}
        alphas = {name: layers[name].lora_alpha for name in sorted(kept)
                  if getattr(layers[name], "lora_alpha", self.options.alpha) != self.options.alpha}
        if ranks or alphas:   # per-layer ranks (EVA's redistribution), as PEFT writes them
            config.update(rank_pattern=ranks, alpha_pattern=alphas)
        for modifier in self.modifiers:
            modifier.update_peft_config(config)
        return config


def low_rank_values(config: dict) -> dict:
    """``r``, ``alpha``, ``dropout`` and ``targets`` from a PEFT LoRA config (PEFT's defaults
    where a field is absent: r=8, lora_alpha=8, lora_dropout=0)."""
    return {"r": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout") or 0.0, "targets": config["target_modules"]}


def _filling(modifiers: list[Adapter], slot: str):
    return next((m for m in modifiers if m.modifies == slot), None)

