"""Seconds-long GPU smoke test of the sparse-input and fused gate/up kernels (run before kernels.py)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import kernels as K  # noqa: E402

mx.random.seed(0)
t0 = time.time()
for wtype in ("float16", "q4g64"):
    w, wt, x, a, xs = K.random_case(wtype, 4096, 14336, 0.5)
    print(wtype, "spin", K.spin_check("cuda", xs, wt), flush=True)
    print(wtype, "spin thr", K.spin_check("cuda", x, wt, mx.array([0.6], dtype=mx.float16)), flush=True)
w, wt, x, a, xs = K.random_case("float16", 14336, 4096, 0.5)
wu = K.make_weight(14336, 4096, "float16", False)
print("gateup", K.gateup_check("cuda", x, w, wu, K.robust_channel_thresholds(x, w, 0.5)), flush=True)
print("smoke done in %.1fs" % (time.time() - t0), flush=True)
