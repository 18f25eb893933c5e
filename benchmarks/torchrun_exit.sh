#!/usr/bin/env bash
# How often does a 2-process gloo job die at exit? Runs SCRIPT under torchrun N times and counts
# the runs with a non-zero exit or "terminate called without an active exception" (the SIGABRT
# of docs/DISTRIBUTED.md, "Exiting cleanly"). Extra arguments go to the script.
# Usage: bash benchmarks/torchrun_exit.sh N SCRIPT [ARGS...]
set -u
N=$1; script=$2; shift 2
PY=${PYTHON:-.venv/bin/python}
export OMP_NUM_THREADS=1
bad=0
log=$(mktemp)
for i in $(seq 1 "$N"); do
  "$PY" -m torch.distributed.run --standalone --nproc_per_node=2 "$script" "$@" > "$log" 2>&1
  rc=$?
  if [ $rc -ne 0 ] || grep -q "terminate called without an active exception" "$log"; then
    bad=$((bad + 1))
    echo "run $i: exit $rc, $(grep -c 'terminate called without' "$log") worker(s) aborted"
  fi
done
rm -f "$log"
echo "$bad of $N runs failed ($script, $(date -u +%FT%TZ))"
