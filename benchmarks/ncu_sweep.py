"""Launch-geometry sweep for Nsight Compute: spout warps-per-row and spin split-K chunk sizes.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv python benchmarks/ncu_sweep.py
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
plan = []
for wtype in ("float16", "q4g64"):
    for out_dim, in_dim in K.SHAPES[:2]:
        for s in (0.0, 0.5):
            w, wt, x, a, xs = K.random_case(wtype, out_dim, in_dim, s)
            for wpr in (1, 2, 4, 8):
                plan.append((f"{wtype} {out_dim}x{in_dim} s={s} spout wpr={wpr}",
                             lambda x=x, w=w, a=a, wpr=wpr: G._launch_spout("cuda", x, w, a, wpr=wpr)))
            for kc in (64, 128, 256, 512):
                ws = G.workspace(out_dim)
                plan.append((f"{wtype} {out_dim}x{in_dim} s={s} spin kc={kc}",
                             lambda xs=xs, wt=wt, kc=kc, ws=ws: G._launch_spin("cuda", xs, wt, G.zero_threshold(xs.dtype),
                                                                                ws, kc=kc)[0]))
for _, f in plan:
    mx.eval(f())
mx.synchronize()
for label, f in plan:
    for rep in range(2):
        print(f"CALL {label} {rep}", file=sys.stderr)
        mx.eval(f())
        mx.synchronize()
