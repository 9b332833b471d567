#!/usr/bin/env bash
# qpeft's GPU path, run for real: install qpeft beside the machine's own torch (no internet),
# write random Llama checkpoints, run `qpeft run` on CUDA for several quant × adapter
# combinations (one with bitsandbytes' paged 8-bit AdamW), and benchmarks/train_step.py's
# qpeft-vs-PEFT rows on CUDA. Produced the figures of docs/benchmarks.md, "On a GPU".
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh               # on the GPU machine
#   bash benchmarks/gpu_check.sh --device cpu                # the same logic at a tiny size, on CPU
#                                                            # (TINY=1; tests/test_gpu_check.py runs it)
#
# What it expects beside the repository (folder .whl/, ignored by git, carried to the GPU
# machine): the wheels that machine lacks (bitsandbytes, hqq, gguf, termcolor; see
# docs/benchmarks.md for the pip download command) and .whl/tok/ with the embedded model's
# tokenizer files (tokenizer.json, tokenizer_config.json, chat_template.jinja; from the
# converted model under ~/.cache/qpeft/models/). The embedded model's GGUF is too large to
# carry, so the models are random Llamas of SmolLM2-135M's and TinyLlama-1.1B's shapes
# (benchmarks/make_random_llama.py): speed and memory are those of the real shapes, losses
# and perplexities are meaningless.
#
# Environment: PY (python3), DEVICE (cuda), BUDGET (seconds for the whole script, 400:
# stages that would not fit are skipped), STEPS (40), WORK (/tmp/gpu_check),
# TINY=1 (a dry run on CPU: 2-layer model, 2 steps, device cpu), ONLY (space-separated stage
# names to run, e.g. "install model-135m run-nf4-dora"; default all), TS_ROWS (train_step.py's
# rows, none-lora,nf4-lora,nf4-dora), TS_BIG_ROWS (rows run beside big-nf4-lora, nf4-lora),
# SRC (the qpeft source tree to install, default the checkout).
# Every stage is bounded by `timeout`; a failed stage is reported and the next one runs; the
# script exits 1 if any stage failed (a stage skipped for lack of budget is not a failure), and
# ends with one table of the stages and one of the runs.
# Results: $OUT/log (everything), $OUT/summary.md, $OUT/results.tgz (report.json,
# metrics.jsonl, config.json of each run, train_step's JSON).

while [ $# -gt 0 ]; do
    case $1 in
        --device) [ "${2:-}" = cpu ] && TINY=1 TINY_DEVICE=cpu || DEVICE=${2:-cuda}; shift 2 ;;
        --device=*) [ "${1#--device=}" = cpu ] && TINY=1 TINY_DEVICE=cpu || DEVICE=${1#--device=}; shift ;;
        -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1'; use --device cuda (default) or --device cpu" >&2; exit 2 ;;
    esac
done
set -x
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 MPLBACKEND=Agg TOKENIZERS_PARALLELISM=false
PY=${PY:-python3}
OUT=${OUT:-/tmp/gpu_check_out}
WORK=${WORK:-/tmp/gpu_check}
BUDGET=${BUDGET:-400}
STEPS=${STEPS:-40}
DEVICE=${DEVICE:-cuda}
SITE=$WORK/site
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$OUT" "$WORK/runs"
exec > >(tee -a "$OUT/log") 2>&1
cd "$REPO" || exit 1

SMALL_SHAPE="--hidden 576 --layers 30 --intermediate 1536 --heads 9 --kv-heads 3 --tie"   # SmolLM2-135M
BIG_SHAPE=""                                                                            # defaults: TinyLlama 1.17 B
TS_ARGS="--repeats 1 --steps 10 --warmup 3 --batch 8 --seq 512"
BIG_STEPS=20
if [ "${TINY:-0}" = 1 ]; then
    SMALL_SHAPE="--hidden 64 --layers 2 --intermediate 128 --heads 4 --kv-heads 2 --tie"
    BIG_SHAPE="--hidden 128 --layers 2 --intermediate 256 --heads 4 --kv-heads 2"
    TS_ARGS="--repeats 1 --steps 1 --warmup 1 --batch 2 --seq 32"
    STEPS=2; BIG_STEPS=2; DEVICE=${TINY_DEVICE:-cpu}; TS_ROWS=${TS_ROWS:-nf4-dora}   # one row: the same logic
fi

T0=$SECONDS
FAILED=""
STAGES=""
# stage NAME MAX_SECONDS COMMAND...: run COMMAND under timeout, within what is left of BUDGET
stage() {
    local name=$1 max=$2 left=$((BUDGET - (SECONDS - T0))); shift 2
    if [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]]; then return 1; fi
    if [ $left -lt 25 ]; then echo "=== SKIPPED $name: ${left}s of the budget left"; return 1; fi
    [ "$max" -gt $((left - 10)) ] && max=$((left - 10))
    echo "=== STAGE $name (limit ${max}s) at $((SECONDS - T0))s"
    local t=$SECONDS rc=0
    timeout -k 5 "$max" "$@" || rc=$?
    [ $rc -ne 0 ] && echo "=== STAGE FAILED $name (rc $rc)" && FAILED="$FAILED $name"
    echo "=== END $name after $((SECONDS - t))s, rc $rc"
    STAGES="$STAGES|$name $((SECONDS - t)) $rc"
    collect
    return $rc
}
collect() {
    (cd "$WORK" && shopt -s nullglob && tar -czf "$OUT/results.tgz" ts-*.json runs/*/report.json \
        runs/*/metrics.jsonl runs/*/config.json 2>/dev/null)
}

# 0. the machine
[ "$DEVICE" = cpu ] || nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
$PY -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available() and torch.cuda.get_device_name())"
$PY -m pip list 2>/dev/null | grep -iE '^(torch|transformers|peft|accelerate|safetensors|bitsandbytes|hqq|gguf|pluggy|click|numpy|tokenizers|huggingface.hub|setuptools) '

# 1. install: the carried wheels and qpeft itself, --no-deps into $SITE (torch etc. stay the machine's)
# (without .whl/, as on CPU here: qpeft alone, the environment having the rest)
WHEELS=$(shopt -s nullglob; echo .whl/*.whl)
stage install 120 $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --no-cache-dir \
    --upgrade --target "$SITE" $WHEELS "${SRC:-.}"
[ -d "$SITE/qpeft/core" ] || exit 1   # installed now or by an earlier call with the same WORK
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} REPO
cd "$WORK" || exit 1   # not the checkout: python puts the current folder first, and its qpeft/ lacks qpeft.core
$PY -c "import qpeft, bitsandbytes, hqq, gguf, peft, transformers, accelerate; print('qpeft from', qpeft.__file__); print('bitsandbytes', bitsandbytes.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'accelerate', accelerate.__version__)"
$PY -m qpeft list 2>&1 | head -40

# 2. models: random Llamas with the embedded model's tokenizer (carried in .whl/tok)
cat > "$WORK/make_model.py" <<'EOF'
"""benchmarks/make_random_llama.py's writer, with the tokenizer copied from .whl/tok."""
import argparse, os, shutil, sys, time
from pathlib import Path
REPO = Path(os.environ["REPO"])
sys.path.insert(0, str(REPO / "benchmarks"))
import make_random_llama as m
ap = argparse.ArgumentParser()
ap.add_argument("out")
for k, v in (("hidden", 2048), ("layers", 22), ("intermediate", 5632), ("heads", 32), ("kv-heads", 4)):
    ap.add_argument("--" + k, type=int, default=v)
ap.add_argument("--tie", action="store_true")
a = ap.parse_args()
t = time.perf_counter()
carried = (REPO / ".whl/tok").is_dir()   # else (CPU here) the embedded model's, converted before
info = m.write_random_llama(a.out, 1e9, 0, tokenizer=not carried, hidden=a.hidden, layers=a.layers,
                            intermediate=a.intermediate, heads=a.heads, kv_heads=a.kv_heads, tie=a.tie)
for f in m.TOKENIZER_FILES if carried else ():
    if (REPO / ".whl/tok" / f).is_file():
        shutil.copy(REPO / ".whl/tok" / f, Path(a.out, f))
print(f"{a.out}: {info['parameters'] / 1e9:.3f} B parameters in {time.perf_counter() - t:.1f} s")
EOF
SMALL=$WORK/smol-135m
BIG=$WORK/llama-1b
stage model-135m 60 $PY "$WORK/make_model.py" "$SMALL" $SMALL_SHAPE

# 3. qpeft run on the device
qrun() {   # NAME MODEL STEPS FLAGS...
    local name=$1 model=$2 steps=$3; shift 3
    stage "run-$name" 100 $PY -m qpeft run --model "$model" --steps "$steps" --eval-limit 32 \
        --evaluators "perplexity;footprint" --log-every 5 --device "$DEVICE" \
        --output-dir "$WORK/runs" --name "$name" --overwrite "$@"
}
qrun nf4-lora "$SMALL" "$STEPS" --quant nf4 --adapter lora
qrun nf4-dora "$SMALL" "$STEPS" --quant nf4 --adapter dora
qrun nf4-lora-paged8 "$SMALL" "$STEPS" --quant nf4 --adapter lora --optimizer paged_adamw_8bit
# the methods that act during training or look at data first, and IR-QLoRA (session 7)
qrun nf4-lora-eva "$SMALL" "$STEPS" --quant nf4 --adapter lora+eva
qrun nf4-adalora "$SMALL" "$STEPS" --quant nf4 --adapter adalora
qrun nf4icq-lora-iec "$SMALL" "$STEPS" --quant nf4:icq=true --adapter lora+iec
# shipping: the merged model re-quantized to NF4 from W + ΔW, plain and with GPTQ over 8 batches
stage export-nf4 100 $PY -m qpeft export "$WORK/runs/nf4-lora" --merge --quant nf4 --out "$WORK/exp-nf4" --overwrite
stage export-nf4-gptq 150 $PY -m qpeft export "$WORK/runs/nf4-lora" --merge --quant nf4 --calibrate 8 \
    --out "$WORK/exp-nf4-gptq" --overwrite
(cd "$WORK" && for f in exp-*/export_report.json; do echo "== $f"; cat "$f"; done) || true
qrun nf4-mtlora "$SMALL" "$STEPS" --quant nf4 --adapter mtlora --task-sampling per-task
qrun nf4-lora-corda "$SMALL" "$STEPS" --quant nf4 --adapter lora+corda
# data-parallel with one process (torchrun: the process group, the all-reduce and rank 0's writes)
stage ddp-1 100 $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m qpeft run --model "$SMALL" \
    --steps "$STEPS" --eval-limit 32 --evaluators "perplexity;footprint" --log-every 5 --device "$DEVICE" \
    --output-dir "$WORK/runs" --name ddp1-nf4-lora --overwrite --quant nf4 --adapter lora
# the GGUF export (merged, q8_0), read back by transformers
stage export-gguf 100 $PY -m qpeft export "$WORK/runs/nf4-lora" --format gguf --gguf-type q8_0 \
    --out "$WORK/exp-nf4-lora-q8_0.gguf" --overwrite

# 4. qpeft vs PEFT, one step at a time (benchmarks/train_step.py, a fresh process per tool and row)
stage train-step 150 $PY "$REPO/benchmarks/train_step.py" --device "$DEVICE" --model "$SMALL" \
    --rows "${TS_ROWS:-none-lora,nf4-lora,nf4-dora}" $TS_ARGS --json "$WORK/ts-small.json"

qrun none-lora "$SMALL" "$STEPS" --quant none --adapter lora

# 5. the 1.17 B shape
if stage model-1b 60 $PY "$WORK/make_model.py" "$BIG" $BIG_SHAPE; then
    qrun big-nf4-lora "$BIG" "$BIG_STEPS" --quant nf4 --adapter lora
    stage train-step-big 120 $PY "$REPO/benchmarks/train_step.py" --device "$DEVICE" --model "$SMALL" \
        --rows "${TS_BIG_ROWS-nf4-lora}" --big-model "$BIG" $TS_ARGS --json "$WORK/ts-big.json"
fi

# 6. the other quantizers, if time is left
qrun hqq-lora "$SMALL" "$STEPS" --quant hqq --adapter lora
qrun int8-lora "$SMALL" "$STEPS" --quant int8 --adapter lora

# 7. summary of the runs
$PY - "$WORK/runs" <<'EOF' | tee "$OUT/summary.md"
import json, sys
from pathlib import Path
print("| run | steps | train s | tokens/s (report) | tokens/s at step 5 (cumulative: warm-up) | "
      "peak GPU reserved MB | peak GPU allocated MB | peak RSS MB | final loss |")
print("|---|---|---|---|---|---|---|---|---|")
for d in sorted(Path(sys.argv[1]).iterdir()):
    try:
        r = json.loads((d / "report.json").read_text())
    except (OSError, ValueError):
        print(f"| {d.name} | no report.json |||||||")
        continue
    f, t = r.get("facts", {}), r.get("training", {})
    rates = [json.loads(x).get("tokens_per_s") for x in (d / "metrics.jsonl").read_text().splitlines() if x.strip()]
    med = f"{rates[0]:.0f}" if rates and rates[0] else ""   # the trainer logs tokens/s since the start
    print(f"| {d.name} | {t.get('steps')} | {f.get('train_seconds')} | {f.get('tokens_per_s')} | {med} | "
          f"{f.get('peak_gpu_reserved_mb', '')} | {f.get('peak_gpu_allocated_mb', '')} | {f.get('peak_rss_mb')} | "
          f"{t.get('final_loss', 0):.4f} |")
EOF
collect
{ echo "| stage | seconds | rc |"; echo "|---|---|---|"
  echo "$STAGES" | tr '|' '\n' | while read -r n t r; do [ -n "$n" ] && echo "| $n | $t | $r |"; done; } | tee -a "$OUT/summary.md"
echo "=== DONE after $((SECONDS - T0))s${FAILED:+; FAILED:$FAILED}"
sleep 1   # let tee write the end of the log
[ -z "$FAILED" ]
