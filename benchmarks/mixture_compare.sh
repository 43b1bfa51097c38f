#!/usr/bin/env bash
# Two sources at fixed weights vs long-document upsampling in the last stage (issue 37; docs/RESULTS.md, "Two
# sources"): pipelines/configs/cpu-attention-mixture.yaml trained as is and with data.long_doc_boost=[1,1,1,4],
# SEEDS seeds each (train.seed and data.seed = k), one after another; then every final model evaluated on each
# source's val split at 512 and 4096 (OUT/eval-stdlib.json, OUT/eval-prose.json) and `gl-ray report` of the runs.
# A timed comparison: run it alone on the machine. Needs data/stdlib and data/mix/prose (see the config).
#
#   bash benchmarks/mixture_compare.sh                     # OUT=results/mixture-14m TIME_S=150 SEEDS=2
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-results/mixture-14m}
TIME_S=${TIME_S:-150}
SEEDS=${SEEDS:-2}
PY=${PY:-.venv/bin/python}
CONFIG=pipelines/configs/cpu-attention-mixture.yaml
runs=()
for arm in fixed boost; do
  for ((k = 0; k < SEEDS; k++)); do
    name=mixture-$arm-s$k
    boost=(); [[ $arm == boost ]] && boost=(--set "data.long_doc_boost=[1,1,1,4]")
    $PY -m gl_ray train --config $CONFIG --set name=$name --set ray.storage_path=$OUT/runs \
      --set schedule.budget_time_s=$TIME_S --set train.seed=$k --set data.seed=$k "${boost[@]}"
    runs+=("$OUT/runs/$name")
  done
done
models=(); for r in "${runs[@]}"; do models+=(--model "$r/final"); done
for src in stdlib mix/prose; do
  $PY -m gl_ray eval "${models[@]}" --data data/$src --lengths 512,4096 --max-tokens 32768 --metrics none \
    --out "$OUT/eval-$(basename $src).json"
done
$PY -m gl_ray report "${runs[@]}" --out $OUT/report --baseline mixture-fixed-s0
