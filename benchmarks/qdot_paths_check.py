"""GPU check of the quantized dot-product paths that kernels.py does not reach: bfloat16 activations
(float32 dot product) and float16 activations of |x| >= XMAX (the half2 path falls back to float32),
spout_q and gateup_q, 4-bit g64 and 8-bit g32, on the three Llama-3-8B shapes; and spin_q (the
sparse-input kernel, half2 products per four rows for float16, float32 for bfloat16) on a 50%-sparse
x, plain and spread over seven orders of magnitude (its per-chain power-of-two scale).

    python benchmarks/qdot_paths_check.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import kernels as K  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402


def main() -> int:
    mx.random.seed(5)
    bad = 0
    for bits, gs in ((4, 64), (8, 32)):
        for dt in (mx.bfloat16, mx.float16):
            for out_dim, in_dim in K.SHAPES:
                w = G.QWeight.quantize((mx.random.normal((out_dim, in_dim)) * in_dim ** -0.5).astype(dt), bits, gs)
                wu = G.QWeight.quantize((mx.random.normal((out_dim, in_dim)) * in_dim ** -0.5).astype(dt), bits, gs)
                x = mx.random.normal((1, in_dim)).astype(dt)
                # every 16th input at 520 (>= XMAX of both widths): every 16-byte step on the float path
                x_big = mx.where((mx.arange(in_dim) % 16) == 0, mx.array(520.0, dt), x)
                a = K.sparse_vec(1, out_dim, 0.5, dt)
                for xx, tag in ((x, "x"), (x_big, "x with 520s")):
                    e = K.rel_err(G._launch_spout("cuda", xx, w, a),
                                  G.reference_gated_sparse_output(xx, K.float32_weight(w), a))
                    line = f"q{bits}g{gs} {dt} {out_dim}x{in_dim} {tag}: spout_q {e:.1e}"
                    ok = e < 1e-2
                    if xx is x:
                        # gateup_q runs the same dot product (chess_qrows_dot); with the 520s |g| and
                        # |up . x| reach ~500 and y = a * u overflows float16 (the reference too)
                        r = K.gateup_check("cuda", xx, w, wu, K.robust_channel_thresholds(xx, w, 0.5))
                        ok = ok and r["rel_err"] < 1e-2
                        line += f", gateup_q {r['rel_err']:.1e} flips {r['flips']:.4f} gap {r['flip_gap']:.2f}"
                    bad += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} {line}", flush=True)
                wt = G.QWeight.quantize((mx.random.normal((in_dim, out_dim)) * in_dim ** -0.5).astype(dt), bits, gs)
                xs = K.sparse_vec(1, in_dim, 0.5, dt)
                spread = mx.power(10.0, mx.random.uniform(-5.0, 2.0, (1, in_dim))).astype(dt)
                for xx, tag in ((xs, "x"), (xs * spread, "x spread 1e-5..1e2")):
                    r = K.spin_check("cuda", xx, wt)
                    ok = r["rel_err"] < 1e-2
                    bad += not ok
                    print(f"{'ok  ' if ok else 'FAIL'} q{bits}g{gs} {dt} {out_dim}x{in_dim} {tag}: spin_q {r['rel_err']:.1e}",
                          flush=True)
    print("quantized dot-product paths:", "ALL OK" if bad == 0 else f"{bad} FAILED")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
