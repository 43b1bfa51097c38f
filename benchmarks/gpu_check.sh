#!/usr/bin/env bash
# One short GPU check that needs no Ray (the GPU machine has none): `gl-ray bench` (the paper's Tables 1-3), a
# few hundred optimizer steps of the Ray-free GrowLength loop with the micro batch chosen per stage
# (train.micro_batch_tokens: auto), FSDP2 in one process against the unsharded model (benchmarks/fsdp_check.py),
# the peak memory of a micro batch with the stock vs the chunked loss (benchmarks/loss_memory.py), host syncs in
# steps that do not log under torch.cuda.set_sync_debug_mode("error") for every position mode x masking x backend x
# schedule mode (benchmarks/sync_check.py), and how long a checkpoint holds the loop up, device-to-host copy vs
# write (benchmarks/checkpoint_block.py), and whether a model learns to retrieve by content at a GPU's budget
# (benchmarks/induction_probe.py; none did on the project's CPU), folded into $OUT/gpu_check.{json,md}.
#
#   OUT=/tmp/out bash benchmarks/gpu_check.sh          # on the GPU machine: pythia-160m, bf16, 128..2048, 300 steps
#
# Every size is an environment variable (defaults: the GPU run); DOC_MASKING=1 ACT_CKPT=1 (and ATTENTION=flex)
# measure the long-context path, e.g. with LENGTHS=512,...,8192 TRAIN_LENGTHS=[512,...,8192] MAX_POSITIONS=8192. tests/test_gpu_check.py runs this script on CPU
# with a tiny preset and Ray made unimportable. Data and runs go to $WORK; $OUT gets at most 8 small files:
# env.txt bench.log bench.json train.log train_summary.json metrics.jsonl gpu_check.json gpu_check.md.
# TOKENIZER: the default trains a BPE on the stdlib corpus; for Pythia's own vocab pass
# TOKENIZER=tests/fixtures/tokenizers/gpt-neox-20b (checked in).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?set OUT to an output folder}
WORK=${WORK:-/tmp/gl-ray-gpu-check}
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-bf16}
PRESET=${PRESET:-pythia-160m}
LENGTHS=${LENGTHS:-128,256,512,1024,2048}      # bench lengths
STEPS=${STEPS:-10}                              # timed bench steps per length
BUDGET=${BUDGET-100GiB}                         # Table 3 memory budget; empty: skip Table 3
TOKENS_PER_STEP=${TOKENS_PER_STEP:-262144}
MICRO_BATCH_TOKENS=${MICRO_BATCH_TOKENS:-65536}
TRAIN_LENGTHS=${TRAIN_LENGTHS:-[128,256,512,1024]}
TRAIN_TOKENS=${TRAIN_TOKENS:-78643200}          # 300 steps of 262,144 tokens
MAX_POSITIONS=${MAX_POSITIONS:-2048}
EVAL_TOKENS=${EVAL_TOKENS:-65536}               # validation tokens for the final eval
TOKENIZER=${TOKENIZER:-train:8192}
DATA=${DATA:-$WORK/data}                        # prepared here (no Ray) from the stdlib corpus if missing
COMPILE=${COMPILE:-0}                           # 1: torch.compile in Table 1 and training (adds minutes of compiling)
DOC_MASKING=${DOC_MASKING:-0}                   # 1: document masking in bench (the data's documents) and training
ACT_CKPT=${ACT_CKPT:-0}                         # 1: activation checkpointing in bench and training
ATTENTION=${ATTENTION:-sdpa}                    # sdpa | flex | flash_attention_2
TRAIN_MICRO_BATCH=${TRAIN_MICRO_BATCH:-auto}    # train.micro_batch_tokens of the training run (auto: per stage)
SCHEDULE_MODE=${SCHEDULE_MODE:-reshape}         # window: rows at the final length, a growing attention window
FSDP=${FSDP:-1}                                 # 1: FSDP2 check (one process, sharded vs unsharded, checkpoint)
FSDP_SEQ_LEN=${FSDP_SEQ_LEN:-1024}
FSDP_STEPS=${FSDP_STEPS:-20}
LOSS_CHECK=${LOSS_CHECK:-1}                     # 1: stock vs chunked loss, peak memory of one micro batch
LOSS_SEQ_LEN=${LOSS_SEQ_LEN:-2048}
LOSS_SEQS=${LOSS_SEQS:-8,32}                    # micro batches (sequences) measured, at vocab 50,304
SYNC_CHECK=${SYNC_CHECK:-1}                     # 1: host syncs per combination (tiny model, SYNC_LEN tokens)
SYNC_LEN=${SYNC_LEN:-1024}
CKPT_CHECK=${CKPT_CHECK:-1}                     # 1: loop blocked per checkpoint of CKPT_PRESET (vocab 50,304)
CKPT_PRESET=${CKPT_PRESET:-pythia-70m}
CKPT_REPEATS=${CKPT_REPEATS:-3}
INDUCTION_CHECK=${INDUCTION_CHECK:-1}           # 1: copies at log-uniform distances; steps until they are learned
INDUCTION_ARGS=${INDUCTION_ARGS:---preset pythia-14m --length 512 --span 16 --spans 8 --distance 16:480 --batch 64 --steps 3000 --log-every 250 --loss targets}
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK/runs" "$WORK/bench"

$PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda',
torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$OUT/env.txt"

[ -f "$DATA/manifest.json" ] || $PY -m gl_ray prepare --source stdlib --out "$DATA" --no-ray \
    --tokenizer "$TOKENIZER" --val-fraction 0.02 2>&1 | tail -3

bench_flags=(--attention "$ATTENTION")
[ "$COMPILE" = 1 ] && bench_flags+=(--compile)
[ "$DOC_MASKING" = 1 ] && bench_flags+=(--document-masking --data "$DATA")
[ "$ACT_CKPT" = 1 ] && bench_flags+=(--activation-checkpointing)
$PY -m gl_ray bench --preset "$PRESET" --lengths "$LENGTHS" --device "$DEVICE" --dtype "$DTYPE" \
    --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens "$MICRO_BATCH_TOKENS" --steps "$STEPS" --warmup 3 \
    --memory-micro-batch 8 ${BUDGET:+--memory-budget "$BUDGET"} "${bench_flags[@]}" \
    --out "$WORK/bench" 2>&1 | tee "$OUT/bench.log"
cp "$WORK"/bench/bench-*.json "$OUT/bench.json"
$PY -m gl_ray train --config "pipelines/configs/$PRESET-growlength.yaml" --no-ray \
    --set "name=gpu-check" --set "data.path=$DATA" --set "ray.storage_path=$WORK/runs" \
    --set "model.preset=$PRESET" --set "model.max_position_embeddings=$MAX_POSITIONS" \
    --set "schedule.lengths=$TRAIN_LENGTHS" --set "schedule.ratios=[]" \
    --set "schedule.tokens_per_step=$TOKENS_PER_STEP" --set "schedule.budget_tokens=$TRAIN_TOKENS" \
    --set "schedule.budget_time_s=0" --set "train.micro_batch_tokens=$TRAIN_MICRO_BATCH" \
    --set "schedule.mode=$SCHEDULE_MODE" \
    --set "train.device=$DEVICE" --set "train.precision=$DTYPE" --set "train.log_every_steps=10" \
    --set "train.compile=$([ "$COMPILE" = 1 ] && echo true || echo false)" --set "model.attention=$ATTENTION" \
    --set "data.document_masking=$([ "$DOC_MASKING" = 1 ] && echo true || echo false)" \
    --set "train.activation_checkpointing=$([ "$ACT_CKPT" = 1 ] && echo true || echo false)" \
    --set "train.eval_every_tokens=0" --set "train.checkpoint_every_tokens=0" \
    --set "optim.warmup_tokens=$((TRAIN_TOKENS / 30))" --set "data.eval_tokens=$EVAL_TOKENS" \
    2>&1 | tee "$OUT/train.log"
cp "$WORK/runs/gpu-check/summary.json" "$OUT/train_summary.json"
cp "$WORK/runs/gpu-check/metrics.jsonl" "$OUT/metrics.jsonl"
fsdp_flags=()
if [ "$FSDP" = 1 ]; then
    $PY -m benchmarks.fsdp_check --data "$DATA" --preset "$PRESET" --seq-len "$FSDP_SEQ_LEN" \
        --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens "$MICRO_BATCH_TOKENS" --steps "$FSDP_STEPS" \
        --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/fsdp.json" 2>&1 | tee -a "$OUT/train.log"
    fsdp_flags=(--fsdp "$WORK/fsdp.json")
fi
loss_flags=()
if [ "$LOSS_CHECK" = 1 ]; then
    $PY -m benchmarks.loss_memory --preset "$PRESET" --seq-len "$LOSS_SEQ_LEN" --seqs "$LOSS_SEQS" --budget "" \
        --device "$DEVICE" --precision "$DTYPE" --out "$WORK/loss_memory.json" 2>&1 | tee -a "$OUT/bench.log"
    loss_flags=(--loss "$WORK/loss_memory.json")
fi
more_flags=()
if [ "$SYNC_CHECK" = 1 ]; then
    $PY -m benchmarks.sync_check --final-len "$SYNC_LEN" --device "$DEVICE" --dtype "$DTYPE" \
        --out "$WORK/sync.json" 2>&1 | tee -a "$OUT/train.log"
    more_flags+=(--sync "$WORK/sync.json")
fi
if [ "$CKPT_CHECK" = 1 ]; then
    $PY -m benchmarks.checkpoint_block --preset "$CKPT_PRESET" --repeats "$CKPT_REPEATS" --device "$DEVICE" \
        --dir "$WORK/ckpt" --out "$WORK/checkpoint.json" 2>&1 | tee -a "$OUT/train.log"
    more_flags+=(--checkpoint "$WORK/checkpoint.json")
fi
if [ "$INDUCTION_CHECK" = 1 ]; then
    # shellcheck disable=SC2086  # INDUCTION_ARGS is a list of flags
    $PY -m benchmarks.induction_probe $INDUCTION_ARGS --device "$DEVICE" --dtype "$DTYPE" \
        --out "$WORK/induction.json" 2>&1 | tee -a "$OUT/train.log"
    more_flags+=(--induction "$WORK/induction.json")
fi
$PY -m benchmarks.gpu_check_summary --bench "$OUT/bench.json" --train "$OUT/train_summary.json" --data "$DATA" \
    "${fsdp_flags[@]}" "${loss_flags[@]}" "${more_flags[@]}" --out "$OUT/gpu_check"
