"""IR-QLoRA on an accelerator (issue 19 item 2): ICQ's CUDA path and timing, IEC's merge on CUDA.

    1. ICQ layer on the device, each compute dtype: forward == x·Ŵᵀ + b (Ŵ = dequantize(), τ
       included), relative error; the codes' entropy against plain NF4.
    2. ICQ search time over SmolLM2-135M's 210 layer shapes (random weights, 106 M) against
       plain NF4's quantize time, on the device.
    3. lora+iec over nf4:icq=true on a random tiny Llama on the device: 3 AdamW steps, then the
       adapted logits against the merged model's (bf16 compute and float32).

    python benchmarks/irqlora_gpu.py --device cuda [--json out.json]
    python benchmarks/irqlora_gpu.py --device cpu --small          # a dry run
"""
import argparse
import copy
import json
import sys
import time

import torch
from torch import nn

SMOL = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]   # q k v o gate up down


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def layer_checks(device) -> list[dict]:
    from qpeft.plugins.quantizers.nf4 import NF4

    rows = []
    gen = torch.Generator().manual_seed(0)
    for dtype in ("float32", "bfloat16", "float16"):
        for out, inp in [(1536, 576), (40, 70)]:
            linear = nn.Linear(inp, out)
            with torch.no_grad():
                linear.weight.copy_(torch.randn(out, inp, generator=gen) * 0.02 + 0.003)
            linear = linear.to(device)
            plain = NF4.from_values({"compute_dtype": dtype}).quantize_linear(copy.deepcopy(linear))
            icq = NF4.from_values({"compute_dtype": dtype, "icq": True}).quantize_linear(copy.deepcopy(linear))
            x = torch.randn(4, 7, inp, generator=gen).to(device)
            hat = icq.dequantize()
            ref = x @ hat.t() + linear.bias.detach()
            y = icq(x.to(getattr(torch, dtype))).float()
            rows.append({"dtype": dtype, "shape": [out, inp], "device": str(hat.device),
                         "forward_rel_err": ((y - ref).norm() / ref.norm()).item(),
                         "entropy_plain": plain.code_entropy().mean().item(),
                         "entropy_icq": icq.code_entropy().mean().item(),
                         "rel_err_plain": ((plain.dequantize() - linear.weight).norm() / linear.weight.norm()).item(),
                         "rel_err_icq": ((hat - linear.weight).norm() / linear.weight.norm()).item()})
            print(rows[-1], flush=True)
    return rows


def timing(device, small: bool) -> dict:
    from qpeft.plugins.quantizers.nf4 import NF4

    shapes = SMOL * (2 if small else 30)
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(s, generator=gen).mul_(0.02) for s in shapes]
    out = {}
    for name, values in (("nf4", {}), ("nf4:icq=true", {"icq": True})):
        quantizer = NF4.from_values({"compute_dtype": "bfloat16", **values})
        start, total = None, 0.0
        for w in weights:
            linear = nn.Linear(w.shape[1], w.shape[0], bias=False, device=device)
            with torch.no_grad():
                linear.weight.copy_(w)
            sync(device)
            start = time.perf_counter()
            quantizer.quantize_linear(linear)
            sync(device)
            total += time.perf_counter() - start
        out[name] = {"seconds": total, "layers": len(shapes), "weights": sum(w.numel() for w in weights)}
        print(name, out[name], flush=True)
    return out


def iec_check(device) -> list[dict]:
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.model.tiny import random_llama
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default

    rows = []
    for dtype in ("float32", "bfloat16"):
        model = random_llama(vocab_size=1000, seed=5)
        quantizer = build_plugin("quantizer", f"nf4:icq=true:compute_dtype={dtype}", default())
        quantizer.quantize_model(model, device=device)
        composition = compose("lora:r=8+iec")
        composition.attach(model)
        batch = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(3)).to(device)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-2)
        model.train()
        for _ in range(3):
            optimizer.zero_grad()
            model(batch).logits.float().logsumexp(-1).mean().backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            adapted = model(batch).logits.float()
            merged = composition.method.merge(copy.deepcopy(model)).to(device)
            plain = merged(batch).logits.float()
        betas = [p.item() for n, p in model.named_parameters() if "beta" in n]
        rows.append({"dtype": dtype, "max_abs_logit_diff": (adapted - plain).abs().max().item(),
                     "logit_scale": adapted.abs().max().item(), "mean_abs_beta": sum(map(abs, betas)) / len(betas)})
        print(rows[-1], flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--small", action="store_true", help="2 copies of the 7 shapes instead of 30")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    result = {"device": torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device,
              "layers": layer_checks(args.device), "timing": timing(args.device, args.small),
              "iec": iec_check(args.device)}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
