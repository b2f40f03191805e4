#!/usr/bin/env bash
# The shipped kernels' confirmation in one GPU call, for a session that changed them without device
# time left to check them (session 26): every weight type's whole check side by side, the split
# launch's tile width (chain_sweep.py --only splitw; 27-29 s on a machine that ran it before, over
# 70 s the first time on session 31's H200, so it gets 120 s), then kernels.py's gemv timings with what is
# left of BUDGET seconds (default 570). A part that does not finish is reported, never passed.
#   bash benchmarks/confirm_shipped.sh OUTDIR        (on the GPU machine, MLX's CUDA backend staged)
# Writes OUTDIR/check.tgz (check_all_wtypes.sh's files), OUTDIR/splitw.txt, OUTDIR/gemv.{txt,json}.
set -uo pipefail
out=${1:?usage: confirm_shipped.sh OUTDIR}
budget=${BUDGET:-570}
mkdir -p "$out" /root/check
CHECK_TIMEOUT=${CHECK_TIMEOUT:-320} bash benchmarks/check_all_wtypes.sh /root/check shipped
rc=$?
tar czf "$out/check.tgz" -C /root/check .
echo "check done at ${SECONDS}s (rc $rc)"
PYTHONFAULTHANDLER=1 timeout -s ABRT 120 python3 benchmarks/chain_sweep.py --only splitw > "$out/splitw.txt" 2>&1 \
  || echo "splitw failed or timed out (rc $?)"
cat "$out/splitw.txt"
left=$((budget - SECONDS))
if [ "$left" -gt 60 ]; then
  PYTHONFAULTHANDLER=1 timeout -s ABRT "$left" python3 benchmarks/kernels.py --quick --skip-check --benches gemv \
    --json "$out/gemv.json" > "$out/gemv.txt" 2>&1 || echo "gemv timing did not finish (rc $?)"
  grep -E "^(copy|sparse_in)" "$out/gemv.txt"
else
  echo "gemv timing: no time left (${left}s)"
fi
exit $rc
