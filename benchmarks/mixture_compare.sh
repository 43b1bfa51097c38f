#!/usr/bin/env bash
# Two sources at fixed weights vs long-document upsampling in the last stage (issue 37; docs/RESULTS.md, "Two
# sources"): pipelines/configs/cpu-attention-mixture.yaml trained per arm, SEEDS seeds each (train.seed and
# data.seed = k), one after another; then every final model in OUT/runs evaluated on each source's val split at 512
# and 4096 (OUT/eval-stdlib.json, OUT/eval-prose.json) and `gl-ray report` of those runs. The arms:
#   fixed    the config as is: each source's stream in its own document order
#   natural  data.long_doc_boost=[1,1,1,1]: each source split into its long and short documents at their natural
#            shares, so the rows are drawn as the boosted arm draws them, without the boost (its control)
#   boost    data.long_doc_boost=[1,1,1,4]: documents of >= 4096 tokens 4x as often in the last stage
# A timed comparison: run it alone on the machine. Needs data/stdlib and data/mix/prose (see the config).
#
#   bash benchmarks/mixture_compare.sh          # OUT=results/mixture-14m TIME_S=150 SEEDS=2 ARMS="fixed natural boost"
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/mixture-14m}
TIME_S=${TIME_S:-150}
SEEDS=${SEEDS:-2}
ARMS=${ARMS:-fixed natural boost}
PY=${PY:-.venv/bin/python}
CONFIG=pipelines/configs/cpu-attention-mixture.yaml
for arm in $ARMS; do
  case $arm in
    fixed) sets=() ;;
    natural) sets=(--set "data.long_doc_boost=[1,1,1,1]") ;;
    boost) sets=(--set "data.long_doc_boost=[1,1,1,4]") ;;
    *) echo "mixture_compare.sh: unknown arm '$arm' (fixed | natural | boost)" >&2; exit 2 ;;
  esac
  for ((k = 0; k < SEEDS; k++)); do
    $PY -m gl_ray train --config $CONFIG --set name=mixture-$arm-s$k --set ray.storage_path=$OUT/runs \
      --set schedule.budget_time_s=$TIME_S --set train.seed=$k --set data.seed=$k "${sets[@]}"
  done
done
runs=("$OUT"/runs/mixture-*)
models=(); for r in "${runs[@]}"; do models+=(--model "$r/final"); done
for src in stdlib mix/prose; do
  $PY -m gl_ray eval "${models[@]}" --data data/$src --lengths 512,4096 --max-tokens 32768 --metrics none \
    --out "$OUT/eval-$(basename $src).json"
done
$PY -m gl_ray report "${runs[@]}" --out $OUT/report --baseline mixture-fixed-s0
