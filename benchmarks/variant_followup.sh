#!/usr/bin/env bash
# The second half of a probe session on the same warm GPU machine (sparse_input_probes.sh first):
#   bash benchmarks/sparse_input_probes.sh /root/probes long,rounds && python3 benchmarks/pick_variant.py /root/probes > /root/probes/variant
#   bash benchmarks/variant_followup.sh OUTDIR          (next call, within the machine's warm time)
# Reads the candidate from /root/probes/variant (kept on the machine between calls); if there is
# one, times kernels.py's gemv set with the shipped kernels (unless SKIP_SHIPPED_TIMING) and with
# the candidate, then runs every weight type's whole check with the candidate (check_all_wtypes.sh
# through variant_check.py) and packs the check's files into OUTDIR/check.tgz (a call returns at
# most 8 files).
set -uo pipefail
out=${1:?usage: variant_followup.sh OUTDIR}
v=$(cat /root/probes/variant 2>/dev/null || echo none)
echo "candidate: $v"
case $v in shipped|none) exit 0 ;; esac
name=${v//+/-}
runs=(shipped "$v")
[ -z "${SKIP_SHIPPED_TIMING:-}" ] || runs=("$v")  # the probe already timed shipped beside it
for w in "${runs[@]}"; do
  f="$out/gemv_${w//+/-}.txt"
  PYTHONFAULTHANDLER=1 timeout -s ABRT "${TIME_TIMEOUT:-100}" python3 benchmarks/variant_check.py "$w" kernels --quick \
    --skip-check --benches gemv --json "${f%.txt}.json" > "$f" 2>&1 || echo "timing $w failed (rc $?)"
  grep -E "^(spin|sparse_in|spout|sparse_out)" "$f" | head -40
done
KERNELS="benchmarks/variant_check.py $v kernels" CHECK_TIMEOUT=${CHECK_TIMEOUT:-360} bash benchmarks/check_all_wtypes.sh /root/check "$name"
rc=$?
tar czf "$out/check.tgz" -C /root/check .
exit $rc
