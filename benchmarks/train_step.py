"""One training step, qpeft beside Hugging Face PEFT: tokens/s, peak memory, trainable
parameters and the fraction of the machine's bf16 matmul rate, on the same model, batch,
rank and optimizer.

    parent: bf16 matmul rate (2048³) ─▶ for each repeat: for each row: PEFT and qpeft, the
            order alternating ─▶ python train_step.py --child ROW TOOL … (a fresh process each)
    child:  imports ─▶ load (+ quantize) ─▶ attach adapter ─▶ reset VmHWM ─▶ warm-up steps
            ─▶ reset GPU peaks ─▶ timed steps ─▶ one JSON line (median step s, peaks, loss …)

Rows are QUANT-METHOD: none (bf16), nf4 (NF4 + double quant) or hqq (4-bit, qpeft only:
PEFT over HQQ needs transformers' HqqConfig, which transformers 5 refuses) × lora, rslora,
dora, ia3; ``--big-model DIR`` adds big-nf4-lora. qpeft: ``streaming.load_quantized`` +
``compose(spec).attach`` + one ``Trainer._optimizer_step`` per step (the trainer's step: loss,
backward, optimizer, schedule; no logging, evaluation or checkpoint). PEFT:
``from_pretrained`` (bf16, or ``BitsAndBytesConfig`` nf4) + ``get_peft_model`` + a plain loop
(forward with labels, backward, AdamW step, zero_grad). Both: AdamW lr 1e-4, weight decay 0,
no clipping, dropout 0, fp32 adapter weights, bf16 autocast on CUDA only. ``--dtype auto``
(the default) is qpeft's own choice for the machine: float32 on CPUs without AVX-512 BF16/AMX,
where torch's bf16 matmul runs at about 1 GFLOP/s (see docs/benchmarks.md).

Step FLOPs = 4 × (weights of every linear layer, output projection included) × tokens:
forward 2, backward to the activations 2; frozen weights need no weight gradient. Adapter
arithmetic, attention scores and the first layer's skipped input gradient are left out.
The reference rate is an n³ matmul (n = 2048) in the compute dtype, measured by the parent.

    python benchmarks/train_step.py [--rows none-lora,nf4-dora] [--repeats 3] [--steps 5]
                                    [--big-model /tmp/llama-1b] [--json out.json]
"""
import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

QUANTS = ("none", "nf4", "hqq")
METHODS = ("lora", "rslora", "dora", "ia3")
DEFAULT_ROWS = [f"{q}-{m}" for q in ("none", "nf4") for m in METHODS]
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_NA = "n/a: PEFT over HQQ needs transformers' HqqConfig; transformers 5 raises NotImplementedError"
GB = 1e9


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def qpeft_spec(method: str, r: int, alpha: float) -> str:
    lora = f"r={r}:alpha={alpha}:dropout=0"
    return {"lora": f"lora:{lora}", "rslora": f"lora:{lora}+rslora", "dora": f"dora:{lora}",
            "ia3": "ia3"}[method]   # its defaults: k, v, down; down scaled at its input


def peft_config(method: str, r: int, alpha: float):
    from peft import IA3Config, LoraConfig

    if method == "ia3":
        return IA3Config(task_type="CAUSAL_LM", target_modules=["k_proj", "v_proj", "down_proj"],
                         feedforward_modules=["down_proj"])
    return LoraConfig(task_type="CAUSAL_LM", r=r, lora_alpha=alpha, lora_dropout=0.0,
                      target_modules=LINEARS, use_rslora=method == "rslora", use_dora=method == "dora")


class OneBatch:
    """The trainer's batch source, always giving the same batch."""

    def __init__(self, batch: dict):
        self.b = batch

    def num_batches(self, size: int) -> int:
        return 1

    def batch(self, epoch, index, size, rank=0, world=1) -> dict:
        return self.b


def qpeft_step(a, quant, method, batch, device):
    """qpeft's model and a function running one optimizer step of its Trainer."""
    from qpeft.core.plugin import registry
    from qpeft.core.model import streaming
    from qpeft.core.kinds.adapter import compose
    from qpeft.core.train.trainer import TrainConfig, Trainer, seed_everything

    reg = registry.default()
    quantizer = reg.get("quantizer", quant).from_values({"compute_dtype": a.dtype})
    adapter = compose(qpeft_spec(method, a.r, a.alpha), reg)
    model = streaming.load_quantized(a.model, quantizer, device,   # as qpeft run's pipeline.load
                                     keep_source=adapter.needs_source_weights,
                                     float32_activations=adapter.needs_float32_activations,
                                     cache=False)[0]   # quantized here, as PEFT's row does (load peak)
    seed_everything(0)
    adapter.attach(model)
    cfg = TrainConfig(steps=a.warmup + a.steps, batch_size=a.batch, lr=a.lr, weight_decay=0.0,
                      max_grad_norm=0.0, save_every=0, eval_every=0, progress=False)
    trainer = Trainer(model, OneBatch(batch), cfg, tempfile.gettempdir(), device,  # never written
                      hooks=[quantizer, *adapter.parts])
    model.train()

    def step() -> float:
        for hook in trainer.hooks:   # as Trainer._loop, less logging/evaluation/checkpoints
            hook.on_step_begin(trainer.step, model)
        loss, _ = trainer._optimizer_step()
        trainer.step += 1
        return loss
    return model, step


def peft_step(a, quant, method, batch, device):
    """PEFT's model and a function running one step of a plain training loop."""
    import contextlib

    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, a.dtype)
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    if quant == "nf4":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, **kwargs)
    torch.manual_seed(0)
    model = get_peft_model(model, peft_config(method, a.r, a.alpha))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=a.lr, weight_decay=0.0)
    cast = (torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda"
            else contextlib.nullcontext())   # as qpeft's memory.autocast

    def step() -> float:
        with cast:
            loss = model(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()
    return model, step


def child(a) -> dict:
    """Load, attach, train ``warmup + steps`` steps in this (fresh) process; the facts."""
    import torch
    import transformers  # noqa: F401  (imported before the clock by both tools)

    device = torch.device(a.device)
    row, tool = a.child
    quant, method = row.removeprefix("big-").split("-")
    with open(os.path.join(a.model, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=torch.Generator().manual_seed(a.seed))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    started = time.perf_counter()
    model, step = (qpeft_step if tool == "qpeft" else peft_step)(a, quant, method, batch, device)
    out = {"load_s": time.perf_counter() - started, "load_peak": _status("VmHWM"),
           "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
           "threads": torch.get_num_threads(), "losses": [], "steps_s": []}
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")                 # VmHWM := VmRSS now, so the next peak is training's
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for i in range(a.warmup + a.steps):
        if i == a.warmup and device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        sync()
        t = time.perf_counter()
        out["losses"].append(step())
        sync()
        if i >= a.warmup:
            out["steps_s"].append(time.perf_counter() - t)
    out["step_s"] = statistics.median(out["steps_s"])
    out["train_peak"] = _status("VmHWM")
    out["peak"] = max(out["load_peak"], out["train_peak"])
    if device.type == "cuda":
        out["gpu_reserved"] = torch.cuda.max_memory_reserved(device)
        out["gpu_allocated"] = torch.cuda.max_memory_allocated(device)
    return out


def matmul_gflops(device: str, dtype: str, n: int = 2048, repeats: int = 5, budget_s: float = 10):
    """(GFLOP/s, runs): median of ``x @ y``, n³, after one warm-up; stops after ``budget_s``
    (a slow bf16 CPU path takes a minute per product: then the one run is the figure)."""
    import torch

    x, y = (torch.randn(n, n, device=device, dtype=getattr(torch, dtype)) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times = []
    while len(times) <= repeats and sum(times) < budget_s:
        sync()
        t = time.perf_counter()
        x @ y
        sync()
        times.append(time.perf_counter() - t)
    timed = times[1:] or times
    return 2 * n**3 / statistics.median(timed) / 1e9, len(timed)


def linear_weights(directory: str) -> int:
    """Elements of every nn.Linear weight (lm_head included), from config.json on meta."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(directory))
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def machine(device: str) -> str:
    import peft
    import torch
    import transformers

    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout if shutil.which("lscpu") else ""
    cpu = next((x.split(":", 1)[1].strip() for x in lscpu.splitlines() if x.startswith("Model name")),
               platform.processor())
    flags = next((x.split() for x in lscpu.splitlines() if x.startswith("Flags")), [])
    bf16 = ", ".join(f for f in ("avx512_bf16", "amx_bf16") if f in flags) or "no AVX-512 BF16/AMX"
    gpu = f", GPU {torch.cuda.get_device_name()}" if device == "cuda" else ""
    return (f"{cpu} ({bf16}), {os.cpu_count()} cores, torch threads {torch.get_num_threads()}{gpu}; torch "
            f"{torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")


def run_child(row: str, tool: str, a, model: str) -> dict:
    args = [sys.executable, __file__, "--child", row, tool, "--model", model, "--device", a.device]
    for k in ("batch", "seq", "steps", "warmup", "r", "alpha", "lr", "seed", "dtype"):
        args += [f"--{k}", str(getattr(a, k))]
    out = subprocess.run(args, capture_output=True, text=True)
    if out.returncode:
        lines = [x for x in out.stderr.strip().splitlines() if x.strip()]
        return {"error": (lines or ["exit status %d" % out.returncode])[-1][:160]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def summary(runs: list, tokens: int) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return None
    rates = [tokens / r["step_s"] for r in ok]
    s = {"n": len(ok), "tps": statistics.median(rates), "lo": min(rates), "hi": max(rates),
         "step_s": statistics.median(r["step_s"] for r in ok),
         "train_peak": max(r["train_peak"] for r in ok), "peak": max(r["peak"] for r in ok),
         "trainable": ok[0]["trainable"], "loss1": ok[0]["losses"][0]}
    if "gpu_reserved" in ok[0]:
        s["gpu"] = (max(r["gpu_reserved"] for r in ok), max(r["gpu_allocated"] for r in ok))
    return s


def table(results: dict, a, flops: dict, rate: float) -> str:
    gpu = a.device == "cuda"
    head = ["row", "tool", "tokens/s median (min–max)", "step s", "train peak RSS",
            "process peak RSS", *(["GPU peak reserved / allocated"] if gpu else []),
            "trainable", "qpeft ÷ PEFT tokens/s", "qpeft ÷ PEFT train RSS", f"of {a.dtype} rate", "loss @1"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, tools in results.items():
        tokens = a.batch * a.seq
        s = {t: summary(runs, tokens) for t, runs in tools.items()}
        for tool in ("PEFT", "qpeft"):
            runs, v = tools.get(tool), s.get(tool)
            if v is None:
                why = PEFT_NA if runs is None else "fails: " + runs[0]["error"]
                lines.append(f"| {row} | {tool} | {why} |" + " |" * (len(head) - 3))
                continue
            p = s.get("PEFT") if tool == "qpeft" else None
            ratio = (f"{v['tps'] / p['tps']:.2f}", f"{v['train_peak'] / p['train_peak']:.2f}") if p else ("", "")
            g = [f"{v['gpu'][0] / GB:.2f} / {v['gpu'][1] / GB:.2f} GB"] if gpu else []
            lines.append(" | ".join([
                f"| {row}", tool, f"{v['tps']:.0f} ({v['lo']:.0f}–{v['hi']:.0f}), n={v['n']}",
                f"{v['step_s']:.2f}", f"{v['train_peak'] / GB:.2f} GB", f"{v['peak'] / GB:.2f} GB",
                *g, f"{v['trainable'] / 1e6:.2f} M", *ratio,
                f"{flops[row] / v['step_s'] / 1e9 / rate:.1%}", f"{v['loss1']:.4f} |"]))
    return "\n".join(lines)


def checks(results: dict, a) -> list:
    """Initial-loss agreement per row (B = 0 / unit IA3 vectors: both are the base model),
    and qpeft's DoRA step over its LoRA step per quantizer."""
    out = []
    s = {(row, t): summary(runs, a.batch * a.seq) for row, tools in results.items() for t, runs in tools.items()}
    for row in results:
        q, p = s.get((row, "qpeft")), s.get((row, "PEFT"))
        if q and p:
            out.append(f"loss at step 1, {row}: qpeft {q['loss1']:.5f}, PEFT {p['loss1']:.5f}, "
                       f"|Δ| {abs(q['loss1'] - p['loss1']):.2e}")
    for quant in QUANTS:
        lora, dora = s.get((f"{quant}-lora", "qpeft")), s.get((f"{quant}-dora", "qpeft"))
        if lora and dora:
            out.append(f"qpeft DoRA step ÷ LoRA step, {quant}: {dora['step_s'] / lora['step_s']:.2f}")
    return out


def main() -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default=",".join(DEFAULT_ROWS),
                    help="QUANT-METHOD list; QUANT none, nf4, hqq (qpeft only; its solver takes "
                         "minutes per load on CPU), METHOD lora, rslora, dora, ia3")
    for flag, kind, default, text in [
            ("repeats", int, 3, "fresh processes per row and tool"),
            ("steps", int, 5, "timed steps per process"), ("warmup", int, 2, "untimed steps first"),
            ("batch", int, 8, "sequences per step"), ("seq", int, 128, "tokens per sequence"),
            ("r", int, 16, "LoRA rank"), ("alpha", float, 32.0, "LoRA α"), ("lr", float, 1e-4, "AdamW"),
            ("seed", int, 0, "seed of the random token batch")]:
        ap.add_argument(f"--{flag}", type=kind, default=default, help=text)
    ap.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                    help="compute dtype of both tools; auto: qpeft's choice for this machine "
                         "(bfloat16 on CUDA and on CPUs with AVX-512 BF16/AMX, else float32)")
    ap.add_argument("--model", help="model directory (default: the embedded SmolLM2-135M)")
    ap.add_argument("--big-model", help="directory of benchmarks/make_random_llama.py's model: adds big-nf4-lora")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--json", help="write the raw numbers here")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a)))
        return
    if a.dtype == "auto":
        from qpeft.core.kinds.quantizer import native_dtype

        a.dtype = native_dtype()
    if a.model is None:
        from qpeft.core.model import models

        a.model = str(models.resolve(None))
    rows = [r.strip() for r in a.rows.split(",") if r.strip()]
    for row in rows:
        q, _, m = row.partition("-")
        if q not in QUANTS or m not in METHODS:
            ap.error(f"unknown row '{row}': write QUANT-METHOD, QUANT in {QUANTS}, METHOD in {METHODS}")
    dirs = dict.fromkeys(rows, a.model) | ({"big-nf4-lora": a.big_model} if a.big_model else {})
    rows = list(dirs)
    info = machine(a.device)
    print(f"machine: {info}", flush=True)
    rate, n = matmul_gflops(a.device, a.dtype)
    fp32 = f"; float32 {matmul_gflops(a.device, 'float32')[0]:.0f}" if a.dtype != "float32" else ""
    print(f"matmul 2048³: {a.dtype} {rate:.1f} GFLOP/s (median of {n}){fp32}", flush=True)
    tokens = a.batch * a.seq
    weights = {d: linear_weights(d) for d in set(dirs.values())}
    flops = {row: 4 * weights[dirs[row]] * tokens for row in rows}
    results = {row: {"qpeft": []} if row.startswith("hqq") else {"PEFT": [], "qpeft": []} for row in rows}
    for i in range(a.repeats):
        for j, row in enumerate(rows):
            tools = list(results[row])
            for tool in tools if (i + j) % 2 == 0 else tools[::-1]:
                if results[row][tool] and "error" in results[row][tool][0]:
                    continue           # a failure repeats itself: run it once
                r = run_child(row, tool.lower(), a, dirs[row])
                results[row][tool].append(r)
                print(f"run {i + 1} {row} {tool}: " + (r["error"] if "error" in r else
                      f"{r['step_s']:.2f} s/step, train peak {r['train_peak'] / GB:.2f} GB, "
                      f"loss@1 {r['losses'][0]:.4f}, load {r['load_s']:.0f} s"), flush=True)
    print(f"\n{', '.join(sorted(set(dirs.values())))}: batch {a.batch} × {a.seq} tokens, r={a.r}, "
          f"α={a.alpha:g}, AdamW lr {a.lr:g}, {a.dtype}, {a.warmup} warm-up + {a.steps} timed "
          f"steps per process, {a.repeats} repeat(s), device {a.device}")
    print("step FLOPs = 4 × linear weights × tokens: " + ", ".join(
        f"4 × {w / 1e6:.1f} M × {tokens}" for w in weights.values()) + "\n")
    print(table(results, a, flops, rate))
    if any(r.startswith("hqq") for r in rows):
        print(f"\nhqq rows, PEFT: {PEFT_NA}")
    print("\n" + "\n".join(checks(results, a)))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": info, "matmul_gflops": rate, "args": vars(a), "flops": flops,
                       "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
