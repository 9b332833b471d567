"""Peak memory and time of loading a model 4-bit: qpeft's streaming load, its old path, and
transformers + bitsandbytes, each in a fresh process, interleaved and repeated.

    for each repeat: for each method: python load_memory.py --child METHOD MODEL_DIR
        child: import → load and quantize → report VmHWM (peak RSS), VmRSS, seconds, bytes held

Methods: stream-nf4 (``qpeft.core.model.streaming.load_quantized``, nf4), stream-hqq4 (the same,
hqq 4-bit), old-nf4 (``models.load_model`` in float32, then ``quantize_model``), bnb
(``from_pretrained`` with ``BitsAndBytesConfig(load_in_4bit=True, nf4, double quant)``,
``device_map="cpu"``). The bound printed is the issue's target: bytes held + 2 × the largest
tensor in float32 + 0.6 GB. Make the model with benchmarks/make_random_llama.py:

    python benchmarks/make_random_llama.py /tmp/llama-1b
    python benchmarks/load_memory.py /tmp/llama-1b [--repeats 2] [--hqq-repeats 1]

Peaks are read from /proc/self/status (VmHWM), not ru_maxrss: a child's ru_maxrss starts
at its parent's RSS at fork.
"""
import argparse
import json
import struct
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("stream-nf4", "stream-hqq4", "old-nf4", "bnb")
GB = 1e9


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def child(method: str, directory: str) -> dict:
    """Load ``directory`` one way, in this (fresh) process; the facts as a dict."""
    import torch  # noqa: F401  (imports count for every method alike: before the clock)
    import transformers  # noqa: F401

    started = time.perf_counter()
    if method == "bnb":
        from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                    bnb_4bit_use_double_quant=True)
        model = AutoModelForCausalLM.from_pretrained(directory, quantization_config=config,
                                                     device_map="cpu")
        AutoTokenizer.from_pretrained(directory)
        held = model.get_memory_footprint()
    else:
        from qpeft.core.model import models, streaming
        from qpeft.core.plugin import registry
        from qpeft.core.kinds.quantizer import model_bytes

        name, values = ("hqq", {"nbits": 4}) if method == "stream-hqq4" else ("nf4", {})
        quantizer = registry.get("quantizer", name).from_values(values)
        if method == "old-nf4":
            model, _ = models.load_model(directory)
            quantizer.quantize_model(model)
        else:
            model = streaming.load_quantized(directory, quantizer, cache=False)[0]   # measures quantizing
        held = model_bytes(model)
    return {"seconds": time.perf_counter() - started, "peak": _status("VmHWM"),
            "after": _status("VmRSS"), "held": held}


def checkpoint_facts(directory: Path) -> dict:
    """Parameter count and largest tensor (elements), from the safetensors headers alone."""
    sizes = []
    for file in sorted(directory.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
        for key, entry in header.items():
            if key != "__metadata__":
                n = 1
                for d in entry["shape"]:
                    n *= d
                sizes.append(n)
    return {"parameters": sum(sizes), "largest": max(sizes)}


def run_child(method: str, directory: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", method, str(directory)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{method} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(results: dict, facts: dict) -> str:
    """One Markdown row per method: max peak and mean time over its runs."""
    ref = max(r["peak"] for r in results["bnb"]) if results.get("bnb") else None
    rows = ["| method | runs | peak RSS | bytes/param at peak | seconds | RSS after | "
            "peak ÷ bnb | held | bound (held + 2×largest fp32 + 0.6 GB) |",
            "|---|---|---|---|---|---|---|---|---|"]
    for method, runs in results.items():
        peak = max(r["peak"] for r in runs)
        seconds = sum(r["seconds"] for r in runs) / len(runs)
        after = max(r["after"] for r in runs)
        held = runs[0]["held"]
        bound = held + 2 * 4 * facts["largest"] + 0.6 * GB
        ratio = f"{peak / ref:.2f}" if ref else "—"
        rows.append(f"| {method} | {len(runs)} | {peak / GB:.2f} GB | "
                    f"{peak / facts['parameters']:.2f} | {seconds:.1f} | {after / GB:.2f} GB | "
                    f"{ratio} | {held / GB:.2f} GB | {bound / GB:.2f} GB |")
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", help="a model directory with safetensors weights")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--hqq-repeats", type=int, default=1,
                    help="hqq's solver is slow on CPU (minutes for 1 B weights): fewer runs")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.model)))
        return
    directory = Path(a.model)
    facts = checkpoint_facts(directory)
    methods = a.methods.split(",")
    results = {m: [] for m in methods}
    for i in range(a.repeats):
        for method in methods:
            if method == "stream-hqq4" and i >= a.hqq_repeats:
                continue
            r = run_child(method, directory)
            results[method].append(r)
            print(f"run {i + 1} {method}: peak {r['peak'] / GB:.2f} GB, {r['seconds']:.1f} s, "
                  f"after {r['after'] / GB:.2f} GB, held {r['held'] / GB:.2f} GB", flush=True)
    print(f"\n{directory}: {facts['parameters'] / 1e9:.3f} B parameters, largest tensor "
          f"{facts['largest'] / 1e6:.1f} M elements ({4 * facts['largest'] / GB:.2f} GB in float32)\n")
    print(table({m: r for m, r in results.items() if r}, facts))


if __name__ == "__main__":
    main()
