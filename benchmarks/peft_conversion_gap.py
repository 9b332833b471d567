"""What a PEFT user gets from an adapter whose init rewrote the base, trained over nf4 (issue 19, item 4).

CorDA, LoRA-GA and PiSSA with ``niter`` > 0: qpeft serves quant(W − s·B₀·A₀) + s·B·A; the PEFT files
hold the rank-2r LoRA ΔW = s·(B·A − B₀·A₀) over the original W, exact over a full-precision base, but
over a quantized one PEFT adds ΔW to quant(W), which is not quant(W − s·B₀·A₀) + s·B₀·A₀. PiSSA
(exact SVD) and OLoRA write ``init_lora_weights: "pissa"``/``"olora"`` and a rank-r file: PEFT reruns
the init on whatever base it is given (PiSSA refuses a bitsandbytes one). LoftQ writes a plain LoRA:
PEFT adds s·B·A to the base it is given. For each init the adapter is (calibrated and) trained
(AdamW, seeded) over qpeft's nf4 (compute dtype float32), saved, and loaded four ways:

    qpeft      qpeft.load_adapter over nf4: the rewritten base rebuilt (what qpeft eval serves)
    fp32       PeftModel.from_pretrained over the float32 original
    nf4+PEFT   the two PEFT files alone imported into qpeft over its nf4 of W (W kept for an init that
               needs it, as ``qpeft eval DIR --quant nf4`` does)
    bnb        PeftModel.from_pretrained over transformers + bitsandbytes nf4 (float32 compute,
               double quantization as qpeft's nf4 unless --no-bnb-double-quant)

Each row: perplexity on held-out tokens, max |Δlogit| / max |logit| and mean KL against qpeft's.

    python benchmarks/peft_conversion_gap.py                      # tiny random model, seconds
    python benchmarks/peft_conversion_gap.py --model embedded     # SmolLM2-135M-Instruct, text batches
    python benchmarks/peft_conversion_gap.py --inits "pissa;pissa:niter=4;olora;loftq"
"""
import argparse
import copy
import dataclasses
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from init_error import perplexity, text_batches   # noqa: E402


def random_batches(count: int, seed: int, rows: int = 4, length: int = 24, vocab: int = 1000) -> list:
    g, out = torch.Generator().manual_seed(seed), []
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, length), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def train(model, batches, steps: int, lr: float) -> None:
    torch.manual_seed(0)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    for step in range(steps):
        model(**batches[step % len(batches)]).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@torch.no_grad()
def compare(ours, other, held) -> dict:
    ours.eval(), other.eval()
    worst, kl, n = 0.0, 0.0, 0
    for b in held:
        x, y = ours(input_ids=b["input_ids"]).logits.float(), other(input_ids=b["input_ids"]).logits.float()
        worst = max(worst, ((x - y).abs().max() / x.abs().max()).item())
        p, q = x.log_softmax(-1), y.log_softmax(-1)
        kl += (p.exp() * (p - q)).sum(-1).mean().item()
        n += 1
    return {"ppl": perplexity(other, held), "rel_logit": worst, "kl": kl / n}


def bnb_base(saved: Path, double_quant: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
                                bnb_4bit_use_double_quant=double_quant)
    return AutoModelForCausalLM.from_pretrained(saved, quantization_config=config, device_map="cpu",
                                                torch_dtype=torch.float32)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny")
    parser.add_argument("--inits", default="corda;corda:mode=kpm;lora-ga", help="';'-separated init modifiers")
    parser.add_argument("--r", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--no-bnb", action="store_true", help="skip transformers + bitsandbytes")
    parser.add_argument("--bnb-double-quant", action=argparse.BooleanOptionalAction, default=True,
                        help="bitsandbytes' double quantization, as qpeft's nf4 (default: on)")
    args = parser.parse_args(argv)
    import peft

    from qpeft import load_adapter
    from qpeft.core.plugin.build import build_plugin
    from qpeft.core.plugin.registry import default
    from qpeft.testing import adapt

    if args.model == "tiny":
        from qpeft.testing import tiny_model

        reference = tiny_model(vocab_size=1000)
        calibration, held = random_batches(4, 3), random_batches(2, 5)
    else:
        from qpeft.core.model.models import load_model

        reference, tokenizer = load_model(None, dtype=torch.float32)
        calibration = text_batches(tokenizer, ["README.md", "docs/adapters.md"], 4)
        held = text_batches(tokenizer, ["docs/quantizers.md"], 2)
    work = Path(tempfile.mkdtemp(prefix="qpeft-conversion-"))
    reference.save_pretrained(work / "base")
    print(f"{args.model}: original float32 ppl {perplexity(reference, held):.4f}", flush=True)
    quant = "nf4:compute_dtype=float32"
    for init in args.inits.split(";"):
        spec = f"lora:r={args.r}:alpha={2 * args.r}:dropout=0+{init}"
        if any(f.name == "calibration_batches" for f in dataclasses.fields(default().get("adapter", init.split(":")[0]).Options)):
            spec += f":calibration_batches={len(calibration)}"
        ours, composition = adapt(reference, spec, quantizer=quant, calibration=calibration)
        train(ours, calibration, args.steps, args.lr)
        saved, files = work / init.replace(":", "_"), work / (init.replace(":", "_") + "-peft")
        composition.method.save(ours, saved)
        files.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            shutil.copy(saved / name, files / name)
        again = copy.deepcopy(reference)
        build_plugin("quantizer", quant, default()).quantize_model(again, keep_source=True)
        load_adapter(again, saved)
        plain = copy.deepcopy(reference)
        build_plugin("quantizer", quant, default()).quantize_model(plain, keep_source=True)   # as qpeft eval DIR
        load_adapter(plain, files)
        config = json.loads((files / "adapter_config.json").read_text())
        print(f"{init}: init_lora_weights {config['init_lora_weights']!r}, r {config['r']}", flush=True)
        rows = {"qpeft": lambda: again, "fp32": lambda: peft.PeftModel.from_pretrained(copy.deepcopy(reference), files),
                "nf4+PEFT": lambda: plain}
        if not args.no_bnb:
            rows["bnb"] = lambda: peft.PeftModel.from_pretrained(bnb_base(work / "base", args.bnb_double_quant), files)
        for label, build in rows.items():
            try:
                model = build()
            except Exception as e:   # PEFT refuses PiSSA over a bitsandbytes base
                print(f"{init:16s} {label:8s} fails: {type(e).__name__}: {str(e).splitlines()[0]}", flush=True)
                continue
            m = compare(ours, model, held)
            print(f"{init:16s} {label:8s} ppl {m['ppl']:10.4f}  max|Δlogit|/max|logit| {m['rel_logit']:.2e}  "
                  f"KL {m['kl']:.2e}", flush=True)
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
