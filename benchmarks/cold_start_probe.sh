#!/usr/bin/env bash
# Cold-start probe for the first-process hang (RESULTS.md session 16 §7).
#
# Runs `chess-mlx bench ARGS` in N fresh processes one after another, each with an empty MLX PTX
# cache (MLX_PTX_CACHE_DIR) and the CUDA driver's cache off, so every process starts as cold as
# the first one on a freshly lent machine. A process still running after LIMIT_S seconds counts as
# stalled: its native and Python stacks are taken (py-spy --native from $PYSPY or
# .gpu_tools/py-spy, else gdb), then SIGABRT makes Python's faulthandler print the Python stacks,
# and the process is killed. The lent machine has neither tool: carry a py-spy binary (it is one
# static file in the py-spy wheel) in .gpu_tools/.
#
# usage: bash benchmarks/cold_start_probe.sh OUTDIR N LIMIT_S [bench args...]
# (several at once, each with its own OUTDIR, load the host and the GPU as a busy machine would)
# files: OUTDIR/runI.txt (bench output, Python stacks), OUTDIR/stacksI.txt (threads' CPU use, native stacks, if stalled)
set -u
out=$1; n=$2; limit=$3; shift 3
mkdir -p "$out"
for i in $(seq 1 "$n"); do
  cache=$(mktemp -d)
  t0=$(date +%s)
  MLX_PTX_CACHE_DIR=$cache CUDA_CACHE_DISABLE=1 PYTHONFAULTHANDLER=1 \
    python3 -u -m chess_mlx bench "$@" > "$out/run$i.txt" 2>&1 &
  pid=$!
  while kill -0 "$pid" 2>/dev/null && [ $(( $(date +%s) - t0 )) -lt "$limit" ]; do sleep 1; done
  if kill -0 "$pid" 2>/dev/null; then
    echo "STALLED: still running after ${limit} s" >> "$out/run$i.txt"
    ps -L -o tid,stat,pcpu,wchan:32,comm -p "$pid" > "$out/stacks$i.txt" 2>&1
    pyspy=${PYSPY:-.gpu_tools/py-spy}
    if [ -x "$pyspy" ]; then
      for k in 1 2; do timeout 60 "$pyspy" dump --native --pid "$pid" >> "$out/stacks$i.txt" 2>&1; sleep 2; done
    elif command -v gdb >/dev/null; then
      timeout 60 gdb -p "$pid" -batch -ex "set pagination off" -ex "thread apply all bt" >> "$out/stacks$i.txt" 2>&1
    else
      echo "no py-spy or gdb on this machine" >> "$out/stacks$i.txt"
    fi
    kill -ABRT "$pid"; sleep 5; kill -9 "$pid" 2>/dev/null
  fi
  wait "$pid"; rc=$?
  echo "process $i: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$out/summary.txt"
  rm -rf "$cache"
done
