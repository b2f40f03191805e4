"""Probe: a sparse-input kernel without split-K ("column tiles"), against the shipped spin_f.

    python benchmarks/spin_coltile.py [--u 4,8] [--warps 8,16]

The shipped spin_f splits K into chunks, so each output tile needs a cross-block reduction:
partials, fences, a counter and the last block's sum. Session 10 (RESULTS.md §7) measured that
serial tail plus compaction at ~4-5 us of a 25.8 us launch on down_proj's shape. Here each block
owns CT = 32 outputs (4 lanes x 8 halves, 64 bytes of each active row) over the whole of K:
the block compacts every active input of x once into shared memory (row numbers as uint16, one
scan), its warps stream 64 B of each active row, and one in-block reduction writes y. No
workspace, no fences, no atomics; every block reads the same rows, so blocks finish together.
Checked against the reference and timed in a chain on the GPU clock (``gpu_timer``), rotating
weight copies, at sparsity 0, 0.5, 0.7, 0.9 on the Llama-3-8B shapes.
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

# Template: T, M, K, N, NW, U, TPC, TILED (wt tile-major: (N/32, K, 32)). Grid: (ceil(N/32) * 32*NW, 1, 1), threadgroup 32*NW. K <= 16384.
SOURCE = r"""
constexpr int CT = 32;
constexpr int NT = 32 * NW;
constexpr int E = (((K + NT - 1) / NT) + 7) / 8 * 8;  // inputs per thread in the compaction (<= 64)
static_assert(E <= 64, "K too large for one compaction stage");
__shared__ unsigned short idx[K];
__shared__ int wtot[NW];
__shared__ int wnz[NW];
__shared__ float red[NW][M][CT];
const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
// 1. compaction: thread owns inputs [tid*E, tid*E + E), a bit per input in a 64-bit mask
const int j0 = threadIdx.x * E;
unsigned long long mask = 0ull;
int mine = 0;
#pragma unroll
for (int i = 0; i < E; ++i) {  // fully unrolled: all E loads in flight before the first compare
  const int j = j0 + i;
  int any = 0;
  if (j < K) {
#pragma unroll
    for (int m = 0; m < M; ++m) any += chess_xval<K, TPC>(x, t, m, j) != 0.0f;
  }
  mine += any;
  if (any) mask |= 1ull << i;
}
const int cnt = __popcll(mask);
int incl = cnt;
#pragma unroll
for (int o = 1; o < 32; o <<= 1) {
  const int v = __shfl_up_sync(0xffffffffu, incl, o);
  if (lane >= o) incl += v;
}
const int wn = __reduce_add_sync(0xffffffffu, mine);
if (lane == 31) wtot[warp] = incl;
if (lane == 0) wnz[warp] = wn;
__syncthreads();
int off = incl - cnt, total = 0, nnz = 0;
#pragma unroll
for (int w = 0; w < NW; ++w) {
  if (w < warp) off += wtot[w];
  total += wtot[w];
  nnz += wnz[w];
}
while (mask) {
  const int b = __ffsll(mask) - 1;
  mask &= mask - 1;
  idx[off++] = (unsigned short)(j0 + b);
}
__syncthreads();
// 2. stream: 4 lanes per row (16 B each), 8 rows per warp step, NW*8 rows per block step
const int sub = lane & 3, slot = lane >> 2;
const int n0 = blockIdx.x * CT + sub * 8;
const bool in_range = n0 < N;
float acc[M][8];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
for (int e0 = warp * 8 + slot; e0 < total; e0 += NW * 8 * U) {
  uint4 wv[U];
  int jv[U];
  float xv[U][M];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int e = e0 + NW * 8 * u;
    jv[u] = e < total ? (int)idx[e] : -1;
    if (jv[u] >= 0) {
      if (in_range) wv[u] = *reinterpret_cast<const uint4*>(
          wt + (TILED ? ((size_t)blockIdx.x * K + jv[u]) * CT + sub * 8 : (size_t)jv[u] * N + n0));
#pragma unroll
      for (int m = 0; m < M; ++m) xv[u][m] = chess_xval<K, TPC>(x, t, m, jv[u]);
    }
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (jv[u] >= 0 && in_range) {
      float wf[8];
      chess_unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[m][e] += xv[u][m] * wf[e];
    }
  }
}
// 3. reduce the 8 row slots of each warp (lane bits 2-4), then the warps through shared memory
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    float v = acc[m][e];
    v += __shfl_xor_sync(0xffffffffu, v, 4);
    v += __shfl_xor_sync(0xffffffffu, v, 8);
    v += __shfl_xor_sync(0xffffffffu, v, 16);
    if (slot == 0) red[warp][m][sub * 8 + e] = v;
  }
__syncthreads();
for (int i = threadIdx.x; i < M * CT; i += NT) {
  const int m = i / CT, c = i % CT, n = blockIdx.x * CT + c;
  float s = 0.0f;
#pragma unroll
  for (int w = 0; w < NW; ++w) s += red[w][m][c];
  if (n < N) y[(size_t)m * N + n] = static_cast<T>(s);
}
if (blockIdx.x == 0 && threadIdx.x == 0) dens[0] = (float)nnz / (float)(M * K);
"""

_KERNEL = []


def kernel():
    if not _KERNEL:
        header, _ = G.read_source("cuda", "spin_f")
        _KERNEL.append(mx.fast.cuda_kernel(name="chess_spin_coltile", input_names=["x", "t", "wt"],
                                           output_names=["y", "dens"], source=SOURCE, header=header))
    return _KERNEL[0]


def tile_major(wt: mx.array) -> mx.array:
    """W^T (K, N) as (N/32, K, 32): a column tile's 64-byte row pieces adjacent in memory."""
    k, n = wt.shape
    return mx.contiguous(wt.reshape(k, n // 32, 32).transpose(1, 0, 2))


def coltile(x: mx.array, wt: mx.array, t: mx.array, nw: int = 8, u: int = 8) -> tuple[mx.array, mx.array]:
    """wt: W^T (K, N), or its ``tile_major`` form (3-d)."""
    m, k = G.rows(x), x.shape[-1]
    tiled = wt.ndim == 3
    n = wt.shape[0] * 32 if tiled else wt.shape[1]
    assert k <= 16384 and n % (32 if tiled else 8) == 0
    tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("NW", nw), ("U", u), ("TPC", G._tpc(t, k)),
            ("TILED", int(tiled))]
    y, dens = kernel()(inputs=[x, t, wt], template=tmpl, grid=(-(-n // 32) * 32 * nw, 1, 1),
                       threadgroup=(32 * nw, 1, 1), output_shapes=[(*x.shape[:-1], n), ()],
                       output_dtypes=[x.dtype, mx.float32], init_value=float("nan"))
    return y, dens


def reference_case(w0, in_dim: int, s: float, dtype):
    """(xs, tpc, refs) of one probe case: an s-sparse x, a per-channel threshold that drops half
    the survivors of xs again, and the reference (y, density) with the zero threshold and with tpc."""
    xs = K.sparse_vec(1, in_dim, s, dtype)
    tpc = mx.where(mx.random.uniform(shape=(in_dim,)) < 0.5, mx.array(0.0, dtype), mx.array(1.0, dtype))
    refs = [G.reference_sparse_input(xs, w0), G.reference_sparse_input(xs, w0, tpc)]
    mx.eval(xs, tpc, refs)
    return xs, tpc, refs


def check_outputs(outs: list, refs: list) -> tuple[float, float, bool]:
    """(worst relative error, worst density error, ok) of a probe kernel's (y, density) pairs
    against ``reference_case``'s."""
    mx.eval(outs)
    err = max(K.rel_err(y, ry) for (y, _), (ry, _) in zip(outs, refs))
    derr = max(abs(d.item() - rd.item()) for (_, d), (_, rd) in zip(outs, refs))
    return err, derr, err < 1e-2 and derr < 1e-6


def main() -> None:
    # variant names: r|t (row-major / tile-major W^T), warps, 'u', rows in flight: e.g. t16u8
    variants = (sys.argv[sys.argv.index("--variants") + 1] if "--variants" in sys.argv else "r16u8,t8u4,t8u8,t16u4,t16u8").split(",")
    parsed = [(v, v[0] == "t", int(v[1:].split("u")[0]), int(v.split("u")[1])) for v in variants]
    wtypes = sys.argv[sys.argv.index("--wtypes") + 1].split(",") if "--wtypes" in sys.argv else ["float16"]
    mx.random.seed(0)
    bad = 0
    for wtype in wtypes:
        dtype = K.parse_wtype(wtype)[0]
        for out_dim, in_dim in K.SHAPES:
            wts = K.weight_copies(out_dim, in_dim, wtype, transposed=True)
            tiled = [tile_major(w) for w in wts]
            mx.eval(tiled)
            spaces = [G.workspace(out_dim) for _ in range(64)]
            z = G.zero_threshold(dtype)
            xd = mx.random.normal((1, in_dim)).astype(dtype)
            dws = K.weight_copies(out_dim, in_dim, wtype)
            t_dense = gpu_timer.chain_time(lambda xi, i: K.dense(xi, dws[i % len(dws)]), xd)
            dws.clear()
            print(f"{wtype} {out_dim}x{in_dim} dense {t_dense * 1e6:6.1f} us", flush=True)
            for s in (0.0, 0.5, 0.7, 0.9, 0.99):
                xs, tpc, refs = reference_case(wts[0], in_dim, s, dtype)
                read = refs[0][1].item() * in_dim * out_dim * 2
                t_ship = gpu_timer.chain_time(lambda xi, i: G._launch_spin("cuda", xi, wts[i % len(wts)], z, spaces[i % 64])[0], xs)
                line = f"  s={s:<4} ship {t_ship * 1e6:6.1f} us ({read / t_ship / 1e12:4.2f} TB/s)"
                for name, is_t, nw, u in parsed:
                    src = tiled if is_t else wts
                    err, derr, ok = check_outputs([coltile(xs, src[0], tt, nw, u) for tt in (z, tpc)], refs)
                    bad += not ok
                    if s > 0.95:
                        line += f" | {name}: err {err:.1e} {'ok' if ok else 'FAIL'}"
                        continue
                    tc = gpu_timer.chain_time(lambda xi, i: coltile(xi, src[i % len(src)], z, nw, u)[0], xs)
                    line += (f" | {name} {tc * 1e6:6.1f} us ({t_dense / tc:4.2f}x dense, "
                             f"{read / tc / 1e12:4.2f} TB/s) err {err:.1e} {'ok' if ok else 'FAIL'}")
                print(line, flush=True)
    print(f"{'ALL OK' if bad == 0 else f'{bad} FAILED'}")


if __name__ == "__main__":
    main()
