"""Probe: the sparse-input kernels' dependent rounds of weight loads (rows in flight, L2 prefetch).

    python benchmarks/spin_rounds.py [--wtypes float16,q4g64] [--levels 0,0.5,0.7,0.9] [--rounds 2]
        [--variants u8,pfb,pfl,u8+pfb]   (hs: with --wtypes float16,bfloat16 only;
        pfb, pfl and hs each rewrite the compaction, so a variant joins at most one of them)

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
off the GPU).

Results (H100, RESULTS.md): session 25: u8, pfb, pfl and a batched last-block sum (tailb) lost (u8
and tailb raise the kernel's registers, so fewer blocks fit an SM; the prefetch makes float16 rows
be read twice); one acq_rel atomic to count a block in (relatom) won on every shape and is the
shipped count-in since. Session 26: the split-K sum by atomic reductions at L2 as the blocks
finish, so a tile's last block reads one total per output instead of one partial per chunk:
float32 adds (redf, redv: scalar or 16 bytes at a time; their sum follows the blocks' arrival) or
int64 fixed point, exact and order-free (redi; redp: as two 32-bit words). All four won on the
4-bit shapes; redi at 50-90%: 1.12-1.17x on 14336 -> 4096, 1.10-1.14x on 4096 -> 4096,
1.02-1.03x on 4096 -> 14336, 0.995-1.055x on float16. redi, the fastest deterministic one, passed every
weight type's whole check and is the shipped sum since. Those edits are gone with the text they
edited: relatom and redi are refused as adopted, tailb, redf, redv and redp as retired.
Session 28: hs (a head start: each warp's first active rows loaded before the compaction's
barriers; float weights only) gained 0-7% on float16 at 50-70% and lost 3-12% on bfloat16 (56-66
registers against 48); not adopted.
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
from node_cost import launch_with  # noqa: E402

SHAPES = [(14336, 4096), (4096, 14336), (4096, 4096)]  # (in, out)
VARIANTS = ("u8", "pfb", "pfl", "u8+pfb")  # the default run (hs: float weights only)
PARTS = ("u8", "pfb", "pfl", "hs")  # the edits variant_kernel_source applies (joined by +)
ADOPTED = {"relatom": 25, "redi": 26}  # parts now in the shipped sources (session)
RETIRED = ("tailb", "redf", "redv", "redp")  # parts whose shipped text redi replaced (session 26)

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

# Head start (``hs``, spin_f only; spin_q stays as shipped): chess_compact with one addition. Right after its first ballot,
# before the block's barriers, each warp takes the first U active rows of its own 32-input window
# and issues their loads (the lane's 16 bytes of the row, as the main loop would), with the inputs
# shuffled from the lanes that read them; those rows leave the block's list. The kernel adds them
# before its main loop, which then has one round fewer to wait for after the barriers. A chunk of
# KC < 256 rows (4096 -> 4096: 128; the split launch: 64) leaves warps without inputs of their own:
# there the 256 / KC copies of each window (warp w reads the inputs of warp w % (KC / 32)) take
# the window's active rows U after U, copy c the c-th U of them, and only copy 0 lists the rest.
def hs_helper(header: str) -> str:
    """chess_compact_hs: the shipped chess_compact of ``header``, renamed, with the head start's
    edits (so the probe follows any change to the shipped compaction, or refuses to apply)."""
    begin = header.index(COMPACT_SIG_OLD)
    end = header.index("\n}\n", begin) + 3
    fn = header[begin:end]
    edits = (
        (COMPACT_SIG_OLD, HS_SIG),
        ("  constexpr int P = (KC + 255) / 256;\n  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n",
         "  constexpr int P = (KC + 255) / 256;\n"
         "  constexpr int COPIES = P == 1 && KC % 32 == 0 && 256 % KC == 0 ? 256 / KC : 1;\n"
         "  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;\n"
         "  const int copy = warp / (8 / COPIES);\n"),
        ("    const int i = 256 * p + (int)threadIdx.x;\n",
         "    const int i = 256 * p + (COPIES > 1 ? (int)threadIdx.x % KC : (int)threadIdx.x);\n"),
        (BALLOT_OLD, BALLOT_OLD + HS_TAKE),
    )
    for old, new in edits:
        assert fn.count(old) == 1, "the shipped compaction changed: update spin_rounds hs"
        fn = fn.replace(old, new)
    return "\n" + fn


HS_SIG = """template <int M, int K, int KC, int TPC, int U, int N, typename T, typename TT>
__device__ __forceinline__ int chess_compact_hs(const T* x, const TT* t, const T* g, float eps, float* nsum, bool thr,
                                                int k_begin, int* idx, float* xsh, int* wcount, int* wnnz, int* nnz,
                                                const T* wtn, bool in_range, uint4 (&hw)[U], float (&hx)[U][M],
                                                int& hn) {"""
# after the first ballot: this warp's head start, and the rows every copy took leave the list
HS_TAKE = """    if (p == 0) {
      hn = 0;
      const int window = k_begin + (COPIES > 1 ? 32 * (warp % (8 / COPIES)) : 32 * warp);
      unsigned rest = bal[0];
      for (int r = 0; r < copy * U; ++r) rest &= rest - 1u;  // the rows of the copies before this one
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (rest != 0u) {
          const int b = __ffs(rest) - 1;
          rest &= rest - 1u;
#pragma unroll
          for (int m = 0; m < M; ++m) hx[u][m] = __shfl_sync(0xffffffffu, v[0][m], b);
          if (in_range) hw[u] = *reinterpret_cast<const uint4*>(wtn + (size_t)(window + b) * N);
          hn = u + 1;
        }
      }
      unsigned left = bal[0];
      for (int r = 0; r < COPIES * U; ++r) left &= left - 1u;  // every copy's head start
      bal[0] = copy == 0 ? left : 0u;
      act[0] = ((bal[0] >> lane) & 1u) != 0u;
      if (copy != 0) mine = 0;  // a copy's inputs are counted once, by copy 0
    }
"""
HS_CALL_OLD = "const int total = chess_compact<M, K, KC, TPC>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, wcount, wnnz, &nnz);"
HS_CALL_NEW = ("uint4 hw[U];\nfloat hx[U][M];\nint hn;\n"
               "const int total = chess_compact_hs<M, K, KC, TPC, U, N>(x, t, xg, eps, wss, thr, chunk * KC, idx, xsh, "
               "wcount, wnnz, &nnz, wt + n0, in_range, hw, hx, hn);")
HS_LOOP_OLD = "for (int i0 = warp; i0 < total; i0 += 8 * U) {"
HS_LOOP_NEW = """#pragma unroll
for (int u = 0; u < U; ++u) {
  if (u < hn && in_range) {
    float wf[8];
    chess_unpack8<T>(hw[u], wf);
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[m][e] += hx[u][m] * wf[e];
  }
}
""" + HS_LOOP_OLD

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


def _base(name: str) -> str:
    return "spin_q" if name.startswith("spin_q") else "spin_f"


COMPACTION_EDITS = ("pfb", "pfl", "hs")  # each rewrites chess_compact, so a variant joins at most one


def clash(variant: str) -> str | None:
    """Why the parts of ``variant`` cannot be joined, or None."""
    both = [p for p in variant.split("+") if p in COMPACTION_EDITS]
    if len(both) > 1:
        return f"{' and '.join(both)} each rewrite the compaction (chess_compact): join at most one of them"
    return None


def refusal(part: str) -> str | None:
    """Why ``part`` no longer applies to the shipped sources (adopted or retired), or None."""
    if part in ADOPTED:
        return f"{part} was adopted in session {ADOPTED[part]} (cuda/common.cuh): it is the shipped text"
    if part in RETIRED:
        return f"{part} edited the chunk-partial sum that session 26's fixed-point totals replaced"
    return None


def variant_kernel_source(variant: str, kind: str, name: str) -> tuple[str, str]:
    """``G.kernel_source`` with ``variant``'s edits (parts joined by ``+``) in the spin kernels."""
    header, body = G.kernel_source(kind, name)
    if not name.startswith("spin") or variant == "shipped":
        return header, body
    if kind != "cuda":
        raise ValueError("spin_rounds edits the CUDA sources only")
    if why := clash(variant):
        raise ValueError(why)
    for part in variant.split("+"):
        if part == "u8":
            assert ROWS_OLD in body, "the shipped rows in flight changed: update spin_rounds"
            body = body.replace(ROWS_OLD, "constexpr int U = 8;")
        elif why := refusal(part):
            raise ValueError(why)
        elif part == "hs":
            if _base(name) != "spin_f":
                continue  # float weights only: the quantized kernels stay as shipped
            assert HS_CALL_OLD in body and HS_LOOP_OLD in body, "the shipped spin_f changed: update spin_rounds"
            header = header + hs_helper(header)
            body = body.replace(HS_CALL_OLD, HS_CALL_NEW).replace(HS_LOOP_OLD, HS_LOOP_NEW)
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


def time_texts(kind: str, wts: list, k: int, s: float, dtype, texts: dict, rounds: int) -> tuple[dict, dict]:
    """A fresh ``s``-sparse input of ``k`` channels through the sparse-input kernel with each of
    ``texts`` (name -> a ``G.launch_source``; the first is the shipped one, restored after): each
    checked against the reference and timed in a chain, in alternating order for ``rounds``
    rounds. Returns (best us, worst rel. error) per name."""
    x = K.sparse_vec(1, k, s, dtype)
    mx.eval(x)
    ref = G.reference_sparse_input(x, wts[0])[0]
    times: dict[str, list[float]] = {v: [] for v in texts}
    errs: dict[str, float] = {}
    for r in range(rounds):
        for v in (texts if r % 2 == 0 else reversed(list(texts))):
            launch_with(texts[v])
            op = K.spin_op(kind, wts)
            errs[v] = max(errs.get(v, 0.0), K.rel_err(op(x, 0), ref))
            times[v].append(K.time_op(kind, op, x) * 1e6)
    launch_with(next(iter(texts.values())))
    return {v: min(t) for v, t in times.items()}, errs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wtypes", default="float16,q4g64")
    ap.add_argument("--levels", default="0,0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    args = ap.parse_args(argv)
    names = ["shipped", *args.variants.split(",")]
    for v in names:
        if why := clash(v):
            ap.error(why)
    if any("hs" in v.split("+") for v in names) and any(K.parse_wtype(w)[1] for w in args.wtypes.split(",")):
        ap.error("hs edits the float16/bfloat16 kernel only: give --wtypes float16,bfloat16")
    kind = G.backend()
    if kind != "cuda":
        print("needs the CUDA backend", file=sys.stderr)
        return 2
    shipped = G.launch_source
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
