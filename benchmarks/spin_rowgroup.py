"""Probe: a split-K sparse-input kernel whose warps need no block barrier ("row groups"), against
the shipped spin_f.

    python benchmarks/spin_rowgroup.py [--variants l4u4k128,l8u4k256,...] [--shapes 4096x4096,...]

The shipped spin_f gives each warp every 8th active row of its chunk and a 512-byte piece of it
(256 outputs): a block compaction (two barriers) must come first, and an in-block reduction of the
8 warps (two barriers per token) and the block's last-chunk sum come after. On 4096-input shapes
these fixed steps are most of the launch (ncu, session 20: 4096x4096 at 50% 12.9 us against 14.7 us
for the dense GEMV that reads twice the bytes).

Here every warp takes *all* active rows of the chunk but only its own LPR x 8 outputs: LPR lanes
per row, 32 / LPR rows per load instruction. Each warp compacts the chunk itself (the same list in
every warp: x is read from L2 eight times, no barrier), the row groups of a warp are summed by
shuffles, every warp writes its own partials and counts itself in on its own counter, and the
warp that arrives last for its outputs sums the chunks. No __syncthreads anywhere; the work is
split evenly between warps whatever the sparsity pattern. Checked against the reference and timed
in a chain on the GPU clock (``gpu_timer``), rotating weight copies.
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
from spin_coltile import check_outputs, reference_case  # noqa: E402

# Template: T, M, K, N, KC, TPC, LPR, U. Grid: (ceil(N / (64 * LPR)) * 256, ceil(K / KC)), threadgroup 256.
# sem: int32 zeros of >= tiles * 8 + 1; partial: float32 of >= chunks * M * N.
SOURCE = r"""
constexpr int RPI = 32 / LPR;          // rows per warp load instruction
constexpr int WOUT = LPR * 8;          // outputs per warp
constexpr int TILEW = 8 * WOUT;        // outputs per block
constexpr int P = KC / 32;             // chunk inputs per lane in the compaction
constexpr int TILES = (N + TILEW - 1) / TILEW;
constexpr int CHUNKS = (K + KC - 1) / KC;
static_assert(KC % 32 == 0 && N % 8 == 0 && K < 65536, "shape");
__shared__ unsigned short idx[8][KC];
__shared__ T xs[8][M][KC];
float* part = const_cast<float*>(partial);
int* cnt = const_cast<int*>(sem);
const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
const int tile = blockIdx.x, chunk = blockIdx.y;
const int k0 = chunk * KC;
// 1. the warp's own ordered compaction of the chunk (every warp builds the same list)
float v[P][M];
#pragma unroll
for (int p = 0; p < P; ++p) {
  const int j = k0 + 32 * p + lane;
#pragma unroll
  for (int m = 0; m < M; ++m) v[p][m] = j < K ? chess_xval<K, TPC>(x, t, m, j) : 0.0f;
}
int total = 0, mine = 0;
#pragma unroll
for (int p = 0; p < P; ++p) {
  int any = 0;
#pragma unroll
  for (int m = 0; m < M; ++m) any += v[p][m] != 0.0f;
  mine += any;
  const unsigned bal = __ballot_sync(0xffffffffu, any > 0);
  if (any) {
    const int s = total + __popc(bal & ((1u << lane) - 1u));
    idx[warp][s] = (unsigned short)(k0 + 32 * p + lane);
#pragma unroll
    for (int m = 0; m < M; ++m) xs[warp][m][s] = static_cast<T>(v[p][m]);
  }
  total += __popc(bal);
}
__syncwarp();
// 2. stream: LPR lanes per row, RPI rows per instruction, U instructions in flight
const int sub = lane % LPR, slot = lane / LPR;
const int n0 = tile * TILEW + warp * WOUT + sub * 8;
const bool in_range = n0 < N;
float acc[M][8];
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int e = 0; e < 8; ++e) acc[m][e] = 0.0f;
for (int b = 0; b < total; b += RPI * U) {
  uint4 wv[U];
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int e = b + RPI * u + slot;
    if (e < total && in_range) wv[u] = *reinterpret_cast<const uint4*>(wt + (size_t)idx[warp][e] * N + n0);
  }
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int e = b + RPI * u + slot;
    if (e < total && in_range) {
      float wf[8];
      chess_unpack8<T>(wv[u], wf);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        const float xj = static_cast<float>(xs[warp][m][e]);
#pragma unroll
        for (int q = 0; q < 8; ++q) acc[m][q] += xj * wf[q];
      }
    }
  }
}
// 3. sum the row groups (lane bits >= log2 LPR), write the warp's partials, count in
#pragma unroll
for (int m = 0; m < M; ++m)
#pragma unroll
  for (int q = 0; q < 8; ++q) {
    float s = acc[m][q];
#pragma unroll
    for (int o = LPR; o < 32; o <<= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
    acc[m][q] = s;
  }
if (slot == 0 && in_range) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    float4* dst = reinterpret_cast<float4*>(part + ((size_t)chunk * M + m) * N + n0);
    dst[0] = make_float4(acc[m][0], acc[m][1], acc[m][2], acc[m][3]);
    dst[1] = make_float4(acc[m][4], acc[m][5], acc[m][6], acc[m][7]);
  }
  __threadfence();  // release: this lane's partials
}
__syncwarp();
const int mine_all = __reduce_add_sync(0xffffffffu, mine);
int last = 0;
if (lane == 0) {
  if (tile == 0 && warp == 0) atomicAdd(&cnt[TILES * 8], mine_all);
  __threadfence();
  last = atomicAdd(&cnt[tile * 8 + warp], 1) == CHUNKS - 1;
  if (last) __threadfence();  // acquire: the other chunks' partials
}
last = __shfl_sync(0xffffffffu, last, 0);
if (!last) return;
for (int i = lane; i < M * WOUT; i += 32) {
  const int m = i / WOUT, n = tile * TILEW + warp * WOUT + i % WOUT;
  if (n < N) {
    float s = 0.0f;
#pragma unroll 8
    for (int c = 0; c < CHUNKS; ++c) s += __ldcg(&part[((size_t)c * M + m) * N + n]);
    y[(size_t)m * N + n] = static_cast<T>(s);
  }
}
if (lane == 0) {
  cnt[tile * 8 + warp] = 0;
  if (tile == 0 && warp == 0) dens[0] = (float)atomicExch(&cnt[TILES * 8], 0) / (float)(M * K);
}
"""

_KERNEL = []


def kernel():
    if not _KERNEL:
        header, _ = G.read_source("cuda", "spin_f")
        _KERNEL.append(mx.fast.cuda_kernel(name="chess_spin_rowgroup", input_names=["x", "t", "wt", "sem", "partial"],
                                           output_names=["y", "dens"], source=SOURCE, header=header))
    return _KERNEL[0]


class Space:
    """Counters and scratch of one call site of the probe (its own sizes: 8 counters per tile)."""

    def __init__(self, k: int, n: int, m: int = 1, kc: int = 64) -> None:
        self.sem = mx.zeros((-(-n // 256) * 8 + 1,), dtype=mx.int32)
        self.partial = mx.zeros((-(-k // kc) * m * n,), dtype=mx.float32)
        mx.eval(self.sem, self.partial)


def rowgroup(x: mx.array, wt: mx.array, t: mx.array, sp: Space, lpr: int = 4, u: int = 4, kc: int = 128):
    m, k, n = G.rows(x), x.shape[-1], wt.shape[1]
    tilew = 64 * lpr
    tiles, chunks = -(-n // tilew), -(-k // kc)
    assert sp.sem.size >= tiles * 8 + 1 and sp.partial.size >= chunks * m * n
    tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("KC", kc), ("TPC", G._tpc(t, k)), ("LPR", lpr), ("U", u)]
    y, dens = kernel()(inputs=[x, t, wt, sp.sem, sp.partial], template=tmpl, grid=(tiles * 256, chunks, 1),
                       threadgroup=(256, 1, 1), output_shapes=[(*x.shape[:-1], n), ()],
                       output_dtypes=[x.dtype, mx.float32], init_value=float("nan"))
    return y, dens


def parse_variant(v: str) -> tuple[int, int, int]:
    """'l4u4k128' -> (lanes per row 4, rows in flight 4, chunk 128)."""
    lpr, rest = v[1:].split("u")
    u, kc = rest.split("k")
    return int(lpr), int(u), int(kc)


def main() -> None:
    arg = lambda name, default: sys.argv[sys.argv.index(name) + 1] if name in sys.argv else default  # noqa: E731
    variants = arg("--variants", "l4u4k128,l4u8k128,l8u4k128,l4u4k256").split(",")
    shapes = [tuple(int(d) for d in s.split("x")) for s in arg("--shapes", "4096x4096,6144x4096,4096x14336").split(",")]
    sparsities = [float(s) for s in arg("--sparsities", "0,0.5,0.7,0.99").split(",")]
    mx.random.seed(0)
    bad = 0
    dtype = mx.float16
    for out_dim, in_dim in shapes:
        wts = K.weight_copies(out_dim, in_dim, "float16", transposed=True)
        spaces = [G.workspace(out_dim) for _ in range(64)]
        rg_spaces = [Space(in_dim, out_dim) for _ in range(16)]
        z = G.zero_threshold(dtype)
        xd = mx.random.normal((1, in_dim)).astype(dtype)
        dws = K.weight_copies(out_dim, in_dim, "float16")
        t_dense = gpu_timer.chain_time(lambda xi, i: K.dense(xi, dws[i % len(dws)]), xd)
        dws.clear()
        print(f"float16 {out_dim}x{in_dim} ({len(wts)} copies) dense {t_dense * 1e6:6.1f} us", flush=True)
        for s in sparsities:
            xs, tpc, refs = reference_case(wts[0], in_dim, s, dtype)
            read = refs[0][1].item() * in_dim * out_dim * 2
            t_ship = gpu_timer.chain_time(lambda xi, i: G._launch_spin("cuda", xi, wts[i % len(wts)], z, spaces[i % 64])[0], xs)
            line = f"  s={s:<4} ship {t_ship * 1e6:6.1f} us ({t_dense / t_ship:4.2f}x, {read / t_ship / 1e12:4.2f} TB/s)"
            for name in variants:
                lpr, u, kc = parse_variant(name)
                for _ in range(2):  # twice: the second launch on a site must find its counters reset
                    err, derr, ok = check_outputs([rowgroup(xs, wts[0], tt, rg_spaces[i], lpr, u, kc)
                                                   for i, tt in enumerate((z, tpc))], refs)
                bad += not ok
                if s > 0.95:
                    line += f" | {name}: err {err:.1e} {'ok' if ok else 'FAIL'}"
                    continue
                tc = gpu_timer.chain_time(
                    lambda xi, i: rowgroup(xi, wts[i % len(wts)], z, rg_spaces[i % 16], lpr, u, kc)[0], xs)
                line += (f" | {name} {tc * 1e6:6.1f} us ({t_dense / tc:4.2f}x, {read / tc / 1e12:4.2f} TB/s)"
                         f"{'' if ok else f' FAIL {err:.1e} {derr:.1e}'}")
            print(line, flush=True)
    print(f"{'ALL OK' if bad == 0 else f'{bad} FAILED'}")


if __name__ == "__main__":
    main()
