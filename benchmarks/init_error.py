"""The quantization error and the perplexity at init of the inits that rewrite the base (PiSSA,
CorDA, LoRA-GA; issue 19 item 4), on the embedded model over none, nf4 and hqq.

For each quantizer and init, every linear layer but the output head is quantized and adapted
as ``qpeft run`` does (``qpeft.testing.adapt``, compute dtype float32, the full-precision W kept
for the init), the calibrating inits seeing the same batches of real text (this repository's
docs, tokenized, 2 rows × 128 tokens each, labels = ids):

    error    ‖W − (deq(Q(W − s·B·A)) + s·B·A)‖ / ‖W‖ over all adapted layers together
             (for plain LoRA, B = 0: ‖W − deq(Q(W))‖ / ‖W‖)
    ppl      exp(mean loss) of the adapted model at init on held-out text (other docs)
    seconds  wall time of quantize + attach + calibrate (noisy on a shared machine)

    python benchmarks/init_error.py                                   # none;nf4;hqq × lora, pissa, corda, lora-ga
    python benchmarks/init_error.py --quant nf4 --inits "pissa;corda:mode=kpm" --json out.json
"""
import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def text_batches(tokenizer, files: list[str], count: int, rows: int = 2, length: int = 128) -> list:
    """``count`` batches of ``rows`` × ``length`` tokens, cut in order from ``files``."""
    ids = tokenizer("\n\n".join((ROOT / f).read_text() for f in files), return_tensors="pt")["input_ids"][0]
    need = count * rows * length
    if ids.numel() < need:
        raise SystemExit(f"{files} hold {ids.numel()} tokens, fewer than {need}")
    out = []
    for chunk in ids[:need].view(count, rows, length):
        out.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
    return out


@torch.no_grad()
def perplexity(model, batches) -> float:
    model.eval()
    return math.exp(sum(model(**b).loss.item() for b in batches) / len(batches))


def measure(reference, quant: str, init: str, calibration, held) -> dict:
    from qpeft import adapter_layers
    from qpeft.testing import adapt

    spec = "lora:r=16:alpha=32:dropout=0" + (f"+{init}" if init != "lora" else "")
    start = time.perf_counter()
    model, _ = adapt(reference, spec, quantizer=f"{quant}:compute_dtype=float32", calibration=calibration)
    seconds = time.perf_counter() - start
    err_sq = ref_sq = 0.0
    for name, layer in adapter_layers(model).items():
        w = reference.get_submodule(name).weight.detach().float()
        err_sq += (w - layer.merged_weight()).pow(2).sum().item()
        ref_sq += w.pow(2).sum().item()
    return {"quant": quant, "init": init, "rel_error": (err_sq / ref_sq) ** 0.5,
            "ppl": perplexity(model, held), "seconds": seconds}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quant", default="none;nf4;hqq", help="';'-separated quantizer specs")
    parser.add_argument("--inits", default="lora;pissa;corda;corda:mode=kpm;lora-ga",
                        help="';'-separated init modifiers ('lora': none, B = 0)")
    parser.add_argument("--batches", type=int, default=4, help="calibration batches (2 × 128 tokens each)")
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    from qpeft.core.model.models import load_model

    reference, tokenizer = load_model(None, dtype=torch.float32)   # the embedded SmolLM2-135M-Instruct, cached
    calibration = text_batches(tokenizer, ["README.md", "docs/adapters.md"], args.batches)
    held = text_batches(tokenizer, ["docs/quantizers.md"], 2)
    print(f"base ppl {perplexity(reference, held):.3f}", flush=True)
    rows = []
    for quant in args.quant.split(";"):
        for init in args.inits.split(";"):
            if init.split(":")[0] in ("corda", "lora-ga"):
                init = f"{init}:calibration_batches={args.batches}"
            rows.append(measure(reference, quant, init, calibration, held))
            r = rows[-1]
            print(f"{r['quant']:6s} {r['init']:45s} ‖W − Ŵ'‖/‖W‖ {r['rel_error']:.5f}  ppl {r['ppl']:.3f}  "
                  f"{r['seconds']:.1f} s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch_threads": torch.get_num_threads(), "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
