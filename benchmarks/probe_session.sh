#!/usr/bin/env bash
# All of a probe session in one GPU call, for when machines are scarce (session 24): the probes,
# the candidate picked by pick_variant.py's written rule, its gemv timing, then its whole check
# with whatever time is left of BUDGET seconds (default 560); a weight type whose check does not
# finish in time is reported as not finished, never as passed.
#   bash benchmarks/probe_session.sh OUTDIR [PARTS]   (PARTS as sparse_input_probes.sh; default long,rounds)
set -uo pipefail
out=${1:?usage: probe_session.sh OUTDIR [PARTS]}
budget=${BUDGET:-560}
mkdir -p /root/probes "$out"
bash benchmarks/sparse_input_probes.sh /root/probes "${2:-long,rounds}"
cp /root/probes/*.txt "$out"/
python3 benchmarks/pick_variant.py /root/probes > /root/probes/variant
echo "elapsed ${SECONDS}s"
left=$((budget - SECONDS - 110))
[ "$left" -gt 120 ] || { echo "candidate $(cat /root/probes/variant): no time left to time or check it"; exit 0; }
TIME_TIMEOUT=100 CHECK_TIMEOUT=$((left - 100)) SKIP_SHIPPED_TIMING=1 bash benchmarks/variant_followup.sh "$out"
