"""Probe: where a sparse-input launch (spin_f, spin_q as shipped) spends its time, from clock stamps
that every block writes itself.

    python benchmarks/spin_stamps.py [--cases q4g64:4096:4096:0.5,...] [--variant u8]

Session 9 measured the phases of spin_f's blocks this way (spin_variants.py --stamps, an older
source); the 4-bit kernel on 4096 -> 4096 was never split so, and it takes ~8 us even at 90%
sparsity, where its blocks load about one weight row per warp (RESULTS.md, session 25: neither 8
rows in flight nor an L2 prefetch shortens it). Thread 0 of each block reads %globaltimer at the
block's start (t0), after the compaction (t1), before the epilogue (t2), after the block has counted
in on its tile's counter (t3: a block that is not its tile's last leaves here) and at its end (t4;
for a tile's last block, after the sum of the chunks into y), written as a fifth output
``stamps``. The launches run in gpu_timer's chain (a stamp kernel between launches, weight copies
rotated), and the table gives medians over the chain's launches of: span (first start to last
end), ramp (first to last block start), the mean block's phases, the tiles' last-block sums, how
far the last block ends after the median block, and the chain time of the same launch unstamped.
``--variant``: a spin_rounds.py edit in place (e.g. ``u8``).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

import gpu_timer  # noqa: E402
import kernels as K  # noqa: E402
from chess_mlx import kernel_text  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402

CASES = ("q4g64:4096:4096:0.5,q4g64:4096:4096:0.9,float16:4096:4096:0.5,float16:14336:4096:0.5,"
         "q4g64:14336:4096:0.5")  # wtype:in:out:sparsity

_NOW = 'asm volatile("mov.u64 %0, %%globaltimer;" : "=l"({dst}));'
STAMP_START = ("__shared__ unsigned long long chess_ts_sh[5];\n"
               f"if (threadIdx.x == 0) {_NOW.format(dst='chess_ts_sh[0]')}\n")
STAMP_END = ("if (threadIdx.x == 0) {\n"
             f"  {_NOW.format(dst='chess_ts_sh[4]')}\n"
             "  const size_t b = (size_t)blockIdx.y * gridDim.x + blockIdx.x;\n"
             "  for (int i = 0; i < 5; ++i) stamps[5 * b + i] = chess_ts_sh[i];\n"
             "}\n")
COMPACT = "chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);"
FINISH_CALL = "res, yg, ynorm, eps, theta);"
FINISH_SIG_OLD = "const T* yg = nullptr, T* yn = nullptr, float eps = 0.0f,\n                                                  float theta = 0.0f) {"
FINISH_SIG_NEW = ("const T* yg = nullptr, T* yn = nullptr, float eps = 0.0f,\n"
                  "                                                  float theta = 0.0f, unsigned long long* ts = nullptr) {")
COUNTED_OLD = "  __syncthreads();\n  if (!*flag) return;\n  static_assert(RN == 0"
COUNTED_NEW = ("  __syncthreads();\n  if (threadIdx.x == 0 && ts != nullptr) "
               + _NOW.format(dst="ts[3]") + "\n  if (!*flag) return;\n  static_assert(RN == 0")


def stamped_source(kind: str, name: str, base=G.kernel_source) -> tuple[str, str]:
    """``base``'s text of spin_f / spin_q with the five stamps and the ``stamps`` output."""
    header, body = base(kind, name)
    for old, text in ((FINISH_SIG_OLD, header), (COUNTED_OLD, header), (COMPACT, body), (FINISH_CALL, body)):
        assert text.count(old) == 1, f"the shipped text changed near {old[:40]!r}: update spin_stamps"
    header = header.replace(FINISH_SIG_OLD, FINISH_SIG_NEW).replace(COUNTED_OLD, COUNTED_NEW)
    body = body.replace(COMPACT, COMPACT + "\nif (threadIdx.x == 0) " + _NOW.format(dst="chess_ts_sh[1]"))
    body = body.replace("chess_spin_finish<", "if (threadIdx.x == 0) " + _NOW.format(dst="chess_ts_sh[2]")
                        + "\nchess_spin_finish<", 1)
    body = body.replace(FINISH_CALL, "res, yg, ynorm, eps, theta, chess_ts_sh);")
    return header, STAMP_START + body + STAMP_END


def install(base=G.kernel_source) -> list:
    """Route spin_f / spin_q launches through stamped kernels; returns the list that collects each
    launch's stamps (uint64, 5 per block)."""
    seen: list = []
    real = G._kernel
    made: dict = {}

    def kernel(kind: str, name: str):
        if name not in ("spin_f", "spin_q"):
            return real(kind, name)
        if name not in made:
            header, body = kernel_text.launch_text(*stamped_source(kind, name, base))
            made[name] = mx.fast.cuda_kernel(name=f"chess_{name}_stamped", input_names=G._INPUTS[name],
                                             output_names=G._OUTPUTS[name] + ["stamps"], source=body, header=header)

        def call(**kw):
            blocks = (kw["grid"][0] // kw["threadgroup"][0]) * kw["grid"][1]
            out = made[name](**{**kw, "output_shapes": [*kw["output_shapes"], (5 * blocks,)],
                                "output_dtypes": [*kw["output_dtypes"], mx.uint64]})
            seen.append(out[-1])
            return out[:-1]
        return call
    G._kernel = kernel
    return seen


def summarize(stamps: list, tiles: int) -> dict:
    """Medians (us) over launches of span, ramp, block phases, last-block sums and end spread.
    Block b of a launch is chunk b // tiles of tile b % tiles; a tile's last block is the one whose
    time after counting in (t4 - t3) is longest."""
    se = [np.array(s, dtype=np.int64).reshape(-1, 5) for s in stamps]
    def med(v): return float(np.median(v)) / 1e3
    tails = [(s[:, 4] - s[:, 3]).reshape(-1, tiles).max(axis=0).mean() for s in se]
    phases = np.median([np.diff(s[:, :4], axis=1).mean(axis=0) for s in se], axis=0) / 1e3
    return {"span": med([s[:, 4].max() - s[:, 0].min() for s in se]),
            "ramp": med([s[:, 0].max() - s[:, 0].min() for s in se]),
            "compact": phases[0], "loop": phases[1], "count_in": phases[2], "tail": med(tails),
            "end_spread": med([s[:, 4].max() - np.median(s[:, 4]) for s in se]),
            "last_start_to_end": med([s[:, 4].max() - s[:, 0].max() for s in se])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=CASES)
    ap.add_argument("--variant", default="shipped")
    args = ap.parse_args(argv)
    kind = G.backend()
    if kind != "cuda":
        print("needs the CUDA backend", file=sys.stderr)
        return 2
    base = G.kernel_source
    if args.variant != "shipped":  # the variant's texts for the stamped and the plain launches
        import spin_rounds
        from node_cost import launch_with

        base = functools.partial(spin_rounds.variant_kernel_source, args.variant)
        launch_with(spin_rounds.variant_launch_source(args.variant))
    mx.random.seed(0)
    print(f"variant {args.variant}")
    print(f"{'case':26} {'plain us':>8} {'stamped':>8} {'span':>6} {'ramp':>5} {'compact':>7} {'loop':>5} "
          f"{'countin':>7} {'tail':>5} {'endspr':>6} {'lastblk':>7}  err")
    bad = 0
    for case in args.cases.split(","):
        wtype, k, n, s = case.split(":")
        k, n, s = int(k), int(n), float(s)
        dtype, bits, _ = K.parse_wtype(wtype)
        wts = K.weight_copies(n, k, wtype, transposed=True)
        x = K.sparse_vec(1, k, s, dtype)
        mx.eval(x)
        ref = G.reference_sparse_input(x, wts[0])[0]
        real = G._kernel
        plain = K.time_op(kind, K.spin_op(kind, wts), x) * 1e6
        seen = install(base)
        try:
            op = K.spin_op(kind, wts)
            err = K.rel_err(op(x, 0), ref)
            stamped = gpu_timer.chain_time(op, x, calls=48, reps=1) * 1e6
            mx.eval(seen)
            r = summarize(seen[-48:], G.spin_geometry(1, k, n, bits, kind)[1])
        finally:
            G._kernel = real
            G._kernel.cache_clear()
        ok = err < 1e-2
        bad += not ok
        print(f"{case:26} {plain:8.1f} {stamped:8.1f} {r['span']:6.1f} {r['ramp']:5.1f} {r['compact']:7.1f} "
              f"{r['loop']:5.1f} {r['count_in']:7.1f} {r['tail']:5.1f} {r['end_spread']:6.1f} "
              f"{r['last_start_to_end']:7.1f}  {err:.1e}" + ("" if ok else " WRONG"), flush=True)
    print("ALL OK" if not bad else f"{bad} WRONG")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
