"""Probe: how much of the sparse-input kernel's tail is the uneven split of active rows?

    python benchmarks/spin_balance.py [--wtypes float16,q4g64] [--levels 0.5,0.7]

The shipped spin kernels give each block a fixed chunk of KC inputs, so a block's work is the
number of active inputs in its chunk: under an i.i.d. mask Binomial(KC, 1 - s), and the launch
waits for the fullest chunk (session 9's stamps: the last block ends 3.6-4 us after the median one).
Here the same kernel is timed (chain on the GPU clock, weight copies rotated) on two inputs of the
same density: an i.i.d. mask, and a *stratified* one with exactly round((1 - s) * KC) active inputs
in every chunk. The difference bounds what a kernel that splits active rows evenly between
blocks could save; the max / mean chunk load of the i.i.d. mask says how uneven it was.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import kernels as K  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # (in, out): down_proj, up-shaped, square


def masks(k: int, kc: int, s: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(i.i.d. keep mask, stratified keep mask) of k inputs at sparsity s, chunks of kc."""
    iid = rng.uniform(size=k) >= s
    strat = np.zeros(k, dtype=bool)
    for c0 in range(0, k, kc):
        n = min(kc, k - c0)
        keep = int(round((1 - s) * n))
        strat[c0 + rng.permutation(n)[:keep]] = True
    return iid, strat


def chunk_load(mask: np.ndarray, kc: int) -> tuple[float, float]:
    loads = np.add.reduceat(mask.astype(np.int64), np.arange(0, mask.size, kc))
    return float(loads.max()), float(loads.mean())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wtypes", default="float16,q4g64")
    ap.add_argument("--levels", default="0.5,0.7")
    args = ap.parse_args()
    kind = G.backend()
    if kind != "cuda":
        print("needs the CUDA backend", file=sys.stderr)
        return 2
    rng = np.random.default_rng(0)
    print(f"{'wtype':8} {'in->out':>12} {'s':>4} {'kc':>4} {'iid max/mean':>13} {'iid us':>8} {'strat us':>9} {'saved us':>9}")
    for wtype in args.wtypes.split(","):
        dtype, bits, _ = K.parse_wtype(wtype)
        for k, n in SHAPES:
            wts = K.weight_copies(n, k, wtype, transposed=True)
            _, _, kc = G.spin_geometry(1, k, n, bits, kind)
            op = K.spin_op(kind, wts)
            for s in (float(v) for v in args.levels.split(",")):
                iid, strat = masks(k, kc, s, rng)
                vals = np.random.default_rng(1).standard_normal(k).astype(np.float32)
                times, errs = [], []
                for keep in (iid, strat):
                    x = mx.array(np.where(keep, vals, 0.0)[None, :]).astype(dtype)
                    mx.eval(x)
                    ref = G.reference_sparse_input(x, wts[0])[0]
                    errs.append(K.rel_err(op(x, 0), ref))
                    times.append(K.time_op(kind, op, x) * 1e6)
                mx_, mean = chunk_load(iid, kc)
                ok = max(errs) < 1e-2
                print(f"{wtype:8} {k:>5}->{n:<6} {s:4.2f} {kc:4d} {mx_ / mean:13.3f} {times[0]:8.1f} {times[1]:9.1f} "
                      f"{times[0] - times[1]:9.2f}{'' if ok else '  WRONG rel err %.2e' % max(errs)}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
