#!/usr/bin/env bash
# GPU busy time per decode token of each method, as a host that keeps up with the GPU would see it:
# Nsight Compute times every kernel of one decode step (32 layers, Llama-3-8B shapes, random
# weights, thresholds for 50%) at free-running clocks with the caches left as the previous kernel
# left them (no flush), and ncu_decode_sum.py adds them up by kernel kind.
#   bash benchmarks/gpu_busy.sh OUTDIR [BITS]     (BITS 4 or 8: quantized, sparse kernels on)
#   METHODS="dense chess" bash benchmarks/gpu_busy.sh OUTDIR   (a subset; default: dense chess chess-attn teal)
# About 80 s per method on an H100 (most of it building the random 8B model and warming up).
# Kernels run one at a time under Nsight, so launch gaps and overlap are not counted.
set -euo pipefail
out=${1:?usage: gpu_busy.sh OUTDIR [BITS]}
bits=${2:-0}
mkdir -p "$out"
tag=$([ "$bits" = 0 ] && echo fp16 || echo "q$bits")
for m in ${METHODS:-dense chess chess-attn teal}; do
  CHESS_MLX_QUANT_KERNELS=$([ "$bits" = 0 ] && echo 0 || echo 1) \
    ncu --profile-from-start off --clock-control none --cache-control none --metrics gpu__time_duration.sum --csv \
    python3 benchmarks/nsys_decode.py --method "$m" --tokens 2 --bits "$bits" > "$out/ncu_busy_${tag}_$m.csv" 2> "$out/ncu_busy_${tag}_$m.err"
  echo "== $tag $m"
  python3 benchmarks/ncu_decode_sum.py "$out/ncu_busy_${tag}_$m.csv" | sed -n 1,8p
done
