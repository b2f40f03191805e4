"""Probe: the sparse-input kernels' last-block sum with 16-byte loads over chunk groups.

    python benchmarks/spin_tail.py [--wtypes float16,q4g64] [--levels 0,0.5,0.7,0.9] [--rounds 2]

The last block of each output tile sums the tile's CHUNKS split-K partials (chess_spin_finish in
cuda/common.cuh): thread i owns outputs i, i + 256, ... and loads one float per chunk, up to 32 at
a time. Where a tile holds more outputs than threads (4-bit and 8-bit kernels: 512-output tiles)
and there are many chunks (4-bit 4096 -> 4096: 64 chunks; 14336 -> 4096: 56), that is 4 rounds of
loads from L2 in a row on one SM, after every other block of the tile has finished. The variant
(``tail4``) gives each thread 4 adjacent outputs (one float4 load per chunk) and one of G groups of
chunks (G = 256 / (M * TILE / 4), at most 8), sums its group in order, and adds the G group sums
in order through shared memory: every thread busy, a quarter of the load instructions, and one or
two rounds. The sum's order changes (groups of consecutive chunks, then the groups), stays fixed
from run to run.

Each kernel text is checked against the reference on fresh inputs and timed in a chain on the GPU
clock (weight copies rotated), shipped and variant alternated ``--rounds`` times. Before any GPU
run (session 23), both texts (``TAIL_NEW`` for CUDA, ``METAL_TAIL_NEW`` for the Metal twin)
passed all 45 launches of their backend in tests/test_kernels_emulated.py's CPU emulations
(fp16/bf16/4/8-bit, 1-2 tokens, every spin variant, 2-4 chunk groups), and the CUDA text compiles
for sm_90 (tests/test_kernels_cpu.py). Adopting it is replacing the OLD texts by the NEW ones.

Result (H100, session 24, RESULTS.md): tail4 loses on every shape, by about 0.1 us per chunk
(4-bit 4096 -> 4096: 10.7 -> 17.4 us); not adopted.
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

TAIL_OLD = """  for (int i = threadIdx.x; i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
#pragma unroll 32
      for (int c = 0; c < CHUNKS; ++c) s += __ldcg(&partial[((size_t)c * M + m) * N + n]);
"""

TAIL_NEW = """  constexpr int Q4 = M * TILE / 4;  // float4 columns of the tile's partial rows
  constexpr int GR = Q4 >= 256 ? 1 : (256 / Q4 > 8 ? 8 : 256 / Q4);  // chunk groups summed side by side
  constexpr int CPG = (CHUNKS + GR - 1) / GR;
  static_assert(TILE % 4 == 0 && N % 4 == 0 && GR * M * TILE <= 8 * TILE, "tail4 layout");
  float* gsum = &red[0][0];  // GR * M * TILE floats: group g's sums at [g * M * TILE, ...)
  if ((int)threadIdx.x < GR * Q4 || GR == 1) {
    const int g = GR == 1 ? 0 : (int)threadIdx.x / Q4;
    for (int q = (int)threadIdx.x % (GR == 1 ? 256 : Q4); q < Q4; q += (GR == 1 ? 256 : Q4)) {
      const int i4 = 4 * q, m = i4 / TILE, n = tile * TILE + i4 % TILE;
      float4 s4 = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
      if (n < N) {
        const int c1 = (g + 1) * CPG < CHUNKS ? (g + 1) * CPG : CHUNKS;
#pragma unroll 16
        for (int c = g * CPG; c < c1; ++c) {
          const float4 v = __ldcg(reinterpret_cast<const float4*>(&partial[((size_t)c * M + m) * N + n]));
          s4.x += v.x; s4.y += v.y; s4.z += v.z; s4.w += v.w;
        }
      }
      reinterpret_cast<float4*>(gsum)[g * Q4 + q] = s4;
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
#pragma unroll
      for (int g = 0; g < GR; ++g) s += gsum[g * M * TILE + i];
"""


# The Metal twin of the same edit (metal/common.metal), for adoption in both twins; checked in the
# CPU emulation of Metal (tests/test_kernels_emulated.py with this text), never on a GPU.
METAL_TAIL_OLD = """  for (int i = int(tid); i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
#pragma unroll(32)
      for (int c = 0; c < CHUNKS; ++c) s += partial[(c * M + m) * N + n];
"""

METAL_TAIL_NEW = """  constexpr int Q4 = M * TILE / 4;  // float4 columns of the tile's partial rows
  constexpr int GR = Q4 >= 256 ? 1 : (256 / Q4 > 8 ? 8 : 256 / Q4);  // chunk groups summed side by side
  constexpr int CPG = (CHUNKS + GR - 1) / GR;
  static_assert(TILE % 4 == 0 && N % 4 == 0 && GR * M * TILE <= 8 * TILE, "tail4 layout");
  threadgroup float* gsum = &red[0][0];  // GR * M * TILE floats: group g's sums at [g * M * TILE, ...)
  if (int(tid) < GR * Q4 || GR == 1) {
    const int g = GR == 1 ? 0 : int(tid) / Q4;
    for (int q = int(tid) % (GR == 1 ? 256 : Q4); q < Q4; q += (GR == 1 ? 256 : Q4)) {
      const int i4 = 4 * q, m = i4 / TILE, n = tile * TILE + i4 % TILE;
      float4 s4 = float4(0.0f);
      if (n < N) {
        const int c1 = (g + 1) * CPG < CHUNKS ? (g + 1) * CPG : CHUNKS;
        for (int c = g * CPG; c < c1; ++c) {
          const float4 v = *((const device float4*)(&partial[(c * M + m) * N + n]));
          s4.x += v.x; s4.y += v.y; s4.z += v.z; s4.w += v.w;
        }
      }
      ((threadgroup float4*)gsum)[g * Q4 + q] = s4;
    }
  }
  threadgroup_barrier(mem_flags::mem_threadgroup);
  for (int i = int(tid); i < M * TILE; i += 256) {
    const int m = i / TILE, n = tile * TILE + i % TILE;
    if (n < N) {
      float s = 0.0f;
      for (int g = 0; g < GR; ++g) s += gsum[g * M * TILE + i];
"""


def tail_kernel_source(kind: str, name: str) -> tuple[str, str]:
    """``G.kernel_source`` with the tail4 last-block sum (both backends)."""
    header, body = G.kernel_source(kind, name)
    if name.startswith("spin"):
        old, new = (TAIL_OLD, TAIL_NEW) if kind == "cuda" else (METAL_TAIL_OLD, METAL_TAIL_NEW)
        assert old in header, f"the shipped last-block sum changed: update spin_tail's {kind} text"
        header = header.replace(old, new)
    return header, body


def tail_launch_source(kind: str, name: str) -> tuple[str, str]:
    """``G.launch_source`` of the tail4 variant."""
    return kernel_text.launch_text(*tail_kernel_source(kind, name))


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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wtypes", default="float16,q4g64")
    ap.add_argument("--levels", default="0,0.5,0.7,0.9")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    kind = G.backend()
    if kind != "cuda":
        print("needs the CUDA backend", file=sys.stderr)
        return 2
    shipped = G.launch_source
    texts = {"shipped": shipped, "tail4": tail_launch_source}
    mx.random.seed(0)
    bad = 0
    print(f"{'wtype':8} {'in->out':>12} {'s':>4} {'chunks':>6} {'shipped us':>11} {'tail4 us':>9} {'ratio':>6}  errors")
    for wtype in args.wtypes.split(","):
        dtype, bits, _ = K.parse_wtype(wtype)
        for k, n in SHAPES:
            wts = K.weight_copies(n, k, wtype, transposed=True)
            _, _, kc = G.spin_geometry(1, k, n, bits, kind)
            for s in (float(v) for v in args.levels.split(",")):
                best, errs = time_texts(kind, wts, k, s, dtype, texts, args.rounds)
                a, b = (best[v] for v in texts)
                ok = all(e < 1e-2 for e in errs.values())
                bad += not ok
                print(f"{wtype:8} {k:>5}->{n:<6} {s:4.2f} {-(-k // kc):6d} {a:11.1f} {b:9.1f} {a / b:6.3f}  "
                      + " ".join(f"{v} {e:.1e}" for v, e in errs.items()) + ("" if ok else "  WRONG"), flush=True)
    print("ALL OK" if not bad else f"{bad} WRONG")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
