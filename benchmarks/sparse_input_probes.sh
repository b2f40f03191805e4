#!/usr/bin/env bash
# The sparse-input probes prepared in session 23 (RESULTS.md), one after another in one GPU call
# (timings must not share the GPU, so they do not run side by side):
#   bash benchmarks/sparse_input_probes.sh OUTDIR [balance,tail,long,long8]
# balance: spin_balance.py (what uneven split-K chunks cost); tail: spin_tail.py (the float4
# last-block sum against the shipped one); long / long8: chain_sweep.py --only spinlong with 4 / 8
# rows in flight (float16 split-K chunks of 512-2048 rows); rounds: spin_rounds.py (ROUNDS_VARIANTS;
# session 25: u8, pfb, pfl and tailb lost, relatom won and was adopted; session 26: redf, redv, redi). Each writes OUTDIR/<part>.txt; a part
# that fails or runs past its time limit is reported and the next one still runs.
# Session 24 (H100, RESULTS.md): none of balance, tail, long wins; long8 not run.
set -uo pipefail
out=${1:?usage: sparse_input_probes.sh OUTDIR [balance,tail,long,long8,rounds]}
parts=${2:-balance,tail,long,long8}
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
run tail 200 python3 benchmarks/spin_tail.py
run long 120 python3 benchmarks/chain_sweep.py --only spinlong
run long8 120 python3 benchmarks/chain_sweep.py --only spinlong --rows 8
run rounds 300 python3 benchmarks/spin_rounds.py --variants "${ROUNDS_VARIANTS:-u8,pfb,tailb}"
exit $rc
