"""A/B probe of the sparse-input kernel (spin_f): which part of it costs the GPU time.

Builds variants of cuda/spin_f.cu by editing its source text (the shipped kernel is untouched)
and launches each on the same inputs, for Nsight Compute to time:

    ncu --clock-control base --metrics gpu__time_duration.sum --csv \
        python benchmarks/spin_variants.py > var.csv 2> var.err
    python benchmarks/spin_variants.py --table var.csv var.err

Variants: ``base`` (as shipped), ``acqrel`` (fence.acq_rel.gpu instead of __threadfence),
``relatom`` (one atom.add.acq_rel.gpu instead of fence, atomic and the last block's fence; shipped
since session 25, so now the base),
``store`` (epilogue stops after the partial sums: no counters, no last-block reduction; wrong y),
``u8`` (8 rows in flight per warp instead of 4, as shipped before session 6), ``base@KC``
(split-K chunk KC instead of the default), ``warpc`` (each warp compacts its own KC/8 rows with a
ballot and takes x from a shuffle: no block barrier or shared memory before the weight loads).
``pair`` (two warps share each row, 512 outputs per block: 1 KB of each active row read in one
piece, same registers), ``tiled``/``pairtiled`` (base/pair on a tile-major weight layout), ``wsp`` (split-K partials in one
persistent buffer per shape, an input, instead of a fresh output per launch). ``--variants a,b`` picks which to run (default: VARIANTS below); ``--copies C`` runs each on C
separately allocated weight copies. ``--wall R`` also times R launches per configuration on the
host, without Nsight (``python benchmarks/spin_variants.py --wall 200 [--chain]``; lines starting
``WALL`` on stderr); ``--chain`` orders them one after another, as a model's layers are;
``--rotate`` cycles the chain over the ``--copies`` (else L2 flatters it); ``--stamps`` adds
per-block GPU clock stamps (lines ``STAMPS``: span, block phases, tail, launch gap); ``--t-elems
E`` passes the zero threshold as E halves (1: MLX's small-buffer pool, as before session 9). Wide tiles (each lane owning 16 or 32 outputs) lost in every
case in session 6 and were removed (their source: commit 9f31dee). Session 4 (RESULTS.md) used an
earlier set of variants on the previous source to find that per-warp fences and global x loads in
the inner loop cost up to 40% of the time.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CASES = [(4096, 14336, 0.0), (4096, 14336, 0.5), (14336, 4096, 0.5), (4096, 4096, 0.5)]  # K, N, sparsity
VARIANTS = ("base", "tiled", "pair", "pairtiled", "u8", "warpc@256")

# Per-warp compaction: warp w owns rows [k_begin + w*KC/8, +KC/8); 32 at a time, one per lane, the
# active ones taken lowest bit first from the ballot, U weight rows in flight.
_WARPC_MAIN = r"""
constexpr int RW = KC / 8;
int nnz_w = 0;
float acc[M][8];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
const int row0 = chunk * KC + warp * RW;
for (int p = 0; p < RW; p += 32) {
  const int jl = row0 + p + lane;
  const bool valid = p + lane < RW && jl < K;
  float v[M];
  int mine = 0;
#pragma unroll
  for (int m = 0; m < M; ++m) {
    v[m] = valid ? chess_xval<K, TPC>(x, t, m, jl) : 0.0f;
    mine += v[m] != 0.0f;
  }
  unsigned mask = __ballot_sync(0xffffffffu, mine > 0);
  nnz_w += __reduce_add_sync(0xffffffffu, mine);
  while (mask) {
    uint4 wv[U];
    int bv[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      bv[u] = mask ? __ffs(mask) - 1 : -1;
      mask &= mask - 1;
      if (bv[u] >= 0 && in_range) wv[u] = *reinterpret_cast<const uint4*>(wt + (size_t)(row0 + p + bv[u]) * N + n0);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (bv[u] >= 0) {
        float xj[M];
#pragma unroll
        for (int m = 0; m < M; ++m) xj[m] = __shfl_sync(0xffffffffu, v[m], bv[u]);
        if (in_range) {
          float wf[8];
          chess_unpack8<T>(wv[u], wf);
#pragma unroll
          for (int m = 0; m < M; ++m)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[m][e] += xj[m] * wf[e];
        }
      }
    }
  }
}
if (lane == 0) wnnz[warp] = nnz_w;
__syncthreads();
int nnz = 0;
for (int w8 = 0; w8 < 8; ++w8) nnz += wnnz[w8];
const float zero[M] = {};
"""


# Tile-major weight layout (``tiled``, ``pairtiled``): W^T stored as (N / TILE, K, TILE), so the
# TILE-output pieces of consecutive input rows that one block reads lie next to each other in
# memory (row-major W^T puts them N * 2 bytes apart). Tells whether DRAM locality of the short
# row pieces, not their count, limits the kernel. Needs N % TILE == 0.
TILED = ("tiled", "pairtiled")

# Paired warps: the block's tile is 512 outputs; warps 2r and 2r+1 take the two 256-output halves
# of the same rows (row group r of 4), so a block reads 1 KB of each active row in one piece instead
# of 512 bytes, with the same 8 outputs per lane (and registers) as the shipped kernel. Session 6's
# wide tiles also read 1-2 KB per row, but gave each lane 16-32 outputs (72-122 registers), so the
# effect of the longer piece was never seen apart from register pressure. The shared epilogue
# (chess_spin_finish) is edited to match: 4 row groups summed per output, 512 outputs per tile.
TILE_OF = {"pair": 512, "pairtiled": 512}  # outputs per block where a variant differs from the shipped 256


def variant_source(name: str) -> tuple[str, str]:
    from chess_mlx import sparse_gemv as G

    header, body = G.read_source("cuda", "spin_f")
    name = name.split("@")[0]
    if name == "acqrel":
        header = header.replace("__threadfence();", 'asm volatile("fence.acq_rel.gpu;" ::: "memory");')
    elif name == "store":
        a = "  if (threadIdx.x == 0) {\n    if (tile == 0) atomicAdd(&sem[tiles], nnz);"
        assert a in header, a
        header = header.replace(a, "  return;\n" + a)
    elif name == "relatom":  # one acq_rel atomic to count in: the shipped text since session 25
        pass
    elif name == "u8":  # the geometry shipped before session 6
        body = body.replace("constexpr int U = 4;", "constexpr int U = 8;")
    elif name in ("pair", "pairtiled"):
        for a, b in [("constexpr int TILE = 32 * VPL;", "constexpr int TILE = 64 * VPL;"),
                     ("const int n0 = tile * TILE + lane * VPL;", "const int n0 = tile * TILE + (warp & 1) * 256 + lane * VPL;"),
                     ("__shared__ __align__(16) float red[8][TILE];", "__shared__ __align__(16) float red[4][TILE];"),
                     ("for (int i0 = warp; i0 < total; i0 += 8 * U) {", "for (int i0 = warp >> 1; i0 < total; i0 += 4 * U) {"),
                     ("const int e = i0 + 8 * u;", "const int e = i0 + 4 * u;"),
                     ("xsh[m * KC + i0 + 8 * u]", "xsh[m * KC + i0 + 4 * u]")]:
            assert a in body, a
            body = body.replace(a, b)
        for a, b in [("float (*red)[32 * VPL]", "float (*red)[64 * VPL]"),
                     ("constexpr int TILE = 32 * VPL;", "constexpr int TILE = 64 * VPL;"),
                     ("&red[warp][lane * VPL]", "&red[warp >> 1][(warp & 1) * 32 * VPL + lane * VPL]"),
                     ("for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];", "for (int w8 = 0; w8 < 4; ++w8) s += red[w8][i];")]:
            assert a in header, a
            header = header.replace(a, b)
    if name in ("tiled", "pairtiled"):  # on top of base / pair: the tile-major weight layout
        a = "wt + (size_t)jv[u] * N + n0"
        assert a in body, a
        body = body.replace(a, "wt + ((size_t)tile * K + jv[u]) * TILE + (n0 - tile * TILE)")
    if name == "wsp":  # split-K partials in a persistent buffer (an input) instead of a fresh output
        a = "(acc, zero, partial, y,"
        assert a in body, a
        body = body.replace(a, "(acc, zero, const_cast<float*>(pbuf), y,")
    if name == "warpc":
        start = body.index("int nnz = 0;")
        end = body.index("chess_spin_finish<")
        body = body[:start] + _WARPC_MAIN + body[end:]
    if STAMPS:  # every block's moments on the GPU clock (ns), for --wall --stamps
        for a, i in (("const int total = chess_compact", 1), ("float acc[M][VPL];", 2), ("const float zero[M] = {};", 3)):
            if a in body:  # where a variant has the phase (warpc has no block compaction)
                body = body.replace(a, _STAMP_AT.format(i=i) + "\n" + a, 1)
        body = _STAMP_START + body + _STAMP_END
    return header, body


# --stamps: thread 0 of each block reads %globaltimer at its start (t0), before and after its
# compaction (t1, t2), after its main loop (t3) and when the block is past the epilogue (t4), and
# writes stamps[5b .. 5b + 4] (a phase a variant lacks keeps t0), so a chain of launches shows each
# kernel's span, where a block spends its time, and the idle gap between consecutive kernels on
# the GPU itself (no Nsight Systems on the lent machine; Nsight Compute serializes and flushes).
_STAMP_START = r"""
unsigned long long chess_ts[4];
asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(chess_ts[0]));
chess_ts[1] = chess_ts[2] = chess_ts[3] = chess_ts[0];
"""
_STAMP_AT = 'if (threadIdx.x == 0) asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(chess_ts[{i}]));'
_STAMP_END = r"""
__syncthreads();
if (threadIdx.x == 0) {
  unsigned long long chess_t4;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(chess_t4));
  const size_t b = (size_t)blockIdx.y * gridDim.x + blockIdx.x;
  for (int i = 0; i < 4; ++i) stamps[5 * b + i] = chess_ts[i];
  stamps[5 * b + 4] = chess_t4;
}
"""


SHARED_WS: dict = {}  # --shared-ws: one workspace per output width for every launch
PBUF: dict = {}  # the persistent partials buffer of the ``wsp`` variant, per (chunks, n)


def run() -> None:
    import mlx.core as mx

    from chess_mlx import sparse_gemv as G

    mx.random.seed(0)
    cases = [c for c in CASES if not ONLY or f"{c[0]}x{c[1]} s={c[2]}" in ONLY]
    kernels = {}
    for v in VARIANTS:
        header, body = variant_source(v)
        kernels[v] = mx.fast.cuda_kernel(name=f"spinvar_{v.split('@')[0]}",
                                         input_names=["x", "t", "wt", "sem"] + (["pbuf"] if v == "wsp" else [])
                                         + (["after"] if WALL else []),
                                         output_names=["y", "partial", "dens"] + (["stamps"] if STAMPS else []),
                                         source=body, header=header)
    for k, n, s in cases:
        # --copies C: the same launches on C separately allocated copies of the weight (with a
        # spacer allocation between them), to see whether a launch's time depends on where its
        # weight lies in memory (session 6: the same configuration measured up to 2x apart)
        copies = []
        for _ in range(COPIES):
            copies.append((mx.random.normal((k, n)) * 0.02).astype(mx.float16))
            copies.append(mx.zeros((1 << 20,), dtype=mx.float32) + len(copies))
        copies = copies[0::2]
        x = mx.random.normal((1, k)).astype(mx.float16)
        x = mx.where(mx.random.uniform(shape=(1, k)) < s, 0, x).astype(mx.float16)
        # --t-elems E: the zero threshold as E halves (the kernel reads t[0]); 1 (the library's
        # scalar) lies in MLX's small-buffer pool, as the 1-float density output does
        t = mx.zeros((T_ELEMS,), dtype=mx.float16) if T_ELEMS > 1 else G.zero_threshold(mx.float16)
        mx.eval(copies, x)
        for ci, v in ((ci, v) for ci in range(COPIES) for v in VARIANTS):
            wt = copies[ci]
            ref = x @ wt
            tile = TILE_OF.get(v.split("@")[0], 256)
            wt = prep(wt, v, k, n)
            label = v if COPIES == 1 else f"{v}#{ci}"
            tiles = -(-n // tile)
            kc = int(v.split("@")[1]) if "@" in v else G.split_k_chunk(k, tiles, quantized=False)
            chunks = -(-k // kc)
            ws = SHARED_WS.setdefault(n, G.workspace(n)) if "--shared-ws" in sys.argv else G.workspace(n)
            if v == "wsp" and (chunks, n) not in PBUF:
                PBUF[chunks, n] = mx.zeros((chunks, 1, n), dtype=mx.float32)
            geo = (v, n, kc, tiles, chunks)
            for rep in range(4):
                print(f"CALL {k}x{n} s={s} {label} {rep}", file=sys.stderr)
                y = _launch(kernels[v], geo, x, t, wt, ws.sem, ws.last if WALL else None)[0]
                mx.eval(y)
                mx.synchronize()
                if v != "store" and rep == 0:
                    err = float(mx.max(mx.abs(y.astype(mx.float32) - ref.astype(mx.float32))) /
                                mx.max(mx.abs(ref.astype(mx.float32))))
                    print(f"CHECK {k}x{n} s={s} {label} rel_err={err:.2e}", file=sys.stderr)
            if WALL and (ci == 0 or not ROTATE):
                _wall(kernels[v], geo, f"{v} over {COPIES} copies" if ROTATE else label, f"{k}x{n} s={s}", x, t,
                      [prep(c, v, k, n) for c in copies] if ROTATE else [wt])


def prep(wt, v: str, k: int, n: int):
    """The weight in variant v's layout (tile-major for the TILED variants)."""
    import mlx.core as mx

    tile = TILE_OF.get(v.split("@")[0], 256)
    if v.split("@")[0] in TILED:
        wt = mx.contiguous(wt.reshape(k, n // tile, tile).transpose(1, 0, 2))
        mx.eval(wt)
    return wt


def _launch(kernel, geo: tuple, x, t, wt, sem, after=None):
    """One launch of a variant kernel; ``geo`` = (variant, N, KC, tiles, chunks). ``after``: the
    unread ordering input the kernels take under --wall (None: the kernel has no such input)."""
    import mlx.core as mx

    v, n, kc, tiles, chunks = geo
    extra = ([PBUF[chunks, n]] if v == "wsp" else []) + ([] if after is None else [after])
    return kernel(inputs=[x, t, wt, sem] + extra,
                  template=[("T", mx.float16), ("M", 1), ("K", x.shape[1]), ("N", n), ("KC", kc), ("TPC", 0), ("NT", n)],
                  grid=(tiles * 256, chunks, 1), threadgroup=(256, 1, 1),
                  output_shapes=[(1, n), (1,) if v == "wsp" else (chunks, 1, n), (DENS_ELEMS,)]
                  + ([(5 * tiles * chunks,)] if STAMPS else []),
                  output_dtypes=[mx.float16, mx.float32, mx.float32] + ([mx.uint64] if STAMPS else []))


def _wall(kernel, geo: tuple, label, case, x, t, wts: list) -> None:
    """--wall R: R launches (each its own workspace) in one evaluation, timed on the host: time per
    launch in a stream of launches, without Nsight (which serializes kernels and idles the GPU
    between them), to see whether the two speeds exist outside the profiler. Independent launches
    may overlap on the GPU; with --chain each takes the previous one's density output as an unread
    input, so they run one after another like a model's layers."""
    import time

    import mlx.core as mx

    from chess_mlx import sparse_gemv as G

    spaces = [G.workspace(geo[1]) for _ in range(1 if CHAIN else WALL)]
    for _ in range(2):
        ys, stamps, after = [], [], spaces[0].last
        for i in range(WALL):  # --chain: each launch waits for the one before (as layers do)
            ws = spaces[0 if CHAIN else i]
            out = _launch(kernel, geo, x, t, wts[i % len(wts)], ws.sem, after if CHAIN else ws.last)
            after = out[2]
            ys.append(out[0])
            stamps += out[3:]
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval(ys, stamps)
        mx.synchronize()
        dt = time.perf_counter() - t0
    if STAMPS:
        _print_stamps(case, label, stamps)
    ds = [x @ wts[i % len(wts)] for i in range(WALL)]
    mx.synchronize()
    t1 = time.perf_counter()
    mx.eval(ds)
    mx.synchronize()
    dd = time.perf_counter() - t1
    print(f"WALL{' chained' if CHAIN else ''} {case} {label} {1e6 * dt / WALL:.1f} us/launch; dense x @ W^T on the same weight "
          f"{1e6 * dd / WALL:.1f} us", file=sys.stderr, flush=True)


def _print_stamps(case: str, label: str, stamps: list) -> None:
    """Medians over the launches of one --wall run, from the blocks' GPU clock stamps: span (first
    block start to last block end), ramp (first to last block start), a block's mean phases
    (start to compaction, compaction, main loop, epilogue), how far the last block ends after
    the median one, and the idle gap from one launch's last block end to the next one's start."""
    import numpy as np

    se = [np.array(s, dtype=np.int64).reshape(-1, 5) for s in stamps]
    span = [s[:, 4].max() - s[:, 0].min() for s in se]
    ramp = [s[:, 0].max() - s[:, 0].min() for s in se]
    phases = np.median([np.diff(s, axis=1).mean(axis=0) for s in se], axis=0) / 1e3
    ends = [s[:, 4].max() - np.median(s[:, 4]) for s in se]
    gap = [b[:, 0].min() - a[:, 4].max() for a, b in zip(se, se[1:])]
    med = lambda v: float(np.median(v)) / 1e3  # noqa: E731
    print(f"STAMPS {case} {label}: span {med(span):.1f} us, ramp {med(ramp):.1f}, block phases "
          f"(pre {phases[0]:.1f}, compact {phases[1]:.1f}, loop {phases[2]:.1f}, epilogue {phases[3]:.1f}), "
          f"last end - median end {med(ends):.1f}, gap to next {med(gap):.1f} us (min {min(gap) / 1e3:.1f}, "
          f"max {max(gap) / 1e3:.1f})", file=sys.stderr, flush=True)


def table(csv_path: str, err_path: str) -> None:
    from ncu_table import kernel_launches

    rows = [k for k in kernel_launches(csv_path) if "spinvar" in k["name"] and "gpu__time_duration.sum" in k]
    calls = [l.split(" ", 1)[1].strip() for l in open(err_path) if l.startswith("CALL")]
    times = collections.defaultdict(list)
    for c, r in zip(calls, rows):
        case, v, _ = c.rsplit(" ", 2)
        times[(case, v)].append(r["gpu__time_duration.sum"] / 1e3)
    labels = list(dict.fromkeys(v for _, v in times))
    print("| case (K x N) | " + " | ".join(labels) + " |")
    print("| --- |" + " ---: |" * len(labels))
    for case in dict.fromkeys(c for c, _ in times):
        print(f"| {case} | " + " | ".join(f"{min(times[(case, v)]):.1f}" if times[(case, v)] else "-"
                                          for v in labels) + " |")


ONLY = [a.replace("_", " ") for a in sys.argv[1:] if "x" in a and not a.startswith("-")]  # e.g. 4096x4096_s=0.5
COPIES = int(sys.argv[sys.argv.index("--copies") + 1]) if "--copies" in sys.argv else 1
# --dens-elems E: the density output as E floats (the kernel writes the first). MLX's CUDA allocator
# serves buffers of <= 8 bytes from a small pool advised read-mostly; E = 4 moves it out of that pool.
DENS_ELEMS = int(sys.argv[sys.argv.index("--dens-elems") + 1]) if "--dens-elems" in sys.argv else 1
T_ELEMS = int(sys.argv[sys.argv.index("--t-elems") + 1]) if "--t-elems" in sys.argv else 1
WALL = int(sys.argv[sys.argv.index("--wall") + 1]) if "--wall" in sys.argv else 0
CHAIN = "--chain" in sys.argv
STAMPS = "--stamps" in sys.argv
ROTATE = "--rotate" in sys.argv  # --wall over all --copies in turn (L2 keeps none), not one copy per run
if "--variants" in sys.argv:
    VARIANTS = tuple(sys.argv[sys.argv.index("--variants") + 1].split(","))

if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        table(sys.argv[2], sys.argv[3])
    else:
        run()
