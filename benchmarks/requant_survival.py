"""How much of a fine-tune survives re-quantizing the merged weights (issue 21, item 1).

    W   full-precision weight of the base checkpoint
    Ŵ   = deq(Q(W)), the quantized base the adapter was trained on
    ΔW  = the adapter's update (``layer.delta_weight()``: s·B·A for LoRA, Hu et al. 2021 §4.2)

    per adapted layer, per re-quantizer X ∈ {nf4, hqq 4-bit, int8, GGUF q4_0}:
      error       ‖X(Ŵ+ΔW) − (Ŵ+ΔW)‖ / ‖Ŵ+ΔW‖         (Ŵ+ΔW is both "merged" and "what was trained")
      survival    ⟨X(Ŵ+ΔW) − Ŵ, ΔW⟩ / ‖ΔW‖²          (1: ΔW kept, 0: ΔW rounded away)
      paired      ⟨X(Ŵ+ΔW) − X(Ŵ), ΔW⟩ / ‖ΔW‖²       (the same without X's own error on Ŵ, which
                                                    is 10× ΔW for the non-NF4 grids: less noisy)
      from W      the same for X(W+ΔW) against W       (a candidate fix: re-quantize from W)
      codes       share of X's codes that ΔW changes   (X(Ŵ+ΔW) vs X(Ŵ); X(W+ΔW) vs X(W))
      crossing    share of ΔW entries larger than half the NF4 gap to the next level, where
                  Ŵ sits exactly on a level (QLoRA §3: Ŵ = absmax·q_i) — the only entries nf4 can move
    whole model:  perplexity of base alone, trained, merged fp32, and merged → X from Ŵ+ΔW
                  (X simulated as deq(X(·)) in float32, and X's own layers through
                  ``Quantizer.quantize_model`` as ``qpeft export --merge --quant`` does) and from W+ΔW.

``python benchmarks/requant_survival.py --help``. Without ``--run`` it trains the short run
itself: ``qpeft run --steps 10 --quant nf4 --adapter lora --eval-limit 8 --evaluators perplexity``.
"""
import argparse
import copy
import json
import platform
import subprocess
import sys
from pathlib import Path

import torch

TARGETS = {"nf4": "nf4", "hqq": "hqq:nbits=4", "int8": "int8", "q4_0": "gguf:q4_0"}


def machine() -> dict:
    """CPU model, core count, whether it has AVX512-BF16 (the default compute dtype follows it)."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    model = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")),
                 platform.processor())
    import bitsandbytes
    return {"cpu": model, "cores": torch.get_num_threads(), "avx512_bf16": "avx512_bf16" in info,
            "torch": torch.__version__, "bitsandbytes": bitsandbytes.__version__}


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Both 4-bit codes of every byte (the packing order does not matter for comparing)."""
    b = packed.reshape(-1).to(torch.uint8)
    return torch.cat([b & 15, b >> 4])


def requantizer(spec: str):
    """``f(weight) -> (deq(X(weight)) float32, X's codes flat)`` for a qpeft quantizer spec or
    ``gguf:q4_0`` (gguf's reference ``quantize``/``dequantize``, llama.cpp's ggml-quants.c)."""
    if spec.startswith("gguf:"):
        import gguf
        kind = gguf.GGMLQuantizationType[spec.split(":", 1)[1].upper()]
        block, size = gguf.GGML_QUANT_SIZES[kind]

        def ggml(w):
            q = gguf.quants.quantize(w.detach().float().cpu().numpy(), kind)
            deq = torch.from_numpy(gguf.quants.dequantize(q, kind).copy()).reshape(w.shape)
            return deq, _nibbles(torch.from_numpy(q.reshape(-1, size)[:, 2:].copy()))   # drop the fp16 scale
        return ggml

    from qpeft.core.compare.requant import check_spec
    quantizer = check_spec(spec)

    def library(w):
        linear = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        with torch.no_grad():
            linear.weight.copy_(w)
        layer = quantizer.quantize_linear(linear)
        codes = next(getattr(layer, n) for n in ("codes", "W_q", "CB") if hasattr(layer, n))
        flat = codes.reshape(-1).view(torch.uint8) if codes.dtype == torch.int8 else _nibbles(codes)
        return layer.dequantize().float(), flat
    return library


def nf4_crossing(w_hat: torch.Tensor, dw: torch.Tensor, blocksize: int = 64) -> float:
    """Share of ΔW entries that exceed half the gap from Ŵ's NF4 level to the next level in
    their direction: only those can change a code when Ŵ+ΔW is rounded to NF4 again (Ŵ is on
    a level, absmax_b = max|Ŵ_b| because ±1 are levels)."""
    import bitsandbytes.functional as F
    levels = F.get_4bit_type("nf4", device="cpu").float()
    x, d = w_hat.reshape(-1, blocksize).float(), dw.reshape(-1, blocksize).float()
    absmax = x.abs().amax(1, keepdim=True).clamp_min(1e-12)
    idx = (x / absmax).unsqueeze(-1).sub(levels).abs().argmin(-1)
    up = torch.where(idx < 15, levels[(idx + 1).clamp(max=15)] - levels[idx], torch.inf)
    down = torch.where(idx > 0, levels[idx] - levels[(idx - 1).clamp(min=0)], torch.inf)
    half = torch.where(d > 0, up, down) * absmax / 2
    return float((d.abs() > half).float().mean())


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def layer_survival(w: torch.Tensor, w_hat: torch.Tensor, dw: torch.Tensor, requant) -> dict:
    """The per-layer figures of the module doc for one re-quantizer ``requant``."""
    trained, from_w = w_hat + dw, w + dw
    q_hat, c_hat = requant(trained)
    q_base, c_base = requant(w_hat)
    q_w, c_w = requant(from_w)
    q_w0, c_w0 = requant(w)
    dw2 = float(dw.pow(2).sum())
    return {"rel_err_vs_trained": _rel(q_hat, trained),
            "survival": float(((q_hat - w_hat) * dw).sum()) / dw2,
            "survival_paired": float(((q_hat - q_base) * dw).sum()) / dw2,
            "codes_changed": float((c_hat != c_base).float().mean()),
            "rel_err_from_w_vs_w_merged": _rel(q_w, from_w),
            "rel_err_from_w_vs_trained": _rel(q_w, trained),
            "survival_from_w": float(((q_w - w) * dw).sum()) / dw2,
            "survival_from_w_paired": float(((q_w - q_w0) * dw).sum()) / dw2,
            "codes_changed_from_w": float((c_w != c_w0).float().mean()),
            "delta_over_own_error": float(dw.norm() / (q_w0 - w).norm())}


def survival_table(layers: dict, targets: dict) -> dict:
    """``{target: {"mean": figures averaged over layers, "layers": {name: figures}}}`` for
    ``layers = {name: (W, Ŵ, ΔW)}``; "mean" also has nf4's crossing share."""
    out = {}
    for name, spec in targets.items():
        requant = requantizer(spec)
        per = {n: layer_survival(w, w_hat, dw, requant) for n, (w, w_hat, dw) in layers.items()}
        mean = {k: sum(p[k] for p in per.values()) / len(per) for k in next(iter(per.values()))}
        out[name] = {"spec": spec, "mean": mean, "layers": per}
    crossing = [nf4_crossing(w_hat, dw) for _, w_hat, dw in layers.values()]
    out["nf4_crossing_share"] = sum(crossing) / len(crossing)
    return out


def train(out: Path, steps: int) -> Path:
    """The short nf4 × lora run of the issue, trained here (minutes on a 2-core CPU)."""
    name = f"nf4-lora-{steps}"
    if not (out / name / "adapter" / "qpeft_adapter.json").is_file():
        subprocess.run([sys.executable, "-m", "qpeft", "run", "--steps", str(steps), "--quant", "nf4",
                        "--adapter", "lora", "--output-dir", str(out), "--name", name, "--eval-limit", "8",
                        "--evaluators", "perplexity", "--eval-every", "0", "--overwrite"], check=True)
    return out / name


def _set_weights(model, weights: dict) -> None:
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(w)


def measure_run(run_dir, targets: dict = TARGETS, say=print) -> dict:
    """Per-layer survival and whole-model perplexities of a finished run (module doc)."""
    from qpeft import QuantizedLinear
    from qpeft.core.compare import requant as rq
    from qpeft.core.kinds.adapter_layers import adapter_layers
    from qpeft.core.model import streaming
    from qpeft.core.run import rebuild

    cfg, plan, chosen, record = rq.validation(run_dir)
    ppl = {}

    def measured(model, key):
        ppl[key] = rq.quality_value(cfg, plan, chosen, model, tok)
        say(f"  {key}: {chosen.metric} {ppl[key]:.3f}")

    base = rebuild.rebuild(run_dir, record=record, plan=plan, no_adapter=True)
    tok = base.tokenizer
    measured(base.model, "base alone (untrained, trained-on quantizer)")
    del base
    built = rebuild.rebuild(run_dir, record=record, plan=plan)
    measured(built.model, "trained (adapter on the quantized base)")
    adapted = {n: (layer.base.dequantize().float(), layer.delta_weight().float(), layer.merged_weight().float())
               for n, layer in adapter_layers(built.model).items()}
    merge_gap = max(_rel(m, wh + dw) for wh, dw, m in adapted.values())
    full, _, _ = streaming.load_quantized(cfg.model, rq.check_spec("none:compute_dtype=float32"), "cpu")
    originals = {n: m.dequantize().float() for n, m in full.named_modules() if isinstance(m, QuantizedLinear)}
    del full
    merged = built.composition.method.merge(built.model, torch.float32)
    measured(merged, "merged, float32")
    names = [n for n, *_ in rq.check_spec("nf4").targets(merged)]
    merged_w = {n: merged.get_submodule(n).weight.detach().clone() for n in names}
    delta = {n: adapted[n][1] if n in adapted else torch.zeros_like(merged_w[n]) for n in names}
    say(f"  per-layer survival over {len(adapted)} adapted layers (merge matches Ŵ+ΔW to {merge_gap:.1e})")
    layers = {n: (originals[n], adapted[n][0], adapted[n][1]) for n in adapted}
    table = survival_table(layers, targets)
    for key, spec in targets.items():
        requant = requantizer(spec)
        _set_weights(merged, {n: requant(merged_w[n])[0] for n in names})
        measured(merged, f"merged -> {key} from Ŵ+ΔW (deq, float32)")
        _set_weights(merged, {n: requant(originals[n] + delta[n])[0] for n in names})
        measured(merged, f"merged -> {key} from W+ΔW (deq, float32)")
        _set_weights(merged, merged_w)
        if not spec.startswith("gguf:"):
            shipped = copy.deepcopy(merged)
            rq.check_spec(spec).quantize_model(shipped, device="cpu")   # what requant.measure ships
            measured(shipped, f"merged -> {key} from Ŵ+ΔW (qpeft layers, as export)")
            del shipped
    return {"run": str(run_dir), "machine": machine(), "validation_examples": len(plan.validation),
            "metric": f"{chosen.evaluator}:{chosen.metric}", "trained_with": record.quantizer.options,
            "merge_vs_base_plus_delta": merge_gap, "perplexity": ppl, "survival": table}


def report(result: dict) -> str:
    """The tables for people."""
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} threads, avx512_bf16 {'yes' if m['avx512_bf16'] else 'no'}, "
             f"torch {m['torch']}, bitsandbytes {m['bitsandbytes']}",
             f"run: {result['run']} · {result['validation_examples']} validation examples", "",
             f"{'re-quantizer':<12} {'err vs trained':>14} {'ΔW survives':>12} {'paired':>7} {'codes changed':>14} "
             f"{'from W: survives':>17} {'paired':>7} {'codes changed':>14} {'‖ΔW‖/‖X(W)−W‖':>15}"]
    for key, t in result["survival"].items():
        if key == "nf4_crossing_share":
            continue
        s = t["mean"]
        lines.append(f"{key:<12} {s['rel_err_vs_trained']:>14.4f} {s['survival']:>12.3f} {s['survival_paired']:>7.3f} "
                     f"{s['codes_changed']:>14.4%} {s['survival_from_w']:>17.3f} {s['survival_from_w_paired']:>7.3f} "
                     f"{s['codes_changed_from_w']:>14.4%} {s['delta_over_own_error']:>15.3f}")
    lines += [f"ΔW entries larger than half the NF4 gap at Ŵ's level: {result['survival']['nf4_crossing_share']:.4%}",
              "", f"{'model':<58} {result['metric']}"]
    trained = result["perplexity"]["trained (adapter on the quantized base)"]
    lines += [f"{k:<58} {v:9.3f}  ({v / trained - 1:+.1%} vs trained)" for k, v in result["perplexity"].items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a finished run directory [default: train the short run]")
    parser.add_argument("--out", type=Path, default=Path("/tmp/requant/runs"), help="where the short run goes")
    parser.add_argument("--steps", type=int, default=10, help="steps of the short run [default: 10]")
    parser.add_argument("--json", type=Path, help="write every figure (per layer too) here")
    args = parser.parse_args(argv)
    run_dir = args.run or train(args.out, args.steps)
    result = measure_run(run_dir)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
