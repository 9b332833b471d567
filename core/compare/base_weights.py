"""Which weights a merged export re-quantizes: the base's full-precision weights plus the update.

    trained layer   Ŵ + ΔW,  Ŵ = deq(Q(P))     P: the full-precision weight the run's base was
                                              quantized from; ΔW = merged − Ŵ, what the adapter adds
    re-quantized    Q(P + ΔW)   ("W+ΔW" road)  rather than Q(Ŵ + ΔW) ("Ŵ+ΔW" road)

Why (docs/deploy.md, "Why re-quantizing a merged fine-tune loses it"): Ŵ already sits on the
quantizer's grid, and a short fine-tune's ΔW is smaller than half a step of it, so Q(Ŵ + ΔW)
gives back Ŵ's codes — the fine-tune rounds away (NF4: 55.9 perplexity against 4.84 trained
on the embedded model). P lies off the grid, so ΔW moves the entries near a boundary in
proportion to its size, and with ΔW = 0 the same quantizer gives back exactly the codes that
were trained.

P is what the run's quantizer last quantized for that layer:

- the checkpoint's weight W (LoRA, DoRA, IA³, …: the base is Q(W));
- for a method that rewrites the base at init (LoftQ, PiSSA, OLoRA: ``set_base_weight``), the
  full-precision residual it quantized instead: W − s·B₀·A₀ (PiSSA's principal part moved into
  B₀·A₀, §3; OLoRA's QR part, computed from Ŵ, so Ŵ − s·B₀·A₀; LoftQ's last Eq. 6 argument
  W − s·B_{T−1}·A_{T−1}). Then P + ΔW = W − s·B₀A₀ + (merged − Q(P)): the original weight plus
  what *training* changed, with the base's rounding pattern kept.

Both are read while the run is rebuilt: the quantizer keeps W (``keep_source``) and every
``set_weight`` an init modifier makes is recorded (:func:`rebuild`).
"""
import torch

ROADS = {"W+ΔW": "the base's full-precision weights + the adapter's update (re-quantized from W)",
         "Ŵ+ΔW": "the dequantized base + the adapter's update (the merged model as trained)"}


def rebuild(run_dir, record, plan, rank: int | None = None):
    """``(Rebuilt, {layer name: P})``: the run's adapted model as ``qpeft.core.run.rebuild``
    builds it, and each quantized layer's full-precision pre-image P (float32, CPU)."""
    from qpeft.core.base.errors import QpeftError
    from qpeft.core.interop import peft_files
    from qpeft.core.kinds.peft_format import WEIGHTS
    from qpeft.core.kinds.quantizer import QuantizedLinear
    from qpeft.core.model import streaming
    from qpeft.core.run import rebuild as rebuilding

    if not (run_dir / "adapter" / "qpeft_adapter.json").is_file():
        raise QpeftError(f"{run_dir} has no saved adapter (adapter/qpeft_adapter.json); "
                         f"finish the run with: qpeft run --resume {run_dir}")
    peft_files.header(run_dir / "adapter" / WEIGHTS, f"write it again with: qpeft run --resume {run_dir}")
    cfg, composition = record.settings(run_dir), plan.adapter
    rebuilding.check_rank(composition, rank, f"this run used '{record.adapter_spec}'")
    model, tokenizer, _ = streaming.load_quantized(cfg.model, plan.quantizer, "cpu", keep_source=True,
                                                   float32_activations=composition.needs_float32_activations)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    pre = {n: m.source_weight for n, m in layers.items()}
    for name, layer in layers.items():
        layer.set_weight = _recording(name, layer.set_weight, pre)
    try:
        composition.attach(model)
    finally:
        for layer in layers.values():
            del layer.set_weight                   # the class's method again
            layer.source_weight = None
    composition.method.load(model, run_dir / "adapter")
    model.eval()
    if rank is not None:
        composition.method.select_rank(model, rank)
    built = rebuilding.Rebuilt(run_dir, record, cfg, model, tokenizer, composition, rank)
    return built, {n: w.detach().float() for n, w in pre.items() if w is not None}


def _recording(name, set_weight, pre):
    def recorded(weight):
        pre[name] = weight.detach().to("cpu", torch.float32, copy=True)
        set_weight(weight)
    return recorded


def corrections(model, pre: dict) -> dict:
    """``{name: P − Ŵ}`` for each quantized layer of the adapted ``model`` (before the merge):
    added to the merged weight Ŵ + ΔW it gives P + ΔW. Computed in place of ``pre``."""
    from qpeft.core.kinds.adapter_layers import AdapterLayer

    out = {}
    for name, p in pre.items():
        module = model.get_submodule(name)
        base = module.base if isinstance(module, AdapterLayer) else module
        out[name] = p.sub_(base.dequantize().float().to(p.device))
    pre.clear()
    return out


@torch.no_grad()
def apply(merged, corrections: dict) -> None:
    """Add each correction to the merged model's weight of the same name (float32)."""
    for name, correction in corrections.items():
        weight = merged.get_submodule(name).weight
        weight.add_(correction.to(weight.dtype))
