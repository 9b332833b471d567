"""The layer base every adapter plugin builds on, and model-level helpers.

An adapter plugin replaces target :class:`~qpeft.core.kinds.quantizer.QuantizedLinear` layers by
:class:`AdapterLayer` modules (a frozen ``base`` plus trainable tensors). Saving (PEFT's
format, :mod:`qpeft.core.kinds.peft_format`), loading and merging only use the AdapterLayer
interface, so :class:`~qpeft.core.kinds.adapter_method.AdapterMethod` shares them with every
method (LoRA, IA³, yours).
"""
import torch
from torch import nn

from qpeft.core.base.errors import OptionsError, QpeftError
from qpeft.core.kinds.quantizer import QuantizedLinear

ALL_LINEAR = "all-linear"


# -- layers ------------------------------------------------------------------------------
class TensorShapeError(QpeftError):
    """A saved adapter tensor whose shape does not fit the layer it is loaded into."""


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
        own = {k: t for k, t in self.adapter_tensors().items() if t.numel()}  # rank 0 saves nothing
        missing = sorted(set(own) - set(tensors))
        if missing:
            raise QpeftError(f"saved adapter lacks {', '.join(missing)} for a {type(self).__name__}")
        for key, tensor in own.items():   # equal shapes up to dimensions of size 1 (IA³'s [n] and [1, n])
            if _squeezed(tensors[key].shape) != _squeezed(tensor.shape):
                raise TensorShapeError(f"{key} is {list(tensors[key].shape)}, but this model's layer needs "
                                       f"{list(tensor.shape)}")
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



def _squeezed(shape) -> tuple:
    return tuple(n for n in shape if n != 1)


# -- model-level helpers shared by every method ------------------------------------------
def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Every adapter layer of a model, by qualified name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdapterLayer)}


def find_targets(model: nn.Module, targets, owner: str) -> list[tuple[str, nn.Module, str, QuantizedLinear]]:
    """``(name, parent, attribute, layer)`` of the quantized layers named by ``targets``.

    A target matches a layer whose qualified name equals it or ends with ``"." + target``;
    ``"all-linear"`` matches every quantized layer except the output projection. A target
    that matches nothing is an error, even beside others that match: a misspelled
    ``q_porj`` never silently trains fewer layers than written.
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
            if everything or target_matches(name, targets):
                found.append((name, parent, attr, child))
    unmatched = [t for t in targets if t != ALL_LINEAR
                 and not any(target_matches(n, [t]) for n, *_ in found)]
    if not found or unmatched:
        example = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in names})) or "none: quantize the model first"
        what = f"target {','.join(unmatched)}" if found else f"targets={','.join(targets)}"
        raise OptionsError(f"{owner} option {what} matched no quantized layer; "
                           f"layer names end with: {example}")
    return found


def target_matches(name: str, targets) -> bool:
    """True when a layer's qualified ``name`` equals one of ``targets`` or ends with
    ``"." + target`` (``q_proj`` matches ``model.layers.0.self_attn.q_proj``) — the one rule
    every method and option naming layers uses."""
    return any(name == t or name.endswith("." + t) for t in targets)


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
