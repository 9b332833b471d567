"""ICQ against plain NF4 on the embedded model (IR-QLoRA, Qin et al. 2024, §3.1; issue 19 item 2).

For each quantizer spec, every linear layer but the output head is quantized as ``qpeft run``
does (``Quantizer.quantize_model``, compute dtype float32 so the figures are the codes' own):

    entropy     mean over blocks of H(codes of the block), bits (4 at most: every level equally used)
    rel error   ‖W − Ŵ‖ / ‖W‖ over all quantized weights together (and the mean of the per-layer values)
    bytes/w     storage_bytes of the quantized layers / their weights
    seconds     wall time of quantize_model (the ICQ search runs on the CPU here; noisy on a shared machine)

    python benchmarks/icq_entropy.py                       # nf4 and nf4:icq=true
    python benchmarks/icq_entropy.py --quant "nf4;nf4:icq=true:icq_steps=25" --json out.json
"""
import argparse
import copy
import json
import sys
import time

import torch


def measure(model, spec: str) -> dict:
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default
    from qpeft.core.kinds.quantizer import quantized_layers

    sources = {n: m.weight.detach().float().clone() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and m is not model.get_output_embeddings()}
    quantizer = build_plugin("quantizer", spec, default())
    start = time.perf_counter()
    stats = quantizer.quantize_model(model)
    seconds = time.perf_counter() - start
    layers = quantized_layers(model)
    err_sq = ref_sq = 0.0
    entropies, weights, stored = [], 0, 0
    for name, layer in layers.items():
        w = sources[name]
        err_sq += (w - layer.dequantize()).pow(2).sum().item()
        ref_sq += w.pow(2).sum().item()
        entropies.append(layer.code_entropy())
        weights += w.numel()
        stored += layer.storage_bytes()
    per_layer = [(sources[n] - l.dequantize()).norm().item() / sources[n].norm().item() for n, l in layers.items()]
    return {"quant": spec, "layers": len(stats), "weights": weights,
            "entropy_bits": torch.cat(entropies).mean().item(),
            "rel_error": (err_sq / ref_sq) ** 0.5, "rel_error_mean_of_layers": sum(per_layer) / len(per_layer),
            "bytes_per_weight": stored / weights, "quantize_seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quant", default="nf4;nf4:icq=true", help="';'-separated quantizer specs")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from qpeft.core.model.models import load_model

    reference, _ = load_model(None, dtype=torch.float32)   # the embedded SmolLM2-135M-Instruct, cached
    rows = []
    for spec in args.quant.split(";"):
        spec = spec if "compute_dtype" in spec else f"{spec}:compute_dtype=float32"
        rows.append(measure(copy.deepcopy(reference), spec))
        r = rows[-1]
        print(f"{r['quant']:45s} entropy {r['entropy_bits']:.4f} bits  rel error {r['rel_error']:.5f} "
              f"(layer mean {r['rel_error_mean_of_layers']:.5f})  {r['bytes_per_weight']:.4f} B/w  "
              f"{r['quantize_seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
