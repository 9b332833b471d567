"""The Quantizer plugin kind and the quantized-layer contract every adapter builds on.

A Quantizer turns ``nn.Linear`` layers into :class:`QuantizedLinear` modules. Adapters
never look inside a storage format: they call ``matmul`` (forward/backward in the compute
dtype), ``dequantize`` (read Ŵ), ``set_weight`` (write W back, re-quantized — LoftQ,
OLoRA and merging need it) and ``storage_bytes``. So any adapter works over any quantizer.

    model ──quantize_model──▶ every target nn.Linear replaced, one layer at a time
                              (moved to the device, quantized, full-precision copy freed)
"""
import dataclasses
from typing import ClassVar, Literal

import torch
from torch import nn

from qpeft.core.base.options import option
from qpeft.core.plugin.base import Plugin

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


class QuantizedLinear(nn.Module):
    """A frozen ``y = x·Ŵᵀ + b`` whose weight Ŵ (out×in) is held in some storage format."""

    # The original full-precision W (float, on CPU), set by Quantizer.quantize_one only when
    # the run's adapter declares ``needs_source_weights`` (LoftQ fits its init to W − Ŵ); the
    # adapter method sets it back to None once its layer is initialised.
    source_weight: torch.Tensor | None = None

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.compute_dtype = compute_dtype
        self.bias = None if bias is None else nn.Parameter(
            bias.detach().to(compute_dtype), requires_grad=False)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Ŵᵀ`` in the compute dtype, differentiable with respect to ``x`` only: a new
        tensor that backward does not read, so an adapter may add to it in place."""
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """Ŵ as a float32 (out×in) tensor, detached."""
        raise NotImplementedError

    def set_weight(self, weight: torch.Tensor) -> None:
        """Replace Ŵ by the quantization of ``weight`` (out×in)."""
        raise NotImplementedError

    def storage_bytes(self) -> int:
        """Bytes of every tensor held for Ŵ (packed codes, scales, zeros) and the bias."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x·Ŵᵀ + b``, the matmul in the compute dtype, the result in ``x``'s dtype (float32
        activations stay float32 between layers; see ``needs_float32_activations``)."""
        y = self.matmul(x.to(self.compute_dtype))
        y = y if self.bias is None else y + self.bias
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, dtype={self.compute_dtype}"

    def cache_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors that hold Ŵ and the bias, by name, as the quantized-base cache writes
        them (docs/cache.md): by default the layer's ``state_dict`` (its parameters and
        persistent buffers). A layer that keeps something else (a Python number) adds it
        here as a 0-d tensor; :meth:`Quantizer.layer_from_cache` reads it back."""
        return dict(self.state_dict())

    @classmethod
    def bare(cls, in_features: int, out_features: int, bias: torch.Tensor | None,
             compute_dtype: torch.dtype):
        """A layer of this class with only the base's attributes set (no subclass
        ``__init__``, nothing quantized): what ``layer_from_cache`` fills in."""
        layer = cls.__new__(cls)
        QuantizedLinear.__init__(layer, in_features, out_features, bias, compute_dtype)
        return layer


@dataclasses.dataclass
class QuantizerOptions:
    """Options every quantizer has; a plugin's Options subclasses this."""

    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = option(
        "auto", "dtype of matmuls and of the layers left unquantized (float32 for adapters that "
                "need float32 activations, e.g. ia3, dora, adalora); auto: bfloat16 where the hardware computes it "
                "natively (CUDA; CPUs with AVX-512 BF16 or AMX), else float32")
    include_lm_head: bool = option(False, "also quantize the output projection (lm_head)")

    def __post_init__(self):
        """Checks of a subclass call ``super().__post_init__()``; nothing to check here."""


@dataclasses.dataclass
class LayerStats:
    """What quantizing one layer did: its size before/after and ‖W−Ŵ‖/‖W‖."""

    name: str
    weights: int
    bytes_before: int
    bytes_after: int
    rel_error: float | None


class Quantizer(Plugin):
    """Base of quantizer plugins: implement :meth:`quantize_linear`."""

    kind: ClassVar[str] = "quantizer"
    Options: ClassVar[type] = QuantizerOptions
    required_methods = ("quantize_linear",)
    # Part of the quantized-base cache's key: bump it when the tensors this quantizer stores
    # for the same weight and options change, so bases cached before are made again.
    cache_version: ClassVar[int] = 1

    def __init__(self, options=None, **values):
        super().__init__(options, **values)
        self.dtype_reason = "set by compute_dtype"
        if self.options.compute_dtype == "auto":   # recorded resolved, so a rebuild elsewhere matches
            dtype, self.dtype_reason = native_dtype_reason()
            self.options = dataclasses.replace(self.options, compute_dtype=dtype)

    @property
    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.options.compute_dtype]

    def quantize_linear(self, linear: nn.Linear) -> QuantizedLinear:
        """A :class:`QuantizedLinear` holding ``linear``'s weight, on ``linear``'s device."""
        raise NotImplementedError

    def layer_from_cache(self, tensors: dict[str, torch.Tensor], linear: nn.Linear) -> QuantizedLinear:
        """The layer whose :meth:`QuantizedLinear.cache_tensors` were ``tensors`` (already on
        the device), for ``linear`` (on meta: only its shape and whether it has a bias).

        Implementing it opts a quantizer into the quantized-base cache (docs/cache.md); one
        that does not is quantized afresh on every load."""
        raise NotImplementedError

    @property
    def cacheable(self) -> bool:
        """Whether this quantizer implements :meth:`layer_from_cache`."""
        return type(self).layer_from_cache is not Quantizer.layer_from_cache

    def targets(self, model: nn.Module) -> list[tuple[str, nn.Module, str, nn.Linear]]:
        """``(name, parent, attribute, layer)`` of every linear layer to quantize."""
        skip = None if self.options.include_lm_head else model.get_output_embeddings()
        out = []
        for parent_name, parent in model.named_modules():
            for attr, child in parent.named_children():
                if isinstance(child, nn.Linear) and child is not skip:
                    out.append((f"{parent_name}.{attr}".lstrip("."), parent, attr, child))
        return out

    def quantize_model(self, model: nn.Module, device: str | torch.device = "cpu",
                       measure: bool = False, progress: bool = False,
                       keep_source: bool = False, float32_activations: bool = False) -> list[LayerStats]:
        """Replace the target layers in place, one at a time on ``device``; cast the rest.

        With ``measure``, each layer's relative reconstruction error is computed before its
        full-precision weight is freed. With ``keep_source``, that weight is kept on CPU as
        ``layer.source_weight`` for an adapter that needs it (LoftQ), which drops it. With
        ``float32_activations`` the rest stays float32 instead of the compute dtype (an adapter
        that declares ``needs_float32_activations``: IA³, DoRA).
        """
        from tqdm.auto import tqdm

        stats = []
        targets = self.targets(model)
        for name, parent, attr, linear in tqdm(targets, desc=f"quantizing ({self.name})",
                                               disable=None if progress else True, unit="layer"):
            layer, layer_stats = self.quantize_one(name, linear, device, measure, keep_source)
            stats.append(layer_stats)
            setattr(parent, attr, layer)
            del linear
        for module in model.modules():
            if not isinstance(module, QuantizedLinear):
                for p in module.parameters(recurse=False):
                    p.requires_grad_(False)
        cast_unquantized(model, torch.float32 if float32_activations else self.compute_dtype, device)
        return stats

    def quantize_one(self, name: str, linear: nn.Linear, device: str | torch.device = "cpu",
                     measure: bool = False, keep_source: bool = False
                     ) -> tuple[QuantizedLinear, LayerStats]:
        """``linear`` moved to ``device`` and quantized, with its :class:`LayerStats`.

        The one per-layer step of both :meth:`quantize_model` and the streaming loader
        (:mod:`qpeft.core.model.streaming`). ``measure`` and ``keep_source`` as there; the caller
        drops ``linear`` afterwards, which frees the full-precision weight.
        """
        linear = linear.to(device)
        w = linear.weight.detach()
        layer = self.quantize_linear(linear)
        err = None
        if measure:
            err = (torch.linalg.norm(w.float() - layer.dequantize().to(w.device))
                   / torch.linalg.norm(w.float())).item()
        stats = LayerStats(name, w.numel(), w.numel() * w.element_size() + _bias_bytes(linear),
                           layer.storage_bytes(), err)
        if keep_source:
            layer.source_weight = w.to("cpu", copy=True)
        return layer, stats


def native_dtype() -> str:
    """``compute_dtype=auto``: "bfloat16" where matmuls run natively in it, else "float32"."""
    return native_dtype_reason()[0]


def native_dtype_reason() -> tuple[str, str]:
    """``(dtype, why)`` of ``compute_dtype=auto``, the why shown in a run's first lines.

    On CUDA, bfloat16 (float16 on GPUs without it, as QLoRA does on T4/V100). On a CPU,
    bfloat16 only with AVX-512 BF16 or AMX: elsewhere torch emulates bf16 matmuls, measured
    50× slower than float32 on a 2-core AVX2 EPYC (0.6 against 35 GFLOP/s)."""
    if torch.cuda.is_available():
        if torch.cuda.is_bf16_supported():
            return "bfloat16", "auto: the GPU computes bf16"
        return "float16", "auto: the GPU has no bf16"
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        flags = []
    native = sorted({"avx512_bf16", "amx_bf16"} & set(flags))
    if native:
        return "bfloat16", f"auto: the CPU has {' and '.join(f.upper().replace('_', '-') for f in native)}"
    return "float32", "auto: the CPU has no AVX-512 BF16 or AMX, so bf16 would be emulated (~50× slower)"


def _bias_bytes(linear: nn.Linear) -> int:
    return 0 if linear.bias is None else linear.bias.numel() * linear.bias.element_size()


def _plain_modules(module: nn.Module):
    """Every module outside quantized layers (never descends into a QuantizedLinear)."""
    if isinstance(module, QuantizedLinear):
        return
    yield module
    for child in module.children():
        yield from _plain_modules(child)


def cast_unquantized(model: nn.Module, dtype: torch.dtype, device) -> None:
    """Move the model to ``device`` and cast floating tensors outside quantized layers."""
    for layer in quantized_layers(model).values():
        layer.to(device)
    for module in _plain_modules(model):
        for key, p in module._parameters.items():
            if p is not None and p.is_floating_point():
                p.data = p.data.to(device=device, dtype=dtype)
        for key, b in module._buffers.items():
            if b is not None:
                module._buffers[key] = b.to(device, dtype if b.is_floating_point() else b.dtype)


def tensor_bytes(tensors) -> int:
    """Bytes of ``tensors``, each storage once: tied or shared tensors are not counted twice
    (the one byte counter: model sizes, a layer's ``storage_bytes``, the conformance kit)."""
    seen, total = set(), 0
    for t in tensors:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def model_bytes(model: nn.Module) -> int:
    """Bytes the model holds: quantized storage plus every other tensor, tied ones once."""
    return sum(q.storage_bytes() for q in quantized_layers(model).values()) + tensor_bytes(
        t for module in _plain_modules(model)
        for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)])


def quantized_layers(model: nn.Module) -> dict[str, QuantizedLinear]:
    """Every quantized layer of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
