"""GPU-side kernel durations (no host overhead) for a few configurations, for Nsight Compute.

    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum --csv \
        python benchmarks/ncu_probe.py > ncu.csv

Prints the order of the measured calls to stderr; each measured call runs 3 times.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import kernels as K  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402

mx.random.seed(0)
WTYPES = ("float16",) if "--fp16-only" in sys.argv else ("float16", "q4g64")
plan = [(f"{wtype} {out_dim}x{in_dim} s={s}", *K.random_case(wtype, out_dim, in_dim, s))
        for wtype in WTYPES for out_dim, in_dim in K.SHAPES for s in (0.0, 0.5, 0.7)]
# fused gate/up on the FFN shape (gate = w of the case, a second matrix of its type for up)
WU = {label: K.make_weight(14336, 4096, label.split()[0], False) for label, *_ in plan if " 14336x4096 " in label}
W2 = {label: G.stack_gate_up(w, WU[label]) for label, w, *_ in plan if label in WU}  # the kernel's layout
mx.eval([a for w in W2.values() for a in K.arrays(w)])
TG = {label: K.robust_channel_thresholds(x, w, float(label.rsplit("=", 1)[1]))
      for label, w, wt, x, a, xs in plan if label in WU}
mx.eval(list(WU.values()), list(TG.values()))
WS = {id(p[2]): G.workspace(p[2].cols if isinstance(p[2], G.QWeight) else p[2].shape[1]) for p in plan}
for label, w, wt, x, a, xs in plan:
    mx.eval(G._launch_spout("cuda", x, w, a), G.sparse_input(xs, wt, ws=WS[id(wt)])[0], K.dense_fn(x, w)())  # JIT warm-up
    if label in WU:
        mx.eval(G._launch_gateup("cuda", x, W2[label], TG[label]))
mx.synchronize()
print("BEGIN", file=sys.stderr)
for label, w, wt, x, a, xs in plan:
    for rep in range(3):
        fns = [("dense", K.dense_fn(x, w)), ("spout", lambda: G._launch_spout("cuda", x, w, a)),
               ("spin", lambda: G.sparse_input(xs, wt, ws=WS[id(wt)])[0])]
        if label in WU:
            fns.append(("gateup", lambda: G._launch_gateup("cuda", x, W2[label], TG[label])))
        for kind, fn in fns:
            print(f"CALL {label} {kind} {rep}", file=sys.stderr)
            mx.eval(fn())
            mx.synchronize()
