#!/usr/bin/env bash
# Every kernel checked against the reference for every weight type, one process per type side by
# side (each process spends most of its time compiling kernels on the CPU; one process for all six
# types takes ~15 min on an H100 host, side by side they take ~3-5 min):
#   bash benchmarks/check_all_wtypes.sh OUTDIR [TAG]
# KERNELS="benchmarks/variant_check.py VARIANT kernels" checks a probe variant instead (variant_check.py).
# Writes OUTDIR/check_<type>[_TAG].{txt,json} (kernels.py --skip-bench) and prints each type's
# verdict; exits non-zero if any type failed or did not finish.
set -uo pipefail
out=${1:?usage: check_all_wtypes.sh OUTDIR [TAG]}
tag=${2:+_$2}
mkdir -p "$out"
types="float16 bfloat16 q4g64 q4g32 q8g64 q8g32"
for w in $types; do
  PYTHONFAULTHANDLER=1 timeout -s ABRT "${CHECK_TIMEOUT:-560}" python3 ${KERNELS:-benchmarks/kernels.py} --skip-bench --wtypes "$w" \
    --json "$out/check_${w}${tag}.json" > "$out/check_${w}${tag}.txt" 2>&1 &
done
rc=0
for job in $(jobs -p); do wait "$job" || rc=1; done
for w in $types; do
  f="$out/check_${w}${tag}.txt"  # a run that stopped says why in its last line (session 25: a refused variant)
  echo "== $w: $(grep -E '^correctness' "$f" || echo "did not finish: $(tail -n 1 "$f")")"
  grep -E "FAIL|Error|Traceback" "$out/check_${w}${tag}.txt" | head -5
done
exit $rc
