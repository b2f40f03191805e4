"""Launch-geometry sweep of the sparse-output kernels, timed in a chain on the GPU clock.

    python benchmarks/chain_sweep.py

Like ``ncu_sweep.py`` (Nsight: serialized, caches flushed, base clocks), but each configuration
runs as a model's layers do (``gpu_timer.chain_time``: kernel plus one launch gap, free clocks),
rotating weight copies so L2 keeps none. spout_f: warps per row; spout_q and gateup_q: rows per
warp. Prints one line per configuration, the shipped choice marked with *.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import gpu_timer  # noqa: E402
import kernels as K  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402


def main() -> None:
    mx.random.seed(0)
    for wtype in ("float16", "q4g64"):
        dtype = K.parse_wtype(wtype)[0]
        for out_dim, in_dim in K.SHAPES[:2]:
            ws = K.weight_copies(out_dim, in_dim, wtype)
            x = mx.random.normal((1, in_dim)).astype(dtype)
            dense = gpu_timer.chain_time(K.dense_op(ws), x)
            for s in (0.5, 0.7):
                a = K.sparse_vec(1, out_dim, s, dtype)
                mx.eval(a)
                if wtype == "float16":
                    ship, opts, key = G.spout_warps_per_row(in_dim * 2), (1, 2, 4, 8), "wpr"
                else:
                    ship, opts, key = G.spout_rows_per_warp(1, in_dim), (1, 2, 4, 8), "rpw"
                for v in opts:
                    t = gpu_timer.chain_time(lambda xi, i: G._launch_spout("cuda", xi, ws[i % len(ws)], a, **{key: v}), x)
                    print(f"spout {wtype} {out_dim}x{in_dim} s={s} {key}={v}{'*' if v == ship else ' '} "
                          f"{t * 1e6:6.1f} us  dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x", flush=True)
    # the fused 4-bit FFN front, rows per warp
    out_dim, in_dim = K.SHAPES[1]
    pairs = list(zip(K.weight_copies(out_dim, in_dim, "q4g64", per_call=2),
                     K.weight_copies(out_dim, in_dim, "q4g64", per_call=2)))
    x = mx.random.normal((1, in_dim)).astype(mx.float16)
    dense = gpu_timer.chain_time(lambda xi, i: tuple(K.dense(xi, w) for w in pairs[i % len(pairs)]), x)
    for s in (0.5, 0.7):
        ts = [K.robust_channel_thresholds(x, g, s) for g, _ in pairs]
        mx.eval(ts)
        for rpw in (1, 2, 4, 8):
            t = gpu_timer.chain_time(lambda xi, i: G._launch_gateup("cuda", xi, *pairs[i % len(pairs)], ts[i % len(ts)],
                                                                    rpw=rpw), x)
            print(f"gate_up q4g64 2x{out_dim}x{in_dim} s={s} rpw={rpw}{'*' if rpw == G.spout_rows_per_warp(1, in_dim) else ' '} "
                  f"{t * 1e6:6.1f} us  dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
