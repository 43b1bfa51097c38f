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
# A check that fails does not stop the others: each failure (its exit status and the end of its log) is written
# into gpu_check.{json,md} with whatever the other checks measured, and then the script exits 1.
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
BENCH=${BENCH:-1}                               # 1: gl-ray bench, Tables 1-3 (bench.json)
TRAIN=${TRAIN:-1}                               # 1: the Ray-free GrowLength training run (train_summary.json)
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
mkdir -p "$OUT" "$WORK/logs"
rm -rf "$WORK/runs" "$WORK/bench" "$WORK"/logs/*
rm -f "$WORK"/{fsdp,loss,sync,checkpoint,induction}.json "$WORK/failed.tsv"
rm -f "$OUT"/{env.txt,bench.log,bench.json,train.log,train_summary.json,metrics.jsonl,gpu_check.json,gpu_check.md}
touch "$OUT/bench.log" "$OUT/train.log"

# step NAME LOG CMD...: run one check, its output to the terminal, to $WORK/logs/NAME.log and appended to LOG. A
# failure is recorded in $WORK/failed.tsv (name, exit status, log) for the summary, and the script goes on.
step() {
    local name=$1 log=$2 rc=0
    shift 2
    "$@" 2>&1 | tee "$WORK/logs/$name.log" | tee -a "$log" || rc=$?
    if [ "$rc" != 0 ]; then
        printf '%s\t%s\t%s\n' "$name" "$rc" "$WORK/logs/$name.log" >> "$WORK/failed.tsv"
        echo "[gpu_check] $name failed (exit status $rc); going on with the other checks" >&2
    fi
}
# The checks below run inside `step`'s pipeline, where `set -e` does not apply: each chains its commands with &&.

step env "$OUT/env.txt" $PY -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"

prepare() {  # only if DATA has no dataset yet
    [ -f "$DATA/manifest.json" ] || $PY -m gl_ray prepare --source stdlib --out "$DATA" --no-ray \
        --tokenizer "$TOKENIZER" --val-fraction 0.02
}
if [ "$TRAIN" = 1 ] || [ "$FSDP" = 1 ] || { [ "$BENCH" = 1 ] && [ "$DOC_MASKING" = 1 ]; }; then
    step prepare /dev/null prepare
fi

bench() {
    local flags=(--attention "$ATTENTION")
    [ "$COMPILE" = 1 ] && flags+=(--compile)
    [ "$DOC_MASKING" = 1 ] && flags+=(--document-masking --data "$DATA")
    [ "$ACT_CKPT" = 1 ] && flags+=(--activation-checkpointing)
    $PY -m gl_ray bench --preset "$PRESET" --lengths "$LENGTHS" --device "$DEVICE" --dtype "$DTYPE" \
        --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens "$MICRO_BATCH_TOKENS" --steps "$STEPS" \
        --warmup 3 --memory-micro-batch 8 ${BUDGET:+--memory-budget "$BUDGET"} "${flags[@]}" --out "$WORK/bench" \
        && cp "$WORK"/bench/bench-*.json "$OUT/bench.json"
}
[ "$BENCH" = 1 ] && step bench "$OUT/bench.log" bench

train() {
    local rc=0
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
        --set "optim.warmup_tokens=$((TRAIN_TOKENS / 30))" --set "data.eval_tokens=$EVAL_TOKENS" || rc=$?
    # the metrics of a run that failed too: they show how far it got
    [ -f "$WORK/runs/gpu-check/metrics.jsonl" ] && cp "$WORK/runs/gpu-check/metrics.jsonl" "$OUT/metrics.jsonl"
    [ "$rc" = 0 ] || return "$rc"
    cp "$WORK/runs/gpu-check/summary.json" "$OUT/train_summary.json"
}
[ "$TRAIN" = 1 ] && step train "$OUT/train.log" train

[ "$FSDP" = 1 ] && step fsdp_check "$OUT/train.log" \
    $PY -m benchmarks.fsdp_check --data "$DATA" --preset "$PRESET" --seq-len "$FSDP_SEQ_LEN" \
    --tokens-per-step "$TOKENS_PER_STEP" --micro-batch-tokens "$MICRO_BATCH_TOKENS" --steps "$FSDP_STEPS" \
    --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/fsdp.json"
[ "$LOSS_CHECK" = 1 ] && step loss_memory "$OUT/bench.log" \
    $PY -m benchmarks.loss_memory --preset "$PRESET" --seq-len "$LOSS_SEQ_LEN" --seqs "$LOSS_SEQS" --budget "" \
    --device "$DEVICE" --precision "$DTYPE" --out "$WORK/loss.json"
[ "$SYNC_CHECK" = 1 ] && step sync_check "$OUT/train.log" \
    $PY -m benchmarks.sync_check --final-len "$SYNC_LEN" --device "$DEVICE" --dtype "$DTYPE" --out "$WORK/sync.json"
[ "$CKPT_CHECK" = 1 ] && step checkpoint_block "$OUT/train.log" \
    $PY -m benchmarks.checkpoint_block --preset "$CKPT_PRESET" --repeats "$CKPT_REPEATS" --device "$DEVICE" \
    --dir "$WORK/ckpt" --out "$WORK/checkpoint.json"
# shellcheck disable=SC2086  # INDUCTION_ARGS is a list of flags
[ "$INDUCTION_CHECK" = 1 ] && step induction_probe "$OUT/train.log" \
    $PY -m benchmarks.induction_probe $INDUCTION_ARGS --device "$DEVICE" --dtype "$DTYPE" \
    --out "$WORK/induction.json"

# The summary of whatever the checks left, and of each failure: written even when checks failed.
summary_flags=(--data "$DATA" --preset "$PRESET" --failed "$WORK/failed.tsv" --out "$OUT/gpu_check")
[ -f "$OUT/bench.json" ] && summary_flags+=(--bench "$OUT/bench.json")
[ -f "$OUT/train_summary.json" ] && summary_flags+=(--train "$OUT/train_summary.json")
for key in fsdp loss sync checkpoint induction; do
    if [ -f "$WORK/$key.json" ]; then summary_flags+=("--$key" "$WORK/$key.json"); fi
done
if ! $PY -m benchmarks.gpu_check_summary "${summary_flags[@]}"; then  # then at least the list of failures
    printf 'gpu_check_summary\t1\t-\n' >> "$WORK/failed.tsv"
    { echo "gpu_check_summary failed; the checks that failed (name, exit status, log):"; echo; echo '```'
      cat "$WORK/failed.tsv"; echo '```'; } > "$OUT/gpu_check.md"
    echo "{\"failed\": [$(cut -f1 "$WORK/failed.tsv" | sed 's/.*/"&"/' | paste -sd, -)]}" > "$OUT/gpu_check.json"
fi
if [ -s "$WORK/failed.tsv" ]; then
    echo "[gpu_check] failed: $(cut -f1 "$WORK/failed.tsv" | paste -sd ' ' -) (see $OUT/gpu_check.md)" >&2
    exit 1
fi
