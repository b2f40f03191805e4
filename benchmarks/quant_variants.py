"""A/B probe of the 4-bit kernels' launch geometries, for Nsight Compute.

    ncu --clock-control base --metrics gpu__time_duration.sum --csv \
        python benchmarks/quant_variants.py > qvar.csv 2> qvar.err
    python benchmarks/quant_variants.py --table qvar.csv qvar.err

* sparse-output (``spout_q``, gate/up shape 14336x4096) with R = 1, 2, 4 rows per warp (each
  lane loads x once per 16-byte step and applies it to the R rows), against ``quantized_matmul``.
  Session 5 compared this design with the earlier warps-per-row kernel and adopted it (RPW 4).
* fused gate/up on 4-bit weights (``gateup_q``) with R rows per warp, against MLX's two
  ``quantized_matmul`` calls (gate and up; the table doubles one).
* sparse-input (``spin_q``, down 14336 -> 4096 and q/o 4096 -> 4096): WORDS per lane, rows in
  flight per warp (U) and split-K chunk (KC), against ``quantized_matmul`` on the same matrix
  (``dense``) and on the sparse-input layout itself (``denseT``, ``transpose=False``).

Each launch is checked against ``mx.quantized_matmul`` (CHECK lines on stderr) before its numbers
mean anything. The spin_q U variants are source edits of the shipped kernel; nothing here is used
by the library until a winner is moved into ``cuda/`` (and its Metal twin) and passes
``benchmarks/kernels.py``.
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SPOUT_CASES = [(4096, 14336, 0.0), (4096, 14336, 0.5), (4096, 4096, 0.5)]  # K (in), N (out rows), sparsity
SPOUT_VARIANTS = ("rpw1", "rpw2", "rpw4", "dense")
SPIN_CASES = [(14336, 4096, 0.5), (4096, 4096, 0.5)]  # K (in), N (out), sparsity
SPIN_VARIANTS = ("w4u4k64", "w4u4k128", "w4u4k256", "w4u8k128", "w2u4k128", "w2u8k64", "w2u8k128", "w2u8k256",
                 "w1u8k128", "dense", "denseT")
GATEUP_CASES = [(4096, 14336, 0.5), (4096, 14336, 0.7)]  # K, N, share of channels dropped
GATEUP_VARIANTS = ("rpw1", "rpw2", "rpw4", "dense")  # dense: MLX's two quantized_matmul (gate, up)


def _parse(v: str) -> tuple[int, int, int]:
    w, rest = v[1:].split("u")
    u, kc = rest.split("k")
    return int(w), int(u), int(kc)


def run() -> None:
    import mlx.core as mx

    from chess_mlx import sparse_gemv as G

    mx.random.seed(0)
    header, spin_body = G.read_source("cuda", "spin_q")
    spin = {u: mx.fast.cuda_kernel(name=f"qvar_spin_u{u}", input_names=G._INPUTS["spin_q"],
                                   output_names=G._OUTPUTS["spin_q"], header=header,
                                   source=spin_body.replace("constexpr int U = 4;", f"constexpr int U = {u};"))
            for u in (4, 8)}

    def qmm(x, q, transpose=True):
        return mx.quantized_matmul(x, q.w, q.scales, q.biases, transpose=transpose, group_size=q.group_size,
                                   bits=q.bits)

    def timed(label: str, expect: str, fn, ref) -> None:
        """Four launches for Nsight (CALL lines say which kernel name each one is), then a check."""
        for rep in range(4):
            print(f"CALL {label} {rep} @{expect}", file=sys.stderr)
            y = fn()
            mx.eval(y)
            mx.synchronize()
        if ref is not None:
            y, r = y.astype(mx.float32), ref.astype(mx.float32)
            err = float(mx.max(mx.abs(y - r)) / mx.max(mx.abs(r)))
            flips = float(mx.mean((y == 0) != (r == 0)))
            print(f"CHECK {label} rel_err={err:.2e} zero_pattern_mismatch={flips:.4f}", file=sys.stderr)

    def q4(rows, cols):
        q = G.QWeight.quantize((mx.random.normal((rows, cols)) * 0.02).astype(mx.float16), 4, 64)
        mx.eval(q.w, q.scales, q.biases)
        return q

    for k, n, s in SPOUT_CASES:
        wq = q4(n, k)
        x = mx.random.normal((1, k)).astype(mx.float16)
        a = mx.where(mx.random.uniform(shape=(1, n)) < s, 0, mx.random.normal((1, n))).astype(mx.float16)
        ref = G.reference_gated_sparse_output(x, wq, a)
        mx.eval(x, a, ref)
        for v in SPOUT_VARIANTS:
            label = f"spout {k}x{n} s={s} {v}"
            if v == "dense":
                timed(label, "qmv", lambda: qmm(x, wq), None)
            else:
                timed(label, "chess_spout_q", lambda: G._launch_spout("cuda", x, wq, a, rpw=int(v[3:])), ref)

    for k, n, s in GATEUP_CASES:
        wg, wu = q4(n, k), q4(n, k)
        w2 = G.stack_gate_up(wg, wu)  # the kernel's layout
        mx.eval(w2.w, w2.sb)
        x = mx.random.normal((1, k)).astype(mx.float16)
        act = G.silu(qmm(x, wg))
        t = mx.sort(mx.abs(act).reshape(-1))[int(s * n)].reshape(1)  # scalar threshold dropping ~s
        ref = G.threshold(act, t) * qmm(x, wu)
        mx.eval(x, t, ref)
        for v in GATEUP_VARIANTS:
            label = f"gateup {k}x{n} s={s} {v}"
            if v == "dense":
                timed(label, "qmv", lambda: qmm(x, wg), None)  # one of the two; the table doubles it
                continue
            timed(label, "chess_gateup_q", lambda: G._launch_gateup("cuda", x, w2, t, rpw=int(v[3:])), ref)

    for k, n, s in SPIN_CASES:
        wt = q4(k, n).packed()
        mx.eval(wt.sb)
        x = mx.where(mx.random.uniform(shape=(1, k)) < s, 0, mx.random.normal((1, k))).astype(mx.float16)
        ref, _ = G.reference_sparse_input(x, wt)
        mx.eval(x, ref)
        t = G.zero_threshold(mx.float16)
        for v in SPIN_VARIANTS:
            label = f"spin {k}x{n} s={s} {v}"
            if v == "dense":  # MLX's qmv on the same matrix in its own (out, in) layout
                wd = q4(n, k)
                timed(label, "qmv", lambda: qmm(x, wd), None)
                continue
            if v == "denseT":  # MLX's dense product on the sparse-input layout (what a fallback would run)
                timed(label, "", lambda: qmm(x, wt, transpose=False), ref)
                continue
            words, u, kc = _parse(v)
            tiles, chunks = -(-n // (32 * words * 8)), -(-k // kc)
            ws = G.workspace(tiles * 256)  # >= tiles + 2 counters
            ws.hold(G.spin_partials(1, n))
            mx.eval(ws.partial)
            timed(label, "qvar_spin_u", lambda: spin[u](
                inputs=[x, t, wt.w, wt.sb, ws.sem, ws.partial, ws.last],
                template=[("T", mx.float16), ("M", 1), ("K", k), ("N", n), ("BITS", 4), ("GS", 64), ("KC", kc),
                          ("WORDS", words), ("TPC", 0), ("NT", n)],
                grid=(tiles * 256, chunks, 1), threadgroup=(256, 1, 1),
                output_shapes=[(1, n), ()], output_dtypes=[mx.float16, mx.float32],
                init_value=float("nan"))[0], ref)


def table(csv_path: str, err_path: str) -> None:
    from ncu_table import kernel_launches

    rows = [k for k in kernel_launches(csv_path) if "gpu__time_duration.sum" in k]
    calls = [l.split(" ", 1)[1].strip() for l in open(err_path) if l.startswith("CALL")]
    times = collections.defaultdict(list)
    pos = 0
    for c in calls:  # each CALL is the next launch whose kernel name contains its @name
        label, expect = c.rsplit(" @", 1)
        while pos < len(rows) and expect not in rows[pos]["name"]:
            pos += 1
        if pos == len(rows):
            break
        case, v, _ = label.rsplit(" ", 2)
        times[(case, v)].append(rows[pos]["gpu__time_duration.sum"] / 1e3)
        pos += 1
    for kind, variants in (("spout", SPOUT_VARIANTS), ("gateup", GATEUP_VARIANTS), ("spin", SPIN_VARIANTS)):
        print(f"\n| {kind} case (K x N) | " + " | ".join(variants) + " |")
        print("| --- |" + " ---: |" * len(variants))
        for case in dict.fromkeys(c for c, _ in times if c.startswith(kind)):
            def us(v):
                t = times[(case, v)]
                return "-" if not t else f"{min(t) * (2 if kind == 'gateup' and v == 'dense' else 1):.1f}"
            print(f"| {case} | " + " | ".join(us(v) for v in variants) + " |")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--table"]:
        table(sys.argv[2], sys.argv[3])
    else:
        run()
