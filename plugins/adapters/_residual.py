"""What the calibrated inits that rewrite the base (CorDA, LoRA-GA) share: the saved state
(each layer's initial A₀, B₀) and applying it, with no data, as often as a model is rebuilt::

    A ← A₀     B ← B₀     base ← quant(W − s·B₀·A₀)     (W: the layer's full-precision weight)

and the adapter written for PEFT over the original base: after training, W' + s·B·A =
W + s·(B·A − B₀·A₀) = W + s·[B, −B₀]·[A; A₀], a plain LoRA of rank 2r with the same scaling
(PEFT 0.21's ``path_initial_model_for_weight_conversion``, ``LoraModel.subtract_mutated_init``).
``converted`` serves any init that keeps ``layer.calibrated_init = (A₀, B₀)`` (PiSSA with a
randomized SVD sets it at attach, since PEFT cannot rerun that SVD).

A private module of the plugins package, not a plugin."""
import torch

from qpeft import LoRALinear, QpeftError, adapter_layers
from qpeft.plugins.adapters._svd import source_weight


def refuse_other_updates(layer, who: str) -> None:
    """One line when the layer's update is not s·B·A of its own A, B (QDyLoRA's rank slice,
    AdaLoRA's B·E·A): the rewritten base would not add back to W."""
    if type(layer).low_rank is not LoRALinear.low_rank:
        raise QpeftError(f"{who} moves s·B·A out of the base, but a {type(layer).__name__} computes its update "
                         f"otherwise; use lora+{who} or dora+{who}")


def state_of(name: str, a: torch.Tensor, b: torch.Tensor) -> dict:
    """The calibration state of one layer: its initial A₀ and B₀ (CPU, float32)."""
    return {f"{name}.lora_A": a.detach().float().cpu(), f"{name}.lora_B": b.detach().float().cpu()}


@torch.no_grad()
def apply(model, state: dict, who: str) -> None:
    """A ← A₀, B ← B₀, base ← quant(W − s·B₀·A₀) for every layer in ``state``; the full-precision
    copy W is dropped once used. A layer already rebuilt from the same A₀, B₀ only gets A, B
    back; one rewritten from another state is refused (its W is gone)."""
    for name, layer in adapter_layers(model).items():
        if f"{name}.lora_A" not in state:
            continue
        a0, b0 = state[f"{name}.lora_A"], state[f"{name}.lora_B"]
        if a0.shape != layer.lora_A.shape or b0.shape != layer.lora_B.shape:
            raise QpeftError(f"{who}: the saved init of {name} has rank {a0.shape[0]}, the layer {layer.r}; "
                             "load it with the adapter spec it was made with")
        done = getattr(layer, "calibrated_init", None)
        rebuilt = layer.base.source_weight is None and layer.base_rewritten
        if rebuilt and not (done is not None and torch.equal(done[0], a0) and torch.equal(done[1], b0)):
            raise QpeftError(f"{who}: the base of {name} was already rewritten from another calibration and its "
                             "full-precision weight is gone; load the adapter onto a freshly quantized model "
                             "(qpeft.load_adapter(model, DIR))")
        layer.lora_A.copy_(a0.to(layer.lora_A.device, layer.lora_A.dtype))
        layer.lora_B.copy_(b0.to(layer.lora_B.device, layer.lora_B.dtype))
        if not rebuilt:
            weight = source_weight(layer)
            update = layer.scaling * (layer.lora_B.float() @ layer.lora_A.float())
            layer.set_base_weight(weight - update)
            layer.base.source_weight = None
            layer.calibrated_init = (a0, b0)
        layer.finish_init()      # DoRA: m = ‖W' + s·B·A‖ of the rewritten base


def converted(layer, tensors: dict) -> dict:
    """PEFT's tensors of a layer whose base this init rewrote: lora_A ← [A; A₀], lora_B ← [B, −B₀]
    (rank 2r, exact over the original W; DoRA's magnitude as it is, since W' + s·B·A is the same
    weight). A₀, B₀ in the adapter dtype, as the rewrite used them. A layer not rewritten
    (no calibration applied yet) is written as it is."""
    done = getattr(layer, "calibrated_init", None)
    if done is None or not layer.base_rewritten:
        return tensors
    a, b = tensors["lora_A.weight"], tensors["lora_B.weight"]
    a0, b0 = (t.to(a.device, a.dtype) for t in done)
    return {**tensors, "lora_A.weight": torch.cat([a, a0]), "lora_B.weight": torch.cat([b, -b0], dim=1)}
