"""Probe: the sparse-input kernels' dependent rounds of weight loads (rows in flight, L2 prefetch).

    python benchmarks/spin_rounds.py [--wtypes float16,q4g64] [--levels 0,0.5,0.7,0.9] [--rounds 2]
        [--variants u8,pfb,pfl,u8+pfb,tailb,redf,redv,redi,redp]

After its compaction, warp w of a sparse-input block takes the active rows w, w + 8, ... of its
chunk, U = 4 rows at a time, each round waiting for its loads. Where a block's share is about one
round, that wait is most of the kernel: 4-bit 4096 -> 4096 (64-row chunks) has 32 +- 4 active rows
at 50%, so about half of its blocks need a second round for a few of their warps, and the kernel
takes ~10 us at 50% and ~8 us even at 90% (RESULTS.md, sessions 22 and 24); float16 4096 -> 4096
(128-row chunks) needs two or three. Two ways to hide that wait, as source edits (the shipped
sources are untouched):

- ``u8``: 8 rows in flight per warp instead of 4 (both kernels): a 64-row chunk is one round at
  any sparsity. Measured before only at other chunks (session 12) or on the FFN shapes (session 6).
- ``pfb`` / ``pfl``: each thread that finds its input active during the compaction, before the
  block's first barrier, asks L2 for that row's share of the tile (``pfb``: one
  ``cp.async.bulk.prefetch.L2`` of the row's bytes, Hopper; ``pfl``: ``prefetch.global.L2`` per
  128-byte line), and the scales and biases of a quantized row; later rounds then find their rows
  in L2 or on the way. A hint: it changes no result, and the Metal twin would have no such
  instruction (Apple GPUs expose no L2 prefetch).

Each text is checked against the reference on fresh inputs and timed in a chain on the GPU clock
(weight copies rotated), shipped and variants in alternating order for ``--rounds`` rounds; the
table gives each variant's time and shipped / variant. The edits compile for sm_90
(tests/test_probe_tools.py) and run in the CPU emulation of CUDA there (the prefetch is a no-op
off the GPU). ``tailb`` and ``relatom`` (below) edit the epilogue the same way, and so do
``redf`` / ``redv`` / ``redi`` / ``redp`` (session 26): the split-K sum done by atomic reductions at L2 as the
blocks finish, so the last block of a tile reads one value per output instead of one per chunk
(float32 adds, scalar or 16 bytes at a time; or int64 fixed point, whose sum does not depend on
the order, as one 64-bit or two 32-bit atomics). Before the GPU run all four passed every launch of tests/test_kernels_emulated.py's
CUDA emulation and compile for sm_90 (spin_q 4-bit 4096 -> 4096: 54 registers shipped, redf and
redi 55, redv 61, redp 55).

Result (H100, session 25, RESULTS.md): u8, pfb, pfl and tailb lose (u8 and tailb raise the
kernel's registers, so fewer blocks fit an SM; the prefetch makes float16 rows be read twice);
relatom won on every shape (1.01-1.07x at 50-90%), passed every weight type's whole check, and is
the shipped count-in since.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import kernels as K  # noqa: E402
from chess_mlx import kernel_text  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402
from spin_tail import time_texts  # noqa: E402  (the shipped-vs-variant check and timing loop)

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # (in, out)
VARIANTS = ("u8", "pfb", "pfl", "u8+pfb")
PARTS = ("u8", "pfb", "pfl", "tailb", "redf", "redv", "redi", "redp")  # the edits variant_kernel_source applies (joined by +)
TAIL_LOADS = 64  # tailb: partial loads in flight per thread in the last block's sum

ROWS_OLD = "constexpr int U = 4;"

# The prefetch: a helper (named chess_* / Chess*, so kernel_text keeps it) before the compaction,
# the compaction taking it as a last argument, and the call asking for each active row.
PF_HELPERS = r"""
// L2 prefetch of bytes at p (PF_BULK: one bulk prefetch, p 16-byte aligned and bytes a multiple of
// 16; else one prefetch per 128-byte line). A no-op off the GPU (the CPU emulation).
template <int PF_BULK>
__device__ __forceinline__ void chess_prefetch_l2(const char* p, int bytes) {
#ifdef __CUDA_ARCH__
#if __CUDA_ARCH__ >= 900
  if (PF_BULK) asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
  else
#endif
    for (int o = 0; o < bytes; o += 128) asm volatile("prefetch.global.L2 [%0];" ::"l"(p + o));
#endif
}

// What a sparse-input block will read of weight row j: w + j * ws (wb bytes), and for quantized
// weights the row's scales s + j * ss (sb bytes, one line) and biases at + bo.
template <int PF_BULK>
struct ChessRowPrefetch {
  const char* w;
  size_t ws;
  int wb;
  const char* s;
  size_t ss;
  int sb;
  size_t bo;
  __device__ __forceinline__ void operator()(int j) const {
    chess_prefetch_l2<PF_BULK>(w + (size_t)j * ws, wb);
    if (s != nullptr) {
      chess_prefetch_l2<0>(s + (size_t)j * ss, sb);
      chess_prefetch_l2<0>(s + bo + (size_t)j * ss, sb);
    }
  }
};

"""

COMPACT_SIG_OLD = """template <int M, int K, int KC, int TPC, typename T, typename TT>
__device__ __forceinline__ int chess_compact(const T* x, const TT* t, const T* g, float eps, float* nsum, bool thr,
                                             int k_begin, int* idx, float* xsh, int* wcount, int* wnnz, int* nnz) {"""
COMPACT_SIG_NEW = """template <int M, int K, int KC, int TPC, typename T, typename TT, typename PF>
__device__ __forceinline__ int chess_compact(const T* x, const TT* t, const T* g, float eps, float* nsum, bool thr,
                                             int k_begin, int* idx, float* xsh, int* wcount, int* wnnz, int* nnz,
                                             const PF& pf) {"""
BALLOT_OLD = "    bal[p] = __ballot_sync(0xffffffffu, act[p]);\n"
BALLOT_NEW = "    if (act[p]) pf(k_begin + 256 * p + (int)threadIdx.x);\n" + BALLOT_OLD
CALL_OLD = "chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);"
# the tile's bytes of a row: all TILE outputs but in the last tile (N % TILE outputs)
_TILE_N = "(N - tile * TILE < TILE ? N - tile * TILE : TILE)"
CALL_NEW = {
    "spin_f": ("chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz, "
               "ChessRowPrefetch<PFB>{reinterpret_cast<const char*>(wt + (size_t)tile * TILE), (size_t)N * sizeof(T), "
               f"{_TILE_N} * (int)sizeof(T), nullptr, 0, 0, 0}});"),
    "spin_q": ("chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz, "
               "ChessRowPrefetch<PFB>{reinterpret_cast<const char*>(wt + (size_t)tile * TILE / VPW), "
               f"(size_t)(N / VPW) * 4, {_TILE_N} * BITS / 8, "
               "reinterpret_cast<const char*>(scales + (size_t)tile * TILE / GS), (size_t)(N / GS) * sizeof(T), "
               f"({_TILE_N} + GS - 1) / GS * (int)sizeof(T), (size_t)K * (N / GS) * sizeof(T)}});"),
}


# tailb: the tile's last block sums the chunks' partials in batches of CB chunks for all R of a
# thread's outputs at once (R * CB <= TAIL_LOADS loads in flight, all bounds compile-time), instead
# of 32 chunks of one output at a time: 4-bit 4096 -> 4096 (2 outputs per thread, 64 chunks) waits
# for 2 rounds of loads instead of 4 (its last-block sum takes 1.9 us, spin_stamps.py, session 25).
# Each output still sums its chunks in order 0..C-1: the same float32 sums, bit for bit.
TAIL_OLD = """  for (int i = threadIdx.x; i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
#pragma unroll 32
      for (int c = 0; c < CHUNKS; ++c) s += __ldcg(&partial[((size_t)c * M + m) * N + n]);
"""
TAIL_NEW = """  constexpr int TR = (M * TILE + 255) / 256;
  constexpr int TCB0 = TAIL_LOADS / TR < 1 ? 1 : TAIL_LOADS / TR;
  constexpr int TCB = TCB0 < CHUNKS ? TCB0 : CHUNKS;
  float tsum[TR];
#pragma unroll
  for (int r = 0; r < TR; ++r) tsum[r] = 0.0f;
#pragma unroll
  for (int c0 = 0; c0 < CHUNKS; c0 += TCB) {
    float tval[TR][TCB];
#pragma unroll
    for (int cc = 0; cc < TCB; ++cc)
#pragma unroll
      for (int r = 0; r < TR; ++r) {
        const int i = (int)threadIdx.x + 256 * r, m = i / TILE, n = tile * TILE + i % TILE;
        tval[r][cc] = (i < M * TILE && n < N && c0 + cc < CHUNKS) ? __ldcg(&partial[((size_t)(c0 + cc) * M + m) * N + n]) : 0.0f;
      }
#pragma unroll
    for (int cc = 0; cc < TCB; ++cc)
#pragma unroll
      for (int r = 0; r < TR; ++r)
        if (c0 + cc < CHUNKS) tsum[r] += tval[r][cc];
  }
#pragma unroll
  for (int r = 0; r < TR; ++r) {
    const int i = (int)threadIdx.x + 256 * r, m = i / TILE, n = tile * TILE + i % TILE;
    if (i < M * TILE && n < N) {
      float s = tsum[r];
"""
# redf / redv / redi: no per-chunk partials and no last-block sum over them. Each chunk block adds its
# tile's sums into one accumulator per output at L2 (atomic reductions, fire and forget) before it
# counts in, and the tile's last block reads M * TILE accumulated values back (one round of loads
# instead of CHUNKS / 32 rounds per output: 4-bit 4096 -> 4096 sums 64 chunks in 1.9 us,
# spin_stamps.py, session 25), writes y, and zeroes them for the next launch (the workspace's
# partial starts as zeros, G.workspace). redf: float32 adds, one per output (the shipped store
# loop, atomicAdd instead of the store); redv: 16 bytes per reduction (red.add.v4.f32, sm_90: a
# quarter of the operations, a few more registers). With float adds the order follows the blocks'
# arrival, so y may differ in its last bit from run to run. redi: each block's sums rounded to int64 fixed point (2^-24 units:
# |partial| < 5e11, resolution 6e-8) and added as integers: exact and order-free, so y is the same
# on every run. redp: the same integer split into two 32-bit counters, q = hi * 2^20 + lo with lo
# the low 20 bits (a uint32 sum of up to 4096 chunks cannot wrap) and hi an int32 (|partial| and
# |y| < 2^27): Metal has 32-bit device atomic adds only, so this is the form a Metal twin could
# share; its y equals redi's bit for bit (the same exact integer, rounded once). All use
# partial[0, M * N) (redi and redp: 8 bytes per output, so CHUNKS >= 2).
RED_STORE_OLD = """    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) partial[((size_t)chunk * M + m) * N + n] = s;
    }
"""
RED_STORE_NEW = {
    "redf": """    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) atomicAdd(&partial[(size_t)m * N + n], s);
    }
""",
    "redv": """    static_assert(N % 4 == 0 && TILE % 4 == 0, "redv adds 4 outputs at a time");
    for (int i = 4 * (int)threadIdx.x; i < TILE; i += 1024) {
      float4 s = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) {
        const float4 v = *reinterpret_cast<const float4*>(&red[w8][i]);
        s.x += v.x; s.y += v.y; s.z += v.z; s.w += v.w;
      }
      const int n = tile * TILE + i;
      if (n < N) chess_red_add4(&partial[(size_t)m * N + n], s);
    }
""",
    "redi": """    static_assert(CHUNKS >= 2, "redi keeps 8 bytes per output in the chunks' scratch");
    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) atomicAdd(reinterpret_cast<unsigned long long*>(partial) + (size_t)m * N + n,
                           (unsigned long long)llrintf(s * 16777216.0f));
    }
""",
    "redp": """    static_assert(CHUNKS >= 2 && CHUNKS <= 4096, "redp keeps 8 bytes per output in the chunks' scratch");
    for (int i = threadIdx.x; i < TILE; i += 256) {
      float s = 0.0f;
#pragma unroll
      for (int w8 = 0; w8 < 8; ++w8) s += red[w8][i];
      const int n = tile * TILE + i;
      if (n < N) {
        const long long q = llrintf(s * 16777216.0f);
        unsigned* acc32 = reinterpret_cast<unsigned*>(partial);
        atomicAdd(acc32 + (size_t)m * N + n, (unsigned)(q & 0xFFFFF));
        atomicAdd(reinterpret_cast<int*>(acc32) + (size_t)(M + m) * N + n, (int)(q >> 20));
      }
    }
""",
}
RED_SUM_OLD = """      float s = 0.0f;
#pragma unroll 32
      for (int c = 0; c < CHUNKS; ++c) s += __ldcg(&partial[((size_t)c * M + m) * N + n]);
"""
_RED_SUM_FLOAT = """      float s = __ldcg(&partial[(size_t)m * N + n]);
      partial[(size_t)m * N + n] = 0.0f;  // zeros again for the next launch
"""
RED_SUM_NEW = {
    "redf": _RED_SUM_FLOAT,
    "redv": _RED_SUM_FLOAT,
    "redi": """      long long* acc64 = reinterpret_cast<long long*>(partial);
      float s = (float)__ldcg(&acc64[(size_t)m * N + n]) * (1.0f / 16777216.0f);
      acc64[(size_t)m * N + n] = 0;  // zeros again for the next launch
""",
    "redp": """      unsigned* acc32 = reinterpret_cast<unsigned*>(partial);
      const long long q = (long long)__ldcg(reinterpret_cast<const int*>(acc32) + (size_t)(M + m) * N + n) * 1048576
                          + (long long)__ldcg(acc32 + (size_t)m * N + n);
      float s = (float)q * (1.0f / 16777216.0f);
      acc32[(size_t)m * N + n] = 0u;  // zeros again for the next launch
      acc32[(size_t)(M + m) * N + n] = 0u;
""",
}
RED_HELPER = r"""// redv: 4 float32 adds at L2 in one reduction (sm_90's vector red); one atomic each elsewhere.
__device__ __forceinline__ void chess_red_add4(float* p, float4 v) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.relaxed.gpu.global.add.v4.f32 [%0], {%1, %2, %3, %4};"
               ::"l"(p), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w) : "memory");
#else
  atomicAdd(p, v.x);
  atomicAdd(p + 1, v.y);
  atomicAdd(p + 2, v.z);
  atomicAdd(p + 3, v.w);
#endif
}

"""


# relatom: thread 0 counts its block in with one atom.add.acq_rel.gpu instead of a fence, the
# atomic and (in the last block) a second fence (session 10: 0.1-0.4 us on float16). Won on the
# H100 in session 25 (1.01-1.07x at 50-90% on every shape; every weight type's whole check passed
# with it) and adopted: SYNC_NEW is now cuda/common.cuh's text (a test checks it), so the part is
# refused here.
SYNC_OLD = """    __threadfence();  // release: the block's partials (ordered before by the barrier) and its count
    const bool last = atomicAdd(&sem[tile], 1) == CHUNKS - 1;
    if (last) __threadfence();  // acquire: the other chunks' partials
"""
SYNC_NEW = """    int prev;
#ifdef __CUDA_ARCH__
    asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;" : "=r"(prev) : "l"(&sem[tile]) : "memory");
#else
    __threadfence();
    prev = atomicAdd(&sem[tile], 1);
    __threadfence();
#endif
    const bool last = prev == CHUNKS - 1;
"""


def _base(name: str) -> str:
    return "spin_q" if name.startswith("spin_q") else "spin_f"


def variant_kernel_source(variant: str, kind: str, name: str) -> tuple[str, str]:
    """``G.kernel_source`` with ``variant``'s edits (parts joined by ``+``) in the spin kernels."""
    header, body = G.kernel_source(kind, name)
    if not name.startswith("spin") or variant == "shipped":
        return header, body
    if kind != "cuda":
        raise ValueError("spin_rounds edits the CUDA sources only")
    for part in variant.split("+"):
        if part == "u8":
            assert ROWS_OLD in body, "the shipped rows in flight changed: update spin_rounds"
            body = body.replace(ROWS_OLD, "constexpr int U = 8;")
        elif part == "tailb":
            assert TAIL_OLD in header, "the shipped last-block sum changed: update spin_rounds"
            header = header.replace(TAIL_OLD, TAIL_NEW.replace("TAIL_LOADS", str(TAIL_LOADS)))
        elif part in ("redf", "redv", "redi", "redp"):
            for old in (RED_STORE_OLD, RED_SUM_OLD):
                assert old in header, "the shipped epilogue changed: update spin_rounds"
            header = header.replace(RED_STORE_OLD, RED_STORE_NEW[part]).replace(RED_SUM_OLD, RED_SUM_NEW[part])
            if part == "redv":
                header = RED_HELPER + header
        elif part == "relatom":
            raise ValueError("relatom was adopted in session 25 (cuda/common.cuh): it is the shipped count-in")
        elif part in ("pfb", "pfl"):
            for old in (COMPACT_SIG_OLD, BALLOT_OLD):
                assert old in header, "the shipped compaction changed: update spin_rounds"
            assert CALL_OLD in body, "the shipped compaction call changed: update spin_rounds"
            header = header.replace(COMPACT_SIG_OLD, PF_HELPERS + COMPACT_SIG_NEW).replace(BALLOT_OLD, BALLOT_NEW)
            body = (f"constexpr int PFB = {int(part == 'pfb')};\n"
                    + body.replace(CALL_OLD, CALL_NEW[_base(name)]))
        else:
            raise ValueError(f"spin_rounds: unknown variant part {part!r} ({', '.join(PARTS)})")
    return header, body


def variant_launch_source(variant: str):
    """A ``G.launch_source`` replacement giving ``variant``'s texts."""
    def text(kind: str, name: str) -> tuple[str, str]:
        return kernel_text.launch_text(*variant_kernel_source(variant, kind, name))
    return text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wtypes", default="float16,q4g64")
    ap.add_argument("--levels", default="0,0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    kind = G.backend()
    if kind != "cuda":
        print("needs the CUDA backend", file=sys.stderr)
        return 2
    shipped = G.launch_source
    names = ["shipped", *args.variants.split(",")]
    texts = {v: (shipped if v == "shipped" else variant_launch_source(v)) for v in names}
    mx.random.seed(0)
    bad = 0
    print(f"{'wtype':8} {'in->out':>12} {'s':>4} {'kc':>4} " + " ".join(f"{v + ' us':>10}" for v in names)
          + "  " + " ".join(f"{'x' + v:>8}" for v in names[1:]) + "  max err")
    for wtype in args.wtypes.split(","):
        dtype, bits, _ = K.parse_wtype(wtype)
        for k, n in SHAPES:
            wts = K.weight_copies(n, k, wtype, transposed=True)
            _, _, kc = G.spin_geometry(1, k, n, bits, kind)
            for s in (float(v) for v in args.levels.split(",")):
                best, errs = time_texts(kind, wts, k, s, dtype, texts, args.rounds)
                ok = all(e < 1e-2 for e in errs.values())
                bad += not ok
                print(f"{wtype:8} {k:>5}->{n:<6} {s:4.2f} {kc:4d} " + " ".join(f"{best[v]:10.1f}" for v in names)
                      + "  " + " ".join(f"{best['shipped'] / best[v]:8.3f}" for v in names[1:])
                      + f"  {max(errs.values()):.1e}" + ("" if ok else "  WRONG"), flush=True)
    print("ALL OK" if not bad else f"{bad} WRONG")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
