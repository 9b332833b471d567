"""Every road from a finished run to a deployable model (issue 21 item 4; docs/deploy.md's table).

    trained         the adapter on the run's nf4 base (qpeft eval's rebuild)
    merged fp16     qpeft export RUN --merge --dtype float16
    nf4 from Ŵ+ΔW   the merged model re-quantized to nf4 (before issue 21: the fine-tune rounds away)
    nf4 from W+ΔW   qpeft export RUN --merge --quant nf4               (plain rounding)
    nf4 GPTQ        qpeft export RUN --merge --quant nf4 --calibrate N
    q4_0 GGUF       qpeft export RUN --format gguf --gguf-type q4_0 [--calibrate N]
    base + LoRA     qpeft export RUN --format gguf --no-merge --gguf-type q8_0  +  --format gguf-lora

For each: size on disk of what the export writes, peak RSS of a process that loads it and runs
it, perplexity on the run's validation split (the run's evaluator), and tokens/s of greedy
generation through transformers (32 new tokens after a chat prompt, one warm-up). Each road runs
in its own process (``--child``) so peak memory is its own. The nf4 roads load as ``qpeft run
--model DIR --quant nf4`` does (streamed, quantized as read); transformers dequantizes a GGUF file
to float32 on load, so a GGUF road's tokens/s and memory are float32 figures (llama.cpp runs
the file quantized). Base + LoRA: the base GGUF read by transformers with the run's adapter
attached unmerged by PEFT — the same A, B and scale as the GGUF adapter
(tests/test_export_gguf.py checks the GGUF pair against the merged model).

    python benchmarks/deploy_roads.py --run RUN_DIR --out /tmp/roads --calibrate 8 --json roads.json
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Which is larger, 9.11 or 9.9?"
NEW_TOKENS = 32
ROADS = ["trained", "merged fp16", "nf4 from Ŵ+ΔW", "nf4 from W+ΔW", "nf4 GPTQ", "q4_0 GGUF", "q4_0 GGUF GPTQ",
         "q8_0 base + GGUF LoRA"]


def qpeft(*args) -> None:
    subprocess.run([sys.executable, "-m", "qpeft", *map(str, args)], check=True)


def exports(run: Path, out: Path, n: int) -> dict:
    """What each road loads (written once; an existing output is kept)."""
    from qpeft.core.compare import requant

    paths = {"trained": run, "merged fp16": out / "merged-fp16", "nf4 from Ŵ+ΔW": out / "nf4-from-merged",
             "nf4 from W+ΔW": out / "nf4", "nf4 GPTQ": out / "nf4-gptq", "q4_0 GGUF": out / "q4_0.gguf",
             "q4_0 GGUF GPTQ": out / "q4_0-gptq.gguf", "q8_0 base + GGUF LoRA": out / "base-q8_0.gguf"}
    steps = {"merged fp16": ["--merge", "--dtype", "float16"], "nf4 from W+ΔW": ["--merge", "--quant", "nf4"],
             "nf4 GPTQ": ["--merge", "--quant", "nf4", "--calibrate", n],
             "q4_0 GGUF": ["--format", "gguf", "--gguf-type", "q4_0"],
             "q4_0 GGUF GPTQ": ["--format", "gguf", "--gguf-type", "q4_0", "--calibrate", n],
             "q8_0 base + GGUF LoRA": ["--format", "gguf", "--no-merge", "--gguf-type", "q8_0"]}
    for road, flags in steps.items():
        if not paths[road].exists():
            qpeft("export", run, *flags, "--out", paths[road])
    if not paths["nf4 from Ŵ+ΔW"].exists():
        requant.export(run, paths["nf4 from Ŵ+ΔW"], requant.check_spec("nf4"), "nf4", road="Ŵ+ΔW")
    for extra, flags in ((out / "adapter.gguf", ["--format", "gguf-lora"]), (out / "adapter-peft", [])):
        if not extra.exists():
            qpeft("export", run, *flags, "--out", extra)
    return paths


def disk_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def load(road: str, path: Path, run: Path, out: Path):
    """``(model, tokenizer)`` as a user of that road runs it."""
    import torch
    from transformers import AutoModelForCausalLM

    if road == "trained":
        from qpeft.core.run.rebuild import rebuild

        built = rebuild(run)
        return built.model, built.tokenizer
    if road.startswith("nf4"):
        from qpeft.core.compare.requant import check_spec
        from qpeft.core.model import streaming

        model, tokenizer, _ = streaming.load_quantized(str(path), check_spec("nf4"), "cpu")
        return model.eval(), tokenizer
    from qpeft.core.model import models
    from qpeft.core.run.record import RunRecord

    tokenizer = models.load_tokenizer(RunRecord.read(run).model)     # the run's own tokenizer
    if road == "merged fp16":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float16).eval(), tokenizer
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    if road.endswith("LoRA"):
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, out / "adapter-peft").eval()
    return model, tokenizer


def child(road: str, run: Path, out: Path, path: Path) -> dict:
    """One road's figures, measured in this process."""
    import torch

    from qpeft.core.compare import requant

    cfg, plan, chosen, _ = requant.validation(run)
    model, tokenizer = load(road, path, run, out)
    value = requant.quality_value(cfg, plan, chosen, model, tokenizer, road)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                        return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)
        started = time.perf_counter()
        model.generate(ids, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
        seconds = time.perf_counter() - started
    return {"perplexity": value, "tokens_per_s": NEW_TOKENS / seconds,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a finished run directory")
    parser.add_argument("--out", type=Path, default=Path("/tmp/roads"), help="where the exports go")
    parser.add_argument("--calibrate", type=int, default=8, help="GPTQ's training batches [default: 8]")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.run, args.out, args.path)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    paths = exports(args.run, args.out, args.calibrate)
    rows = {}
    for road in ROADS:
        done = subprocess.run([sys.executable, __file__, "--run", str(args.run), "--out", str(args.out),
                               "--child", road, "--path", str(paths[road])], check=True, capture_output=True, text=True)
        rows[road] = json.loads(done.stdout.strip().splitlines()[-1])
        extra = args.out / "adapter.gguf" if road.endswith("LoRA") else None
        rows[road]["disk_mb"] = (disk_mb(args.run / "adapter") if road == "trained"
                                 else disk_mb(paths[road]) + (disk_mb(extra) if extra else 0))
        print(f"{road:<24} {rows[road]['disk_mb']:8.1f} MiB  peak {rows[road]['peak_rss_mb']:7.0f} MiB  "
              f"ppl {rows[road]['perplexity']:8.3f}  {rows[road]['tokens_per_s']:6.2f} tok/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
