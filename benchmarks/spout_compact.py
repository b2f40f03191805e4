"""Probe: float16 sparse-output with per-block compaction of the active rows (CUDA only).

    python benchmarks/spout_compact.py [--quick | --narrow | --unroll]

The shipped spout_f gives each row fixed warps (``spout_warps_per_row``): a block covers 1-8 rows,
so at 70% sparsity most blocks exit after reading the gate and the busy ones each stream a row or
two (RESULTS.md: 75-77% of copy bandwidth at 70% on the FFN shapes, 69% on 4096x4096 at 50%).
Here a block covers RB rows: it ballots which are active, writes their numbers to shared memory,
and its 8/WPR warp groups take the active rows in turn, U at a time (loads of U rows in flight
together); partial dot products meet in shared memory (atomicAdd), and the block writes every
row, zero for the inactive ones. Each configuration is checked against the reference and timed in
a chain on the GPU clock, next to the shipped kernel and MLX's dense GEMV.

``--narrow``: instead, the shipped kernel's body in blocks of NW warps (1, 2 or 4 rather than 8),
WPR warps per row: smaller blocks, so a block of inactive rows frees its slot sooner.
``--unroll``: the shipped kernel with its row loop fully unrolled (every 16-byte load of a lane in
flight at once; the shipped loop unrolls by 4, so a 14336-wide row at 8 warps per row takes two
load round trips per lane), at the shipped and the other warps-per-row choices.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import gpu_timer  # noqa: E402
import kernels as K  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402

# Template: T, M, K, N, RB, WPR, U
_BODY = r"""
constexpr int GROUPS = 8 / WPR;
const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
const int group = warp / WPR, part = warp % WPR;
__shared__ unsigned masks[RB / 32];
__shared__ int list[RB];
__shared__ float sres[RB][M];
const int r0 = (int)blockIdx.x * RB;
bool act = false;
if (t < RB) act = chess_row_active<T, M, N>(a, r0 + t);
const unsigned bal = __ballot_sync(0xffffffffu, act);
if (lane == 0 && warp < RB / 32) masks[warp] = bal;
for (int i = t; i < RB * M; i += 256) (&sres[0][0])[i] = 0.0f;
__syncthreads();
int count = 0, pos = __popc(bal & ((1u << lane) - 1u));
#pragma unroll
for (int q = 0; q < RB / 32; ++q) {
  const int c = __popc(masks[q]);
  count += c;
  if (q < warp) pos += c;
}
if (act) list[pos] = r0 + t;
__syncthreads();
constexpr int V = K / 8;
for (int j = group * U; j < count; j += GROUPS * U) {
  float acc[U][M];
  const uint4* wr[U];
  bool ok[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    ok[u] = j + u < count;
    wr[u] = reinterpret_cast<const uint4*>(w + (size_t)list[ok[u] ? j + u : j] * K);
#pragma unroll
    for (int m = 0; m < M; ++m) acc[u][m] = 0.0f;
  }
#pragma unroll 4
  for (int v = part * 32 + lane; v < V; v += 32 * WPR) {
    uint4 raw[U];
#pragma unroll
    for (int u = 0; u < U; ++u) raw[u] = ok[u] ? wr[u][v] : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[8];
      chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], xf);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        float wf[8];
        chess_unpack8<T>(raw[u], wf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[u][m] += wf[e] * xf[e];
      }
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float s = acc[u][m];
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0 && ok[u]) {
        if (WPR == 1) sres[j + u][m] = s;
        else atomicAdd(&sres[j + u][m], s);
      }
    }
  }
}
__syncthreads();
if (t < RB && r0 + t < N) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const int i = m * N + r0 + t;
    y[i] = act ? static_cast<T>(sres[pos][m] * static_cast<float>(a[i])) : static_cast<T>(0.0f);
  }
}
"""

# Template: T, M, K, N, NW, WPR  (the shipped spout_f with NW warps per block instead of 8)
_NARROW = r"""
constexpr int RPB = NW / WPR;
const int warp = threadIdx.x >> 5;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) chess_row_dot<T, M, K, WPR>(w + (size_t)r * K, x, part, acc);
__shared__ float red[NW][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red);
"""

# Template: T, M, K, N, WPR  (the shipped spout_f, its row loop fully unrolled)
_UNROLL = r"""
constexpr int RPB = 8 / WPR;
constexpr int V = K / 8;
constexpr int STEPS = (V + 32 * WPR - 1) / (32 * WPR);
const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
const int part = warp % WPR;
const int r = (int)blockIdx.x * RPB + warp / WPR;
const bool active = chess_row_active<T, M, N>(a, r);
float acc[M];
#pragma unroll
for (int m = 0; m < M; ++m) acc[m] = 0.0f;
if (active) {
  const uint4* wrow = reinterpret_cast<const uint4*>(w + (size_t)r * K);
  uint4 raw[STEPS];
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    const int v = part * 32 + lane + i * 32 * WPR;
    raw[i] = v < V ? wrow[v] : make_uint4(0, 0, 0, 0);
  }
#pragma unroll
  for (int i = 0; i < STEPS; ++i) {
    const int v = part * 32 + lane + i * 32 * WPR;
    if (v < V) {
      float wf[8];
      chess_unpack8<T>(raw[i], wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[8];
        chess_unpack8<T>(reinterpret_cast<const uint4*>(x + (size_t)m * K)[v], xf);
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m] += wf[e] * xf[e];
      }
    }
  }
}
__shared__ float red[8][M];
chess_finish_rows<T, M, N, WPR>(acc, a, y, r, red);
"""

@lru_cache(maxsize=None)
def _probe_kernel(name: str, source: str):
    header, _ = G.read_source("cuda", "spout_f")
    return mx.fast.cuda_kernel(name=f"chess_spout_{name}", input_names=["x", "w", "a"], output_names=["y"],
                               source=source, header=header)


def _launch(name: str, source: str, x: mx.array, w: mx.array, a: mx.array, extra: list, rows_per_block: int,
            warps: int = 8) -> mx.array:
    """One probe kernel on (x, w, a): template T, M, K, N plus ``extra``, blocks of ``warps`` warps
    each covering ``rows_per_block`` rows, output poisoned with NaN."""
    m, k, n = G.rows(x), x.shape[-1], w.shape[0]
    tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), *extra]
    return _probe_kernel(name, source)(inputs=[x, w, a], template=tmpl, grid=(-(-n // rows_per_block) * 32 * warps, 1, 1),
                                       threadgroup=(32 * warps, 1, 1), output_shapes=[(*x.shape[:-1], n)],
                                       output_dtypes=[x.dtype], init_value=float("nan"))[0]


def launch_unroll(x: mx.array, w: mx.array, a: mx.array, wpr: int) -> mx.array:
    return _launch("unroll", _UNROLL, x, w, a, [("WPR", wpr)], 8 // wpr)


def launch_narrow(x: mx.array, w: mx.array, a: mx.array, nw: int, wpr: int) -> mx.array:
    assert x.shape[-1] % 8 == 0 and nw % wpr == 0
    return _launch("narrow", _NARROW, x, w, a, [("NW", nw), ("WPR", wpr)], nw // wpr, warps=nw)


def launch(x: mx.array, w: mx.array, a: mx.array, rb: int, wpr: int, u: int) -> mx.array:
    assert x.shape[-1] % 8 == 0 and rb % 32 == 0 and rb <= 256 and 8 % wpr == 0
    return _launch("compact", _BODY, x, w, a, [("RB", rb), ("WPR", wpr), ("U", u)], rb)


def main() -> None:
    quick, narrow, unroll = "--quick" in sys.argv, "--narrow" in sys.argv, "--unroll" in sys.argv
    mx.random.seed(0)
    configs = [(rb, wpr, u) for rb in (32, 64, 128, 256) for wpr in (1, 2, 4) for u in (1, 2)]
    if quick:
        configs = [(64, 1, 1), (64, 1, 2), (128, 2, 1), (128, 2, 2), (256, 4, 2)]
    if narrow:
        configs = [(nw, wpr) for nw in (1, 2, 4) for wpr in (1, 2, 4) if wpr <= nw]
    if unroll:
        configs = [(2,), (4,), (8,)]
    bw = K.copy_bandwidth(K.G.backend())
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s", flush=True)
    dtype = mx.float16
    for out_dim, in_dim in K.SHAPES:
        ws = K.weight_copies(out_dim, in_dim, "float16")
        x = mx.random.normal((1, in_dim)).astype(dtype)
        mx.eval(x)
        dense = gpu_timer.chain_time(K.dense_op(ws), x)
        for s in (0.0, 0.5, 0.7, 0.9):
            a = K.sparse_vec(1, out_dim, s, dtype)
            ref = G.reference_gated_sparse_output(x.astype(mx.float32), ws[0].astype(mx.float32), a.astype(mx.float32))
            mx.eval(a, ref)
            dens = mx.mean((a != 0).astype(mx.float32)).item()
            read = dens * ws[0].nbytes

            def show(name: str, t: float, err: float) -> None:
                print(f"{out_dim}x{in_dim} s={s} {name:22s} {t * 1e6:6.1f} us  dense {dense * 1e6:5.1f}  "
                      f"{dense / t:4.2f}x  bw {read / t / bw:4.0%}  rel_err {err:.1e}", flush=True)

            err = K.rel_err(G._launch_spout("cuda", x, ws[0], a), ref)
            show("shipped", gpu_timer.chain_time(lambda xi, i: G._launch_spout("cuda", xi, ws[i % len(ws)], a), x), err)
            for cfg in configs:
                if unroll:
                    fn, name = (lambda xi, wi, cfg=cfg: launch_unroll(xi, wi, a, *cfg)), "unroll wpr={}".format(*cfg)
                elif narrow:
                    fn, name = (lambda xi, wi, cfg=cfg: launch_narrow(xi, wi, a, *cfg)), "narrow nw={} wpr={}".format(*cfg)
                else:
                    fn, name = (lambda xi, wi, cfg=cfg: launch(xi, wi, a, *cfg)), "compact rb={} wpr={} u={}".format(*cfg)
                err = K.rel_err(fn(x, ws[0]), ref)
                show(name, gpu_timer.chain_time(lambda xi, i: fn(xi, ws[i % len(ws)]), x), err)


if __name__ == "__main__":
    main()
