"""Time one forward+backward step of qpeft's DoRA layer against a naive full-weight DoRA.

The naive version dequantizes W and forms W + s·B·A (out×in) every step to take its row
norms, as PEFT does; qpeft's uses ‖W_i‖² + 2s·B_i·(A·W_iᵀ) + s²·B_i·(A·Aᵀ)·B_iᵀ (see plugins/adapters/dora.py).

    python benchmarks/dora_step.py [--out 1536 --in 576 --tokens 2048 --r 16 --dtype float32 --threads 1]
"""
import argparse
import time

import torch


def naive_forward(layer, x):
    """PEFT-style DoRA: materialise W + s·B·A, norm it per row, detach the norm."""
    weight = layer.base.dequantize().to(x.dtype)
    lora = layer.lora_B @ layer.lora_A
    norm = (weight + layer.scaling * lora.detach()).norm(dim=1).detach()
    scale = layer.lora_magnitude_vector / norm
    return scale * (x @ weight.t() + layer.scaling * (x @ layer.lora_A.t()) @ layer.lora_B.t())


def step_seconds(fn, layer, x) -> float:
    """Seconds of one forward+backward step."""
    layer.zero_grad(set_to_none=True)
    start = time.perf_counter()
    fn(x).float().pow(2).mean().backward()
    if x.is_cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_steps(fns: list, layer, x, repeats: int) -> list[float]:
    """Median seconds per step of each function, interleaved (so allocator and CPU-load
    drift hit all alike), after two warm-up rounds."""
    times = [[] for _ in fns]
    for i in range(repeats + 2):
        for fn, out in zip(fns, times):
            seconds = step_seconds(fn, layer, x)
            if i >= 2:
                out.append(seconds)
    return [sorted(t)[len(t) // 2] for t in times]


def main() -> None:
    from torch import nn

    from qpeft.core.plugin import registry
    from qpeft.core.base import spec
    from qpeft.plugins.adapters.dora import DoRALinear

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--in", dest="in_features", type=int, default=576)
    ap.add_argument("--out", type=int, default=1536)
    ap.add_argument("--tokens", type=int, default=2048, help="batch × sequence length")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--quant", default="none", help="quantizer spec for the frozen weight (none, nf4, …)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    linear = nn.Linear(args.in_features, args.out, bias=False).to(args.device)
    (name, values), = spec.parse(args.quant)
    quantizer = registry.get("quantizer", name).from_values({"compute_dtype": args.dtype, **values})
    base = quantizer.quantize_linear(linear)
    layer = DoRALinear(base, args.r, scaling=2.0, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.02)
    layer.finish_init()
    x = torch.randn(args.tokens, args.in_features, device=args.device, dtype=getattr(torch, args.dtype))
    with torch.no_grad():
        diff = (layer(x).float() - naive_forward(layer, x).float()).abs().max().item()
    ours, naive = time_steps([layer, lambda t: naive_forward(layer, t)], layer, x, args.repeats)
    print(f"layer {args.out}×{args.in_features}, {args.tokens} tokens, r={args.r}, {args.dtype}, "
          f"quantizer {args.quant}, {args.device}, {torch.get_num_threads()} thread(s)")
    print(f"  qpeft DoRA  {ours * 1e3:8.2f} ms/step")
    print(f"  naive DoRA  {naive * 1e3:8.2f} ms/step   ({naive / ours:.2f}× ours)")
    print(f"  max |ours − naive| output: {diff:.2e}")


if __name__ == "__main__":
    main()
