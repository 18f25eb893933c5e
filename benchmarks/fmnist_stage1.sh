#!/usr/bin/env bash
# Fashion-MNIST-LT IF100, ResNet-32: bf16 vs fp32 (3 seeds each), then every stage-2 method.
# Usage: bash benchmarks/fmnist_stage1.sh [OUT=runs/bench-fmnist] ; then
#        python benchmarks/summarize_fmnist.py runs/bench-fmnist
# More seeds into the same folder: SEEDS="3 4 5" bash benchmarks/fmnist_stage1.sh OUT
set -euo pipefail
OUT=${1:-runs/bench-fmnist}
LT=${LONGTAIL:-.venv/bin/longtail}
PY=${PYTHON:-$(dirname "$(command -v "$LT")")/python}  # the Python that runs $LT
# rundir RUN finished|resumable|classified: succeeds when that holds. longtail.core.rundir.RunDir
# decides, as it does for `longtail sweep` and `longtail demo`; it alone knows the run layout.
rundir() {
  local rc=0
  "$PY" - "$@" <<'EOF' || rc=$?
import sys
from longtail.core.rundir import RunDir
run, what = RunDir(sys.argv[1]), sys.argv[2]
sys.exit(0 if (run.results_path().is_file() if what == "classified" else getattr(run, what)) else 10)
EOF
  case $rc in 0 | 10) return "$rc" ;; *) echo "rundir $*: $PY failed ($rc)" >&2; exit 1 ;; esac
}
mkdir -p "$OUT"
for precision in bf16 fp32; do
  for seed in ${SEEDS:-0 1 2}; do
    run="$OUT/$precision-s$seed"
    if rundir "$run" finished; then continue; fi
    resume=()
    rundir "$run" resumable && resume=(--resume "$run")
    /usr/bin/time -f "%e s wall" -o "$run.time" \
      "$LT" train fashion_mnist_lt seed=$seed precision=$precision \
      ${resume[@]+"${resume[@]}"} $( [ ${#resume[@]} -eq 0 ] && echo --out "$run" ) \
      > "$run.log" 2>&1 || { mkdir -p "$run"; echo "failed: $run"; exit 1; }
  done
done
for run in "$OUT"/bf16-s*; do
  [ -d "$run" ] || continue
  rundir "$run" classified && continue
  "$LT" classify "$run" --method all > "$run/classify.log" 2>&1
done
echo "done: $OUT"
