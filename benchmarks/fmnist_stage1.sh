#!/usr/bin/env bash
# Fashion-MNIST-LT IF100, ResNet-32: bf16 vs fp32 (3 seeds each), then every stage-2 method.
# Usage: bash benchmarks/fmnist_stage1.sh [OUT=runs/bench-fmnist] ; then
#        python benchmarks/summarize_fmnist.py runs/bench-fmnist
# More seeds into the same folder: SEEDS="3 4 5" bash benchmarks/fmnist_stage1.sh OUT
set -euo pipefail
OUT=${1:-runs/bench-fmnist}
LT=${LONGTAIL:-.venv/bin/longtail}
mkdir -p "$OUT"
for precision in bf16 fp32; do
  for seed in ${SEEDS:-0 1 2}; do
    run="$OUT/$precision-s$seed"
    if [ -f "$run/stage1.json" ]; then continue; fi
    resume=()
    [ -f "$run/config.yaml" ] && resume=(--resume "$run")
    /usr/bin/time -f "%e s wall" -o "$run.time" \
      "$LT" train fashion_mnist_lt seed=$seed precision=$precision \
      ${resume[@]+"${resume[@]}"} $( [ ${#resume[@]} -eq 0 ] && echo --out "$run" ) \
      > "$run.log" 2>&1 || { mkdir -p "$run"; echo "failed: $run"; exit 1; }
  done
done
for run in "$OUT"/bf16-s*; do
  [ -d "$run" ] || continue
  [ -f "$run/results.json" ] && continue
  "$LT" classify "$run" --method all > "$run/classify.log" 2>&1
done
echo "done: $OUT"
