#!/usr/bin/env bash
# The CPU-scale benchmark (target: under 60 minutes on 2 cores, quiet machine):
# Fashion-MNIST-LT at IF 100 and IF 10, ResNet-32, seeds 0 1 2; joint CE with SWA (stage 2 on
# SWA and on final-SGD features: NCM, cRT, tau-norm, LWS, SRepr, SWAG-BMA) and joint
# logit-adjusted (Balanced Softmax) as a baseline. Then:
#   python benchmarks/summarize_cpu_scale.py runs/cpu-scale
set -euo pipefail
OUT=${1:-runs/cpu-scale}
LT=${LONGTAIL:-.venv/bin/longtail}
EPOCHS100=${EPOCHS100:-16}
EPOCHS10=${EPOCHS10:-8}    # 8 (was 10) keeps the whole run under 60 minutes on 2 cores
for IF in 100 10; do
  if [ "$IF" = 100 ]; then E=$EPOCHS100; else E=$EPOCHS10; fi
  common=(data.imbalance=$IF optim.epochs=$E swa.start=$((E * 5 / 8)))
  "$LT" sweep fashion_mnist_lt "${common[@]}" --seeds 0 1 2 --out "$OUT/if$IF-ce"
  "$LT" sweep fashion_mnist_lt "${common[@]}" loss.name=logit_adjusted swa.enabled=false \
    --seeds 0 1 2 --method joint --out "$OUT/if$IF-la"
done
echo "done: $OUT"
