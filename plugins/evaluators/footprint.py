"""``footprint``: what a combination costs — sizes, trainable parameters, memory, time.

The thesis' cost columns: trainable parameters (count and % of the base), adapter
memory overhead, quantized model size — measured here — and every fact the run provides
(``ctx.facts``: peak memory, GPU reserved/allocated on CUDA and process RSS on CPU,
training runtime and throughput, …), copied as they are.
"""
from qpeft import Evaluator, hookimpl, model_bytes, quantized_layers


def parameter_counts(model) -> tuple[int, int]:
    """``(trainable, base)``: adapter parameters and base-model weights (quantized ones
    counted as the in×out weights they stand for, tied tensors once)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    quantized = quantized_layers(model)
    inside = {id(p) for q in quantized.values() for p in q.parameters()}
    seen, base = set(), 0
    for p in model.parameters():
        if not p.requires_grad and id(p) not in inside and p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            base += p.numel()
    base += sum(q.in_features * q.out_features for q in quantized.values())
    return trainable, base


class Footprint(Evaluator):
    name = "footprint"
    description = "Model size, trainable parameters (count, %), adapter size, peak memory, runtime"
    # Costs: smaller is better. Only what the trained adapter changes is compared.
    higher_is_better = {"trainable_params": False, "trainable_pct": False, "adapter_mb": False,
                        "model_mb": False}
    stages = ("after",)

    def evaluate(self, ctx):
        trainable, base = parameter_counts(ctx.model)
        trainable_bytes = sum(p.numel() * p.element_size() for p in ctx.model.parameters() if p.requires_grad)
        measured = {"model_mb": round((model_bytes(ctx.model) - trainable_bytes) / 2**20, 2),
                    "trainable_params": trainable,
                    "trainable_pct": round(100 * trainable / max(base, 1), 4),
                    "adapter_mb": round(trainable_bytes / 2**20, 3)}
        facts = {k: v for k, v in ctx.facts.items() if k != "quantized_model_mb"}   # = model_mb, measured here
        return {**facts, **measured}


@hookimpl
def register_evaluators(register):
    register(Footprint)
