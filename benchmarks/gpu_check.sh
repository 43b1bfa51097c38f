#!/usr/bin/env bash
# One short GPU check on a machine without Ray: `gl-ray bench` (the paper's Tables 1-3) and a few hundred
# optimizer steps of the Ray-free training loop, all written under $OUT.
#   OUT=/tmp/out bash benchmarks/gpu_check.sh                       # on the GPU machine (defaults below)
#   OUT=/tmp/out DEVICE=cpu PRESET=tiny LENGTHS=64,128 STEPS=4 TRAIN_TOKENS=65536 BUDGET= bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to an output folder}
DEVICE=${DEVICE:-cuda}
PRESET=${PRESET:-pythia-160m}
LENGTHS=${LENGTHS:-128,256,512,1024,2048}
STEPS=${STEPS:-10}
BUDGET=${BUDGET-100GiB}                 # Table 3 memory budget; empty: skip Table 3
TRAIN_TOKENS=${TRAIN_TOKENS:-78643200}  # 300 steps of 262,144 tokens
PY=${PY:-python}
mkdir -p "$OUT"
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"

$PY -m gl_ray bench --preset "$PRESET" --lengths "$LENGTHS" --device "$DEVICE" --dtype bf16 \
    --tokens-per-step 262144 --micro-batch-tokens 65536 --steps "$STEPS" --warmup 3 --memory-micro-batch 8 \
    ${BUDGET:+--memory-budget "$BUDGET"} --out "$OUT/bench" 2>&1 | tee "$OUT/bench.log"

# the Ray-free loop: a GrowLength run of the preset on the stdlib corpus (prepared here without Ray)
[ -f "$OUT/data/manifest.json" ] || $PY -m gl_ray prepare --source stdlib --out "$OUT/data" --no-ray \
    --val-fraction 0.02 2>&1 | tail -1 | tee "$OUT/prepare.log"
$PY -m gl_ray train --config "pipelines/configs/${PRESET}-growlength.yaml" --no-ray \
    --set "name=gpu-check" --set "data.path=$OUT/data" --set "ray.storage_path=$OUT/runs" \
    --set "model.preset=$PRESET" --set "schedule.lengths=${TRAIN_LENGTHS:-[128,256,512,1024]}" \
    --set "model.max_position_embeddings=2048" \
    --set "schedule.ratios=[0.25,0.25,0.25,0.25]" --set "schedule.tokens_per_step=262144" \
    --set "schedule.budget_tokens=$TRAIN_TOKENS" --set "train.micro_batch_tokens=65536" \
    --set "train.log_every_steps=10" --set "train.eval_every_tokens=0" --set "train.checkpoint_every_tokens=0" \
    --set "train.device=$DEVICE" --set "optim.warmup_tokens=2621440" --set "data.eval_tokens=65536" \
    2>&1 | tee "$OUT/train.log"
cp "$OUT/runs/gpu-check/summary.json" "$OUT/train_summary.json"
echo "gpu check done: $OUT/bench/*.json, $OUT/train_summary.json"
