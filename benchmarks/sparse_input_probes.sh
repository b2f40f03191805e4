#!/usr/bin/env bash
# The sparse-input probes prepared in session 23 (RESULTS.md), one after another in one GPU call
# (timings must not share the GPU, so they do not run side by side):
#   bash benchmarks/sparse_input_probes.sh OUTDIR [balance,long,long8,rounds]
# balance: spin_balance.py (what uneven split-K chunks cost); long / long8: chain_sweep.py --only
# spinlong with 4 / 8 rows in flight (float16 split-K chunks of 512-2048 rows); rounds:
# spin_rounds.py (ROUNDS_VARIANTS). Each writes OUTDIR/<part>.txt; a part that fails or runs past
# its time limit is reported and the next one still runs.
# H100 (RESULTS.md): session 24, none of balance, long and the float4 last-block sum (tail, since
# removed with the sum it edited) won; long8 not run. Session 25: u8, pfb, pfl and tailb lost,
# relatom won and was adopted. Session 26: the fixed-point split-K totals (redi) won and were adopted.
set -uo pipefail
out=${1:?usage: sparse_input_probes.sh OUTDIR [balance,long,long8,rounds]}
parts=${2:-balance,long,long8}
mkdir -p "$out"
rc=0
run() {  # name, time limit in seconds, command...
  local name=$1 limit=$2
  shift 2
  case ",$parts," in *",$name,"*) ;; *) return 0 ;; esac
  echo "== $name"
  PYTHONFAULTHANDLER=1 timeout -s ABRT "$limit" "$@" > "$out/$name.txt" 2>&1 || { echo "$name failed (rc $?)"; rc=1; }
  tail -n 40 "$out/$name.txt"
}
run balance 120 python3 benchmarks/spin_balance.py
run long 120 python3 benchmarks/chain_sweep.py --only spinlong
run long8 120 python3 benchmarks/chain_sweep.py --only spinlong --rows 8
run rounds 300 python3 benchmarks/spin_rounds.py --variants "${ROUNDS_VARIANTS:-u8,pfb,pfl}"
exit $rc
