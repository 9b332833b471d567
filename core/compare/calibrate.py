"""A calibrated merge: GPTQ over a merged model, on batches of the run's own training data.

    run record ─▶ the run's training examples, template, --max-length, --packing, --seed
               ─▶ encoded and batched as its trainer batched them (epoch 0 first)  ── N batches
    merged model (plain nn.Linear) ─▶ for each transformer block, in order:
        forward the N batches (stopping after the block), collecting H = 2·X·Xᵀ of each
        linear layer's non-padding inputs ─▶ gptq.gptq(W, H, grid) ─▶ W ← Q in place

Block by block, as GPTQ's reference implementation (Frantar et al. 2023, §4 "Setup": each
block's inputs come from the blocks before it *already quantized*), so a block's rounding
also absorbs what the earlier blocks' rounding changed in its inputs. The grid of each layer
(what its weights may become) comes from the caller: NF4's or a GGUF type's (gptq.py).
"""
import re

import torch

from qpeft.core.base import progress
from qpeft.core.compare import gptq


def batches(cfg, plan, tokenizer, n: int) -> list[dict]:
    """The first ``n`` training micro-batches of the run (``cfg``, ``plan`` from
    ``pipeline.plan``/``requant.validation``): its examples encoded with its template,
    --max-length and --train-on-prompt, packed if it packed, ordered by its --seed as its
    trainer's epochs are (past the end, the next epoch's)."""
    from qpeft.core.dataset import templates
    from qpeft.core.dataset.batch_source import EncodedBatches
    from qpeft.core.dataset.batching import pack

    template = cfg.template if cfg.template != "auto" else None
    items, _ = templates.encode_all(plan.train, tokenizer, template, cfg.max_length, cfg.train_on_prompt)
    if cfg.packing:
        items = pack(items, cfg.max_length, cfg.train.seed)
    source = EncodedBatches(items, tokenizer.pad_token_id, cfg.train.seed)
    size = max(1, cfg.train.batch_size // max(1, cfg.train.grad_accum))
    per_epoch = source.num_batches(size)
    return [source.batch(i // per_epoch, i % per_epoch, size) for i in range(n)]


def block_groups(names: list[str]) -> list[list[str]]:
    """``names`` (in forward order) grouped by transformer block: the name up to its first
    numeric component (``model.layers.3``); a layer outside any block is a group of its own."""
    groups: dict[str, list[str]] = {}
    for name in names:
        m = re.match(r"^(.*?\.\d+)\.", name)
        groups.setdefault(m.group(1) if m else name, []).append(name)
    return list(groups.values())


class _Seen(Exception):
    """Raised from a hook once every layer of the block has its inputs: the rest of the
    forward pass is not needed."""


def hessians(model, names: list[str], data: list[dict]) -> dict[str, torch.Tensor]:
    """``{name: H}`` for the linear layers ``names`` of ``model`` over ``data``'s non-padding
    tokens (GPTQ's H = 2·X·Xᵀ/n, §3)."""
    modules = {n: model.get_submodule(n) for n in names}
    sums = {n: torch.zeros(m.in_features, m.in_features) for n, m in modules.items()}
    counts = dict.fromkeys(names, 0)
    seen, mask = set(), [None]

    def hook(name):
        def collect(_module, args):
            x = args[0].detach().float()
            x = x[mask[0]] if mask[0] is not None and x.shape[:2] == mask[0].shape else x.reshape(-1, x.shape[-1])
            sums[name].addmm_(x.t(), x)
            counts[name] += x.shape[0]
            seen.add(name)
            if len(seen) == len(names):
                raise _Seen
        return collect

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in modules.items()]
    try:
        with torch.no_grad():
            for batch in data:
                seen.clear()
                mask[0] = batch["attention_mask"].bool()
                try:
                    model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
                except _Seen:
                    pass
    finally:
        for h in handles:
            h.remove()
    return {n: 2 * sums[n] / max(1, counts[n]) for n in names}


def calibrate(model, grids: dict, data: list[dict], damp: float = gptq.DAMP) -> dict:
    """Replace the weight of each linear layer named in ``grids`` (``{name: weight → Grid}``)
    by its GPTQ rounding, block by block over ``data``; per-layer output errors on the
    calibration inputs, plain rounding against GPTQ (``{name: (plain, gptq)}``)."""
    order = [n for n, _ in model.named_modules() if n in grids]
    errors = {}
    with progress.evaluating("GPTQ"), progress.bar(len(order), "layer") as done:
        for group in block_groups(order):
            hs = hessians(model, group, data)
            for name in group:
                layer = model.get_submodule(name)
                weight = layer.weight.detach().float()
                grid = grids[name](weight)
                quantized = gptq.gptq(weight, hs[name], grid, damp)
                errors[name] = (gptq.output_error(weight, grid.round(weight), hs[name]),
                                gptq.output_error(weight, quantized, hs[name]))
                with torch.no_grad():
                    layer.weight.copy_(quantized.to(layer.weight.dtype))
                done.update(1)
    return errors


def summary(errors: dict) -> dict:
    """Mean relative output error over the layers, plain rounding and GPTQ."""
    n = max(1, len(errors))
    return {"layers": len(errors), "output_error_plain": sum(p for p, _ in errors.values()) / n,
            "output_error_gptq": sum(g for _, g in errors.values()) / n}


# -- the grids of the formats it writes --------------------------------------------------------
def grids_for(quantizer):
    """``weight → Grid`` for ``quantizer``, or None where its format has no fixed grid to round
    onto. Supported: blockwise-absmax 4-bit layers as bitsandbytes stores them (``nf4``, and
    ``nf4:quant_type=fp4``): a layer exposing its ``code`` (the 16 levels), ``blocksize`` and
    ``quant_type``. HQQ fits its own scales and zeros to the weights it is given (half-quadratic
    optimisation), so rounding onto fixed ones would not survive its packing; int8 and others
    are not 4-bit."""
    import dataclasses

    from torch import nn

    if not hasattr(quantizer.options, "compute_dtype"):
        return None
    exact = type(quantizer)(dataclasses.replace(quantizer.options, compute_dtype="float32"))
    probe = exact.quantize_linear(nn.Linear(64, 4, bias=False))
    if not all(hasattr(probe, a) for a in ("code", "blocksize", "quant_type")):
        return None

    def grid(weight: torch.Tensor) -> gptq.Grid:
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(weight)
        layer = exact.quantize_linear(linear)
        blocks, _ = gptq._blocks(layer.dequantize().float(), layer.blocksize)
        # the block's largest |w| dequantizes to ±absmax exactly (NF4 and FP4 have ±1 levels)
        return gptq.blockwise_absmax_grid(weight, blocks.abs().amax(1), layer.code.float(), layer.blocksize)
    return grid


def gguf_grids(model, type_name: str) -> dict:
    """``{linear layer name: weight → Grid}`` of a model written as GGUF ``type_name``: the
    layers the writer stores in a block type (not the output head or embeddings, which it keeps
    Q8_0 or F16, nor a layer whose rows do not split into 32)."""
    from qpeft.core.interop import gguf_export

    head = model.get_output_embeddings()
    linears = {f"{n}.weight": n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    out = {}
    for key, _, kind in gguf_export.tensor_plan(model, type_name):
        if key in linears and kind.name in gptq.GGUF_GRIDS:
            out[linears[key]] = lambda w, name=kind.name: gptq.gguf_grid(w, name)
    return out


def gguf_merged(run_dir, record, type_name: str, rank: int | None, n: int, road: str = "W+ΔW"):
    """``(merged model, tokenizer, summary)``: the run merged (by ``road``, as
    :func:`qpeft.core.compare.requant.measure` merges) with each layer GGUF ``type_name`` stores
    in a block type rounded by GPTQ over ``n`` of the run's training batches, so that
    gguf.quants writes exactly those codes."""
    from pathlib import Path

    from qpeft.core.compare import base_weights
    from qpeft.core.run import pipeline, rebuild

    run_dir = Path(run_dir)
    cfg = record.settings(run_dir)
    plan = pipeline.plan(cfg, record)
    if road == "W+ΔW":
        built, pre = base_weights.rebuild(run_dir, record, plan, rank)
    else:
        built, pre = rebuild.rebuild(run_dir, rank=rank, record=record, plan=plan), {}
    corrections = base_weights.corrections(built.model, pre)
    merged = built.composition.method.merge(built.model, torch.float32)
    base_weights.apply(merged, corrections)
    del corrections
    tokenizer = built.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    errors = calibrate(merged, gguf_grids(merged, type_name), batches(cfg, plan, tokenizer, n))
    return merged, tokenizer, summary(errors)
