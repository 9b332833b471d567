"""LoRA — Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (arXiv:2106.09685).

The LoRA core every low-rank method builds on, and the ``lora`` method plugin::

    x ──▶ base (quantized, frozen) ─────────────────────┐
    │                                                    (+)──▶ h = Ŵx + s·B·A·dropout(x)   (§4.1, Eq. 3)
    └──▶ dropout ──▶ A (r×in) ──▶ B (out×r) ──▶ ·s ──────┘

A is Kaiming-uniform (a=√5, as PEFT), B is zero, so the adapted model starts equal to the
base model; s = α/r. The pieces a variant may replace:

- **slots** filled by modifier plugins (see :class:`ScalingModifier`, :class:`InitModifier`):
  ``"scaling"`` (rsLoRA: α/√r) and ``"init"`` (LoftQ, OLoRA: A, B and possibly the base weight);
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

from qpeft import hookimpl
from qpeft.core.adapter import Adapter
from qpeft.core.errors import OptionsError, QpeftError
from qpeft.core.options import option
from qpeft.core.plugin import near_misses
from qpeft.core.quantizer import DTYPES, QuantizedLinear

ALL_LINEAR = "all-linear"


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


# -- layers ------------------------------------------------------------------------------
class AdapterLayer(nn.Module):
    """A frozen QuantizedLinear ``base`` plus trainable adapter tensors.

    The common ground of every method's layer, which saving and merging rely on.
    """

    base: QuantizedLinear

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The trainable tensors under their PEFT key suffixes (``"lora_A.weight"``…)."""
        raise NotImplementedError

    def load_adapter_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Copy saved tensors (as returned by :meth:`adapter_tensors`) into the layer."""
        own = self.adapter_tensors()
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise QpeftError(f"saved adapter lacks {', '.join(missing)} for a {type(self).__name__}")
        with torch.no_grad():
            for key, tensor in own.items():
                tensor.copy_(tensors[key].to(tensor.dtype).reshape(tensor.shape))

    def merged_weight(self) -> torch.Tensor:
        """The float32 (out×in) weight equivalent to this layer."""
        raise NotImplementedError

    def merged_bias(self) -> torch.Tensor | None:
        """The float32 bias equivalent to this layer."""
        bias = self.base.bias
        return None if bias is None else bias.detach().float()

    @torch.no_grad()
    def to_linear(self, dtype: torch.dtype) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes (adapter folded in)."""
        weight, bias = self.merged_weight(), self.merged_bias()
        linear = nn.Linear(self.base.in_features, self.base.out_features, bias=bias is not None,
                           device=weight.device, dtype=dtype)
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        return linear.requires_grad_(False)


class LoRALinear(AdapterLayer):
    """``h = base(x) + s·B·A·dropout(x)`` (Hu et al. 2021, §4.1, Eq. 3).

    A (r×in) and B (out×r) are held in ``dtype`` (float32 by default); the input is cast
    to it for the low-rank path and the result cast back to the base's compute dtype.
    """

    def __init__(self, base: QuantizedLinear, r: int, scaling: float, dropout: float = 0.0,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        device = layer_device(base)
        self.base, self.r, self.scaling = base, r, scaling
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.base_rewritten = False
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

    def finish_init(self) -> None:
        """Called once after the init modifier ran; DoRA sets its magnitude here."""

    # -- forward -------------------------------------------------------------------
    def low_rank(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(A, B, s)`` in use: the update is ``s·B·A`` (QDyLoRA returns a rank slice)."""
        return self.lora_A, self.lora_B, self.scaling

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """``s·B·A·x`` in the adapter dtype (``x`` already dropped out)."""
        a, b, s = self.low_rank()
        return ((x.to(a.dtype) @ a.t()) * s) @ b.t()  # s on the r-wide side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return add_low_rank(self.base(x), self.dropout(x), *self.low_rank())

    # -- merge and save ------------------------------------------------------------
    def delta_weight(self) -> torch.Tensor:
        """``s·B·A`` as a float32 (out×in) tensor."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        """``Ŵ + s·B·A`` (Hu et al. 2021, §4.2: no inference latency once merged)."""
        return self.base.dequantize().to(self.lora_A.device) + self.delta_weight()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        return {"lora_A.weight": self.lora_A, "lora_B.weight": self.lora_B}

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}"


def add_low_rank(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                 s: float) -> torch.Tensor:
    """``out + s·(x·Aᵀ)·Bᵀ`` (Eq. 3's sum), written into ``out``: the base layer's fresh
    output (the QuantizedLinear contract). Where ``out`` is in the adapter dtype the scale
    and the sum ride inside one in-place GEMM (``addmm_``: C ← C + s·P·Bᵀ), so the out-wide
    update is never a tensor of its own and no elementwise pass reads it back."""
    z = x.to(a.dtype) @ a.t()
    if out.dtype != b.dtype or not out.is_contiguous():
        return out + ((z * s) @ b.t()).to(out.dtype)
    out.view(-1, out.shape[-1]).addmm_(z.reshape(-1, z.shape[-1]), b.t(), alpha=s)
    return out


# -- model-level helpers shared by every method ------------------------------------------
def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def find_targets(model: nn.Module, targets, owner: str) -> list[tuple[str, nn.Module, str, QuantizedLinear]]:
    """``(name, parent, attribute, layer)`` of the quantized layers named by ``targets``.

    A target matches a layer whose qualified name equals it or ends with ``"." + target``;
    ``"all-linear"`` matches every quantized layer except the output projection.
    """
    if adapter_layers(model):
        raise QpeftError("the model already has an adapter attached; start from a fresh base model")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found, names = [], []
    for parent_name, parent in model.named_modules():
        for attr, child in parent.named_children():
            if not isinstance(child, QuantizedLinear):
                continue
            name = f"{parent_name}.{attr}".lstrip(".")
            names.append(name)
            everything = ALL_LINEAR in targets and child is not head
            if everything or any(name == t or name.endswith("." + t) for t in targets):
                found.append((name, parent, attr, child))
    if not found:
        example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})) or "none: quantize the model first"
        raise OptionsError(f"{owner} option targets={','.join(targets)} matched no quantized layer; "
                           f"layer names end with: {example}")
    return found


def mark_trainable(model: nn.Module) -> None:
    """Freeze every parameter, then unfreeze those the adapter layers hold beside their base."""
    for p in model.parameters():
        p.requires_grad_(False)
    for layer in adapter_layers(model).values():
        frozen = {id(p) for p in layer.base.parameters()}
        for p in layer.parameters():
            if id(p) not in frozen:
                p.requires_grad_(True)


@torch.no_grad()
def merge_model(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fold every adapter into its layer and dequantize the rest, in place.

    The result is a plain transformers model of ``nn.Linear`` layers in ``dtype``, on
    which ``save_pretrained`` works.
    """
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, AdapterLayer):
                setattr(parent, attr, child.to_linear(dtype))
            elif isinstance(child, QuantizedLinear):
                setattr(parent, attr, _plain_linear(child, dtype))
    model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    if getattr(model, "config", None) is not None:
        model.config.dtype = dtype
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model


def _plain_linear(layer: QuantizedLinear, dtype: torch.dtype) -> nn.Linear:
    weight = layer.dequantize()
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                       device=weight.device, dtype=dtype)
    linear.weight.copy_(weight)
    if layer.bias is not None:
        linear.bias.copy_(layer.bias)
    return linear


def layer_device(module: nn.Module) -> torch.device:
    """The device of a module's first tensor (CPU for a module without any)."""
    for tensor in [*module.parameters(), *module.buffers()]:
        return tensor.device
    return torch.device("cpu")


# -- the plugin --------------------------------------------------------------------------
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


class AdapterMethod(Adapter):
    """A method plugin: attaches layers and saves, loads and merges them.

    Subclasses implement :meth:`attach` and :meth:`peft_config`; saving, loading and
    merging only use the :class:`AdapterLayer` interface, so they are shared.
    """

    role = "method"
    peft_type: ClassVar[str] = ""

    def peft_config(self, model: nn.Module) -> dict:
        """Method-specific ``adapter_config.json`` fields (``peft_type`` and the rest)."""
        raise NotImplementedError

    def save(self, model: nn.Module, directory, meta: dict | None = None) -> None:
        """Write the adapter in PEFT's format plus ``qpeft_adapter.json`` (see _peft_format)."""
        from qpeft.plugins.adapters import _peft_format

        _peft_format.save(model, directory, self.peft_config(model),
                          [self, *getattr(self, "modifiers", [])], meta or {})

    def load(self, model: nn.Module, directory) -> None:
        """Attach (with the saved modifiers) if needed, then load the saved tensors exactly.

        Init modifiers run again on attach (they are deterministic), so a base weight they
        rewrote is rebuilt before the trained tensors are copied in.
        """
        from qpeft.plugins.adapters import _peft_format

        if not adapter_layers(model):
            self.attach(model, _peft_format.saved_modifiers(directory))
        _peft_format.load_tensors(model, directory)

    def merge(self, model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
        """Fold the adapter in: a plain full-precision transformers model (in place)."""
        return merge_model(model, dtype)


class LoRA(AdapterMethod):
    """The ``lora`` method; DoRA and QDyLoRA subclass it and replace ``layer_cls``."""

    name = "lora"
    description = "LoRA: a trainable low-rank update s·B·A beside each frozen layer (Hu et al. 2021)"
    slots = {"scaling": ScalingModifier, "init": InitModifier}  # slot -> what fills it
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

    def scaling(self, modifiers: list[Adapter], r: int | None = None) -> float:
        """s for rank ``r``: the "scaling" modifier's rule, else α/r (§4.1)."""
        r = self.rank if r is None else r
        rule = _filling(modifiers, "scaling")
        return rule.scaling(r, self.options.alpha) if rule else self.options.alpha / r

    def make_layer(self, base: QuantizedLinear, modifiers: list[Adapter]) -> LoRALinear:
        """The adapter layer wrapping ``base`` (subclasses pass extra arguments here)."""
        return self.layer_cls(base, self.rank, self.scaling(modifiers), self.options.dropout,
                              DTYPES[self.options.dtype])

    def attach(self, model: nn.Module, modifiers: list[Adapter]) -> None:
        """Wrap every target layer; run the init modifier; leave only adapter tensors trainable."""
        init = _filling(modifiers, "init")
        for _, parent, attr, base in find_targets(model, self.options.targets, f"adapter '{self.name}'"):
            layer = self.make_layer(base, modifiers)
            if init is not None:
                init.initialize(layer, layer.scaling)
            layer.finish_init()
            if getattr(base, "source_weight", None) is not None:
                base.source_weight = None  # a full-precision copy kept for the init modifier
            setattr(parent, attr, layer)
        self.modifiers = list(modifiers)
        mark_trainable(model)

    @classmethod
    def from_peft_config(cls, config: dict) -> dict | None:
        """Options for a PEFT LoRA adapter (``peft_type`` LORA, ``use_dora`` false)."""
        if config.get("peft_type") != "LORA" or config.get("use_dora"):
            return None
        return low_rank_values(config)

    def peft_config(self, model: nn.Module) -> dict:
        """LoRA's ``adapter_config.json`` fields; a modifier may add its own through an
        optional ``peft_config(config: dict)`` method (rsLoRA sets ``use_rslora``)."""
        from qpeft.plugins.adapters import _peft_format

        config = {"peft_type": self.peft_type, "r": self.rank, "lora_alpha": self.options.alpha,
                  "lora_dropout": self.options.dropout, "use_rslora": False, "use_dora": False,
                  "init_lora_weights": True, "target_modules": _peft_format.target_modules(model)}
        for modifier in getattr(self, "modifiers", []):
            getattr(modifier, "peft_config", lambda c: None)(config)
        return config


def low_rank_values(config: dict) -> dict:
    """``r``, ``alpha``, ``dropout`` and ``targets`` from a PEFT LoRA config (PEFT's defaults
    where a field is absent: r=8, lora_alpha=8, lora_dropout=0)."""
    return {"r": config.get("r", 8), "alpha": config.get("lora_alpha", 8),
            "dropout": config.get("lora_dropout") or 0.0, "targets": config["target_modules"]}


def _filling(modifiers: list[Adapter], slot: str):
    return next((m for m in modifiers if m.modifies == slot), None)


@hookimpl
def register_adapters(register):
    register(LoRA)
