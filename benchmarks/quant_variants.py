"""A/B probe of the 4-bit kernels: candidate designs and launch geometries, for Nsight Compute.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        python benchmarks/quant_variants.py > qvar.csv 2> qvar.err
    python benchmarks/quant_variants.py --table qvar.csv qvar.err

* sparse-output (``spout_q``, gate/up shape 14336x4096): the shipped kernel against ``rpw`` R,
  a design with R rows per warp and no shared memory or barrier: each lane loads x once per
  16-byte step and applies it to the R rows (x traffic and latency chains shared by R rows).
* sparse-input (``spin_q``, down 14336 -> 4096 and q/o 4096 -> 4096): WORDS per lane, rows in
  flight per warp (U) and split-K chunk (KC).

Each candidate is checked against ``mx.quantized_matmul`` (CHECK lines on stderr) before its
numbers mean anything; nothing here is used by the library until a winner is moved into
``cuda/`` (and its Metal twin) and passes ``benchmarks/kernels.py``.
"""

from __future__ import annotations

import collections
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Sparse-output with R rows per warp. Template: T, M, K, N, BITS, GS, RPW.
# Grid: ceil(N / (8 * RPW)) * 256 threads, threadgroup 256. Needs K % (128 / BITS) == 0.
SPOUT_RPW = r"""
constexpr int VPW = 32 / BITS;
constexpr int VPL = 4 * VPW;
constexpr int WORDS_PER_ROW = K / VPW;
constexpr int STEPS = WORDS_PER_ROW / 4;
const int lane = threadIdx.x & 31;
const int warp = threadIdx.x >> 5;
const int r0 = ((int)blockIdx.x * 8 + warp) * RPW;
bool act[RPW];
bool any = false;
#pragma unroll
for (int q = 0; q < RPW; ++q) {
  act[q] = chess_row_active<T, M, N>(a, r0 + q);
  any |= act[q];
}
float acc[RPW][M];
#pragma unroll
for (int q = 0; q < RPW; ++q)
#pragma unroll
  for (int m = 0; m < M; ++m) acc[q][m] = 0.0f;
if (any) {
#pragma unroll 2
  for (int v = lane; v < STEPS; v += 32) {
    const int k0 = v * VPL;
    uint32_t words[RPW][4];
    float sc[RPW], bi[RPW];
#pragma unroll
    for (int q = 0; q < RPW; ++q) {
      if (act[q]) {
        chess_load_words<4>(w + (size_t)(r0 + q) * WORDS_PER_ROW + 4 * v, words[q]);
        sc[q] = static_cast<float>(scales[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
        bi[q] = static_cast<float>(biases[(size_t)(r0 + q) * (K / GS) + k0 / GS]);
      }
    }
#pragma unroll
    for (int m = 0; m < M; ++m) {
      float xf[VPL];
      const uint4* xv = reinterpret_cast<const uint4*>(x + (size_t)m * K + k0);
#pragma unroll
      for (int c = 0; c < VPL / 8; ++c) chess_unpack8<T>(xv[c], xf + 8 * c);
      float xs4[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int i = 0; i < VPL; ++i) xs4[i & 3] += xf[i];
      const float xsum = (xs4[0] + xs4[1]) + (xs4[2] + xs4[3]);
#pragma unroll
      for (int q = 0; q < RPW; ++q) {
        if (act[q]) {
          float qx[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
          for (int i = 0; i < VPL; ++i)
            qx[i & 3] += chess_qfloat<BITS>(words[q][i / VPW], BITS * (i % VPW)) * xf[i];
          acc[q][m] += sc[q] * ((qx[0] + qx[1]) + (qx[2] + qx[3])) + bi[q] * xsum;
        }
      }
    }
  }
}
#pragma unroll
for (int q = 0; q < RPW; ++q) {
#pragma unroll
  for (int m = 0; m < M; ++m) {
    const float s = chess_warp_sum(acc[q][m]);
    const int r = r0 + q;
    if (lane == 0 && r < N) y[(size_t)m * N + r] = static_cast<T>(s * static_cast<float>(a[(size_t)m * N + r]));
  }
}
"""

SPOUT_CASES = [(4096, 14336, 0.0), (4096, 14336, 0.5), (4096, 4096, 0.5)]  # K (in), N (out rows), sparsity
SPOUT_VARIANTS = ("base", "rpw1", "rpw2", "rpw4")
SPIN_CASES = [(14336, 4096, 0.5), (4096, 4096, 0.5)]  # K (in), N (out), sparsity
SPIN_VARIANTS = ("w4u4k64", "w4u4k128", "w4u4k256", "w4u8k128", "w2u4k128", "w2u8k64", "w2u8k128", "w2u8k256", "w1u8k128")


def _parse(v: str) -> tuple[int, int, int]:
    w, rest = v[1:].split("u")
    u, kc = rest.split("k")
    return int(w), int(u), int(kc)


def run() -> None:
    import mlx.core as mx

    from chess_mlx import sparse_gemv as G

    mx.random.seed(0)
    header, spout_base = G.read_source("cuda", "spout_q")
    _, spin_body = G.read_source("cuda", "spin_q")
    spout = {"base": G._kernel("cuda", "spout_q"),
             "rpw": mx.fast.cuda_kernel(name="qvar_spout_rpw", input_names=G._INPUTS["spout_q"], output_names=["y"],
                                        source=SPOUT_RPW, header=header)}
    spin = {}
    for u in (4, 8):
        spin[u] = mx.fast.cuda_kernel(name=f"qvar_spin_u{u}", input_names=G._INPUTS["spin_q"],
                                      output_names=["y", "partial", "dens"], header=header,
                                      source=spin_body.replace("constexpr int U = 4;", f"constexpr int U = {u};"))

    def rel(y, ref):
        y, ref = y.astype(mx.float32), ref.astype(mx.float32)
        return float(mx.max(mx.abs(y - ref)) / mx.max(mx.abs(ref)))

    for k, n, s in SPOUT_CASES:
        wq = G.QWeight.quantize((mx.random.normal((n, k)) * 0.02).astype(mx.float16), 4, 64)
        x = mx.random.normal((1, k)).astype(mx.float16)
        a = mx.where(mx.random.uniform(shape=(1, n)) < s, 0, mx.random.normal((1, n))).astype(mx.float16)
        mx.eval(wq.w, wq.scales, wq.biases, x, a)
        ref = G.reference_gated_sparse_output(x, wq, a)
        for v in SPOUT_VARIANTS:
            for rep in range(4):
                print(f"CALL spout {k}x{n} s={s} {v} {rep}", file=sys.stderr)
                if v == "base":
                    y = G._launch_spout("cuda", x, wq, a)
                else:
                    rpw = int(v[3:])
                    y = spout["rpw"](inputs=[x, wq.w, wq.scales, wq.biases, a],
                                     template=[("T", mx.float16), ("M", 1), ("K", k), ("N", n), ("BITS", 4),
                                               ("GS", 64), ("RPW", rpw)],
                                     grid=(-(-n // (8 * rpw)) * 256, 1, 1), threadgroup=(256, 1, 1),
                                     output_shapes=[(1, n)], output_dtypes=[mx.float16], init_value=float("nan"))[0]
                mx.eval(y)
                mx.synchronize()
                if rep == 0:
                    print(f"CHECK spout {k}x{n} s={s} {v} rel_err={rel(y, ref):.2e}", file=sys.stderr)

    for k, n, s in SPIN_CASES:
        wt = G.QWeight.quantize((mx.random.normal((k, n)) * 0.02).astype(mx.float16), 4, 64)
        x = mx.where(mx.random.uniform(shape=(1, k)) < s, 0, mx.random.normal((1, k))).astype(mx.float16)
        mx.eval(wt.w, wt.scales, wt.biases, x)
        ref, _ = G.reference_sparse_input(x, wt)
        t = G.zero_threshold(mx.float16)
        for v in SPIN_VARIANTS:
            words, u, kc = _parse(v)
            tile = 32 * words * 8
            tiles, chunks = -(-n // tile), -(-k // kc)
            ws = G.workspace(tiles * 256)  # >= tiles + 2 counters
            for rep in range(4):
                print(f"CALL spin {k}x{n} s={s} {v} {rep}", file=sys.stderr)
                y, _, _ = spin[u](inputs=[x, t, wt.w, wt.scales, wt.biases, ws],
                                  template=[("T", mx.float16), ("M", 1), ("K", k), ("N", n), ("BITS", 4), ("GS", 64),
                                            ("KC", kc), ("WORDS", words), ("TPC", 0)],
                                  grid=(tiles * 256, chunks, 1), threadgroup=(256, 1, 1),
                                  output_shapes=[(1, n), (chunks, 1, n), (1,)],
                                  output_dtypes=[mx.float16, mx.float32, mx.float32], init_value=float("nan"))
                mx.eval(y)
                mx.synchronize()
                if rep == 0:
                    print(f"CHECK spin {k}x{n} s={s} {v} rel_err={rel(y, ref):.2e}", file=sys.stderr)


def table(csv_path: str, err_path: str) -> None:
    rows = [r for r in csv.DictReader(l for l in open(csv_path) if l.startswith('"'))
            if ("qvar" in r["Kernel Name"] or "chess_spout_q" in r["Kernel Name"])
            and r["Metric Name"] == "gpu__time_duration.sum"]
    calls = [l.split(" ", 1)[1].strip() for l in open(err_path) if l.startswith("CALL")]
    times = collections.defaultdict(list)
    for c, r in zip(calls, rows):
        case, v, _ = c.rsplit(" ", 2)
        times[(case, v)].append(float(r["Metric Value"].replace(",", "")) / 1e3)
    for kind, variants in (("spout", SPOUT_VARIANTS), ("spin", SPIN_VARIANTS)):
        print(f"\n| {kind} case (K x N) | " + " | ".join(variants) + " |")
        print("| --- |" + " ---: |" * len(variants))
        for case in dict.fromkeys(c for c, _ in times if c.startswith(kind)):
            print(f"| {case} | " + " | ".join(f"{min(times[(case, v)]):.1f}" if times[(case, v)] else "-"
                                             for v in variants) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        table(sys.argv[2], sys.argv[3])
    else:
        run()
