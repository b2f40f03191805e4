"""Launch-geometry sweep of the sparse-output kernels, timed in a chain on the GPU clock.

    python benchmarks/chain_sweep.py

Like ``ncu_sweep.py`` (Nsight: serialized, caches flushed, base clocks), but each configuration
runs as a model's layers do (``gpu_timer.chain_time``: kernel plus one launch gap, free clocks),
rotating weight copies so L2 keeps none. spout_f: warps per row; spout_q and gateup_q: rows per
warp; spin_f and spin_q (``--spin``): split-K chunk. Prints one line per configuration, the
shipped choice marked with *. ``spoutq``: spout_q rows per warp x warps per row group, each also checked against the
reference. ``spinq``: spin_q words per lane x chunk, also checked. ``spinqu`` (not in the default
set): spin_q with 8 (``--rows U``: U) rows in flight per warp instead of 4. ``split`` (not in the
default set): the split-K chunk of CHESS+attention's split launch over ``[Wq^T | Wk^T | Wv^T]``,
each also checked. ``spinlong`` (not in the default set): float16 spin_f with split-K chunks of
512-2048 rows, each also checked. ``splitw`` (not in the default set): the split launch's tile
width at 4 and 8 bits. ``spinf`` (not in the default set): float16 spin_f with 64-512-row chunks at
sparsity 0, 0.5 and 0.7. ``--only spout,spoutq,spin,spinf,spinq,gateup,spinqu,split,splitw,spinlong``
picks sections (default: all but spinf, spinqu, split, splitw and spinlong).
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


def sweep_spin(wtypes: tuple[str, ...] = ("float16", "q4g64", "q8g32"), levels: tuple[float, ...] = (0.5, 0.7),
               half_kcs: tuple[int, ...] = (128, 256, 512)) -> None:
    """Split-K chunk of the sparse-input kernels on every shape: the chunk sets how many blocks
    share the launch's fixed costs (compaction, count-in, the last block's epilogue). ``spinf``
    runs it on float16 alone at sparsity 0 too, with 64-row chunks: since the sum is a fixed-point
    reduction (session 26) a block no longer writes partials that the last block must read, so
    shorter chunks might have paid on 4096 -> 4096. They did not (H200, session 27: the shipped
    ``split_k_chunk`` fastest in every row, 64 rows 15-48% slower)."""
    for wtype in wtypes:
        dtype, bits, _ = K.parse_wtype(wtype)
        for out_dim, in_dim in K.SHAPES:
            wts = K.weight_copies(out_dim, in_dim, wtype, transposed=True)
            ws = [G.workspace(out_dim) for _ in range(64)]
            quant = wtype != "float16"
            ship = G.spin_geometry(1, in_dim, out_dim, bits)[2]
            z = G.zero_threshold(dtype)
            for s in levels:
                xs = K.sparse_vec(1, in_dim, s, dtype)
                ref = G.reference_sparse_input(xs, wts[0])[0]
                mx.eval(xs, ref)
                for kc in ((32, 64, 128, 256) if quant else half_kcs):
                    err = K.rel_err(G._launch_spin("cuda", xs, wts[0], z, ws[0], kc=kc)[0], ref)
                    t = gpu_timer.chain_time(lambda xi, i: G._launch_spin("cuda", xi, wts[i % len(wts)], z,
                                                                          ws[i % len(ws)], kc=kc)[0], xs)
                    print(f"spin {wtype} {out_dim}x{in_dim} s={s} kc={kc}{'*' if kc == ship else ' '} {t * 1e6:6.1f} us"
                          f"  err {err:.1e}{'' if err < 1e-2 else '  WRONG'}", flush=True)


def _spin_f_rows(u: int):
    """A ``G.launch_source`` whose spin_f keeps ``u`` rows in flight per warp (shipped: 4)."""
    from chess_mlx import kernel_text

    def text(kind: str, name: str) -> tuple[str, str]:
        header, body = G.kernel_source(kind, name)
        if name.startswith("spin_f"):
            assert "constexpr int U = 4;" in body, "spin_f's rows in flight changed: update chain_sweep"
            body = body.replace("constexpr int U = 4;", f"constexpr int U = {u};")
        return kernel_text.launch_text(header, body)
    return text


def sweep_spin_long(kcs: tuple = (512, 768, 1024, 1536, 2048), u: int = 4) -> None:
    """float16 spin_f with split-K chunks past the shipped 512 rows (``spinlong``, not in the
    default set). Session 10's sweep (128, 256, 512) got faster with every doubling on the FFN
    shapes (14336 -> 4096 at 50%: 27.2, 26.7, 25.1 us): fewer blocks share the fixed costs of a
    launch. Longer chunks give fewer blocks than 2.5 per SM (1024: 224 blocks on the FFN shapes),
    so whether the trend goes on is a measurement. Each chunk checked against the reference.
    ``--rows U``: U rows in flight per warp instead of 4 (more bytes in flight per block)."""
    from node_cost import launch_with

    shipped = G.launch_source
    if u != 4:
        launch_with(_spin_f_rows(u))
    dtype = mx.float16
    for out_dim, in_dim in K.SHAPES:
        wts = K.weight_copies(out_dim, in_dim, "float16", transposed=True)
        ws = [G.workspace(out_dim) for _ in range(64)]
        ship = G.spin_geometry(1, in_dim, out_dim)[2]
        for s in (0.0, 0.5, 0.7):
            xs = K.sparse_vec(1, in_dim, s, dtype)
            mx.eval(xs)
            ref = G.reference_sparse_input(xs, wts[0])[0]
            for kc in kcs:
                err = K.rel_err(G._launch_spin("cuda", xs, wts[0], G.zero_threshold(dtype), ws[0], kc=kc)[0], ref)
                t = gpu_timer.chain_time(lambda xi, i: G._launch_spin("cuda", xi, wts[i % len(wts)], G.zero_threshold(dtype),
                                                                      ws[i % len(ws)], kc=kc)[0], xs)
                print(f"spinlong-u{u} float16 {out_dim}x{in_dim} s={s} kc={kc}{'*' if kc == ship else ' '} {t * 1e6:6.1f} us  "
                      f"rel_err {err:.1e}{'' if err < 1e-2 else '  WRONG'}", flush=True)
    launch_with(shipped)


def split_cases(wtypes: tuple[str, ...], levels: tuple[float, ...]):
    """(wtype, bits, s, run) for the split launch (q thresholded, k and v dense; Llama-3-8B: 4096
    -> 4096 + 2 x 1024) at each sparsity of q's input: ``run(kc, words)`` checks one launch
    geometry against the reference and times it in a chain, returning (relative error, seconds)."""
    nq, nkv = K.QKV
    for wtype in wtypes:
        dtype, bits, _ = K.parse_wtype(wtype)
        wts = K.weight_copies(nq + 2 * nkv, nq, wtype, transposed=True)
        ws = [G.workspace(nq + 2 * nkv) for _ in range(64)]
        x = mx.random.normal((1, nq)).astype(dtype)
        for s in levels:
            t = mx.array([mx.sort(mx.abs(x.astype(mx.float32))[0])[int(s * nq)].item()], dtype=dtype)
            ref = G.reference_sparse_input(x, wts[0], t, nt=nq)[0]
            mx.eval(t, ref)

            def run(kc=None, words=None, x=x, t=t, ref=ref, wts=wts, ws=ws):
                err = K.rel_err(G._launch_spin("cuda", x, wts[0], t, ws[0], kc=kc, words=words, nt=nq)[0], ref)
                tm = gpu_timer.chain_time(lambda xi, i: G._launch_spin(
                    "cuda", xi, wts[i % len(wts)], t, ws[i % len(ws)], kc=kc, words=words, nt=nq)[0], x)
                return err, tm

            yield wtype, bits, s, run


def sweep_split() -> None:
    """Split-K chunk of the split launch: its 24 output tiles make the default chunk 128 rows, 768
    blocks, about 1.2 waves of 5 resident blocks per SM. Each chunk checked against the reference
    and timed in a chain."""
    nq, nkv = K.QKV
    for wtype, bits, s, run in split_cases(("float16", "q4g64"), (0.0, 0.5, 0.7)):
        ship = G.spin_geometry(1, nq, nq + 2 * nkv, bits)[2]
        for kc in ((32, 64, 128, 256) if bits else (64, 128, 256, 512)):
            err, tm = run(kc)
            print(f"split {wtype} {nq + 2 * nkv}x{nq} s={s} kc={kc}{'*' if kc == ship else ' '} {tm * 1e6:6.1f} us"
                  f"  err {err:.1e}", flush=True)


def sweep_split_words() -> None:
    """The split launch's tile width at 4 and 8 bits (``spin_q_words`` keeps the wide tile there:
    its narrow grid, 384 blocks, fills under 7/8 of a wave, and narrow tiles were measured on
    4096 -> 4096 and down_proj only, session 26): (words, chunk) of the narrow and the wide tile,
    each with 128- and 256-row chunks, each checked and timed in a chain; the shipped choice is
    marked *."""
    nq, nkv = K.QKV
    n = nq + 2 * nkv
    for wtype, bits, s, run in split_cases(("q4g64", "q8g32"), (0.5, 0.7)):
        ship = G.spin_geometry(1, nq, n, bits)
        wide = G.spin_words(1, bits)
        for words in (wide // 2, wide):
            for kc in (128, 256):
                err, tm = run(kc, words)
                mark = "*" if (words, kc) == (ship[0], ship[2]) else " "
                print(f"splitw {wtype} {n}x{nq} s={s} words={words} kc={kc}{mark} {tm * 1e6:6.1f} us  err {err:.1e}",
                      flush=True)


def spin_q_cases():
    """(wtype, bits, shape, s, run, dense) for spin_q at 4 and 8 bits on 4096x4096 and down_proj's
    shape, 50% and 70%: ``run(kc, words)`` checks one launch geometry against the reference and
    times it in a chain (None: the shipped choice), returning (relative error, seconds); ``dense``
    is MLX's quantized_matmul of the same shape in a chain (seconds), the 1.6x target's baseline."""
    for wtype in ("q4g64", "q8g32"):
        dtype, bits, _ = K.parse_wtype(wtype)
        for out_dim, in_dim in (K.SHAPES[2], K.SHAPES[0]):
            dws = K.weight_copies(out_dim, in_dim, wtype)
            dense = gpu_timer.chain_time(K.dense_op(dws), mx.random.normal((1, in_dim)).astype(dtype))
            del dws
            wts = K.weight_copies(out_dim, in_dim, wtype, transposed=True)
            ws = [G.workspace(out_dim) for _ in range(64)]
            for s in (0.5, 0.7):
                xs = K.sparse_vec(1, in_dim, s, dtype)
                ref = G.reference_sparse_input(xs, wts[0])[0]
                mx.eval(xs, ref)

                def run(kc=None, words=None, xs=xs, ref=ref, wts=wts, ws=ws, dtype=dtype):
                    z = G.zero_threshold(dtype)
                    err = K.rel_err(G._launch_spin("cuda", xs, wts[0], z, ws[0], kc=kc, words=words)[0], ref)
                    t = gpu_timer.chain_time(lambda xi, i: G._launch_spin("cuda", xi, wts[i % len(wts)], z, ws[i % len(ws)],
                                                                          kc=kc, words=words)[0], xs)
                    return err, t

                yield wtype, bits, (out_dim, in_dim), s, run, dense


def sweep_spin_q() -> None:
    """spin_q words per lane (output tile width) x split-K chunk, 4-bit and 8-bit, on 4096x4096 and
    down_proj's shape; each configuration is also checked against the reference."""
    for wtype, bits, (out_dim, in_dim), s, run, dense in spin_q_cases():
        ship_w, _, ship_kc = G.spin_geometry(1, in_dim, out_dim, bits)
        for words in (1, 2, 4):
            for kc in (64, 128, 256):
                err, t = run(kc, words)
                mark = "*" if (words, kc) == (ship_w, ship_kc) else " "
                print(f"spinq {wtype} {out_dim}x{in_dim} s={s} words={words} kc={kc}{mark} {t * 1e6:6.1f} us  "
                      f"dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x  rel_err {err:.1e}", flush=True)


def sweep_spin_q_rows(u: int = 8) -> None:
    """spin_q with U rows in flight per warp instead of the shipped 4 (a source edit, as in
    quant_variants.py; checked against the reference), words per lane x chunk, against the shipped
    launch: half2 products changed a row's instruction and register cost, and with it the best
    number of rows in flight (session 12: U = 2 and 8 both lost or tied)."""
    header, body = G.read_source("cuda", "spin_q")
    assert "constexpr int U = 4;" in body
    variant = mx.fast.cuda_kernel(name=f"chess_spin_q_u{u}", input_names=G._INPUTS["spin_q"],
                                  output_names=G._OUTPUTS["spin_q"], header=header,
                                  source=body.replace("constexpr int U = 4;", f"constexpr int U = {u};"))
    shipped = G._kernel
    for wtype, _, (out_dim, in_dim), s, run, _ in spin_q_cases():
        ship = run()[1]
        G._kernel = lambda kind, name: variant if name == "spin_q" else shipped(kind, name)
        try:
            for words in (1, 2, 4):
                for kc in (128, 256):
                    err, t = run(kc, words)
                    print(f"spinq-u{u} {wtype} {out_dim}x{in_dim} s={s} words={words} kc={kc} {t * 1e6:6.1f} us  "
                          f"shipped(U=4) {ship * 1e6:6.1f} us  rel_err {err:.1e}", flush=True)
        finally:
            G._kernel = shipped


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1].split(",") if "--only" in sys.argv else ["spout", "spoutq", "spin", "spinq", "gateup"]
    mx.random.seed(0)
    if "spout" in only:
        sweep_spout()
    if "spoutq" in only:
        sweep_spout_q()
    if "spin" in only:
        sweep_spin()
    if "spinf" in only:
        sweep_spin(("float16",), (0.0, 0.5, 0.7), (64, 128, 256, 512))
    if "spinq" in only:
        sweep_spin_q()
    if "gateup" in only:
        sweep_gateup()
    if "split" in only:
        sweep_split()
    if "splitw" in only:
        sweep_split_words()
    rows = int(sys.argv[sys.argv.index("--rows") + 1]) if "--rows" in sys.argv else None
    if "spinlong" in only:
        sweep_spin_long(u=rows or 4)
    if "spinqu" in only:
        sweep_spin_q_rows(rows or 8)


def sweep_spout() -> None:
    for wtype in ("float16", "q4g64"):
        dtype = K.parse_wtype(wtype)[0]
        for out_dim, in_dim in K.SHAPES:
            ws = K.weight_copies(out_dim, in_dim, wtype)
            x = mx.random.normal((1, in_dim)).astype(dtype)
            dense = gpu_timer.chain_time(K.dense_op(ws), x)
            for s in (0.5, 0.7):
                a = K.sparse_vec(1, out_dim, s, dtype)
                mx.eval(a)
                if wtype == "float16":
                    ship, opts, key = G.spout_warps_per_row(in_dim * 2), (1, 2, 4, 8), "wpr"
                else:
                    ship, opts, key = G.spout_q_geometry(1, in_dim, out_dim, 4)[0], (1, 2, 4, 8), "rpw"
                for v in opts:
                    t = gpu_timer.chain_time(lambda xi, i: G._launch_spout("cuda", xi, ws[i % len(ws)], a, **{key: v}), x)
                    print(f"spout {wtype} {out_dim}x{in_dim} s={s} {key}={v}{'*' if v == ship else ' '} "
                          f"{t * 1e6:6.1f} us  dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x", flush=True)


def sweep_spout_q() -> None:
    """spout_q rows per warp x warps per row group (PARTS), 4-bit and 8-bit, every shape; each
    configuration is also checked against the reference (relative error printed)."""
    for wtype in ("q4g64", "q8g32"):
        for out_dim, in_dim in K.SHAPES:
            ws = K.weight_copies(out_dim, in_dim, wtype)
            x = mx.random.normal((1, in_dim)).astype(mx.float16)
            dense = gpu_timer.chain_time(K.dense_op(ws), x)
            for s in (0.5, 0.7):
                a = K.sparse_vec(1, out_dim, s, mx.float16)
                ref = G.reference_gated_sparse_output(x, K.float32_weight(ws[0]), a)
                mx.eval(a, ref)
                ship = G.spout_q_geometry(1, in_dim, out_dim, K.parse_wtype(wtype)[1])
                for rpw in (2, 4, 8):
                    for parts in (1, 2, 4, 8):
                        err = K.rel_err(G._launch_spout("cuda", x, ws[0], a, rpw=rpw, parts=parts), ref)
                        t = gpu_timer.chain_time(lambda xi, i: G._launch_spout("cuda", xi, ws[i % len(ws)], a, rpw=rpw,
                                                                               parts=parts), x)
                        mark = "*" if (rpw, parts) == ship else " "
                        print(f"spoutq {wtype} {out_dim}x{in_dim} s={s} rpw={rpw} parts={parts}{mark} {t * 1e6:6.1f} us  "
                              f"dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x  rel_err {err:.1e}", flush=True)


def sweep_gateup() -> None:
    """The fused quantized FFN front (4-bit g64 and 8-bit g32), rows per warp."""
    out_dim, in_dim = K.SHAPES[1]
    ship = G.gateup_rows_per_warp(1, in_dim, out_dim)
    for wtype in ("q4g64", "q8g32"):
        pairs = list(zip(K.weight_copies(out_dim, in_dim, wtype, per_call=2),
                         K.weight_copies(out_dim, in_dim, wtype, per_call=2)))
        x = mx.random.normal((1, in_dim)).astype(mx.float16)
        dense = gpu_timer.chain_time(lambda xi, i: tuple(K.dense(xi, w) for w in pairs[i % len(pairs)]), x)
        stacked = [G.stack_gate_up(g, u) for g, u in pairs]
        mx.eval([a for w in stacked for a in K.arrays(w)])
        for s in (0.5, 0.7):
            ts = [K.robust_channel_thresholds(x, g, s) for g, _ in pairs]
            mx.eval(ts)
            for rpw in (1, 2, 4, 8):
                t = gpu_timer.chain_time(lambda xi, i: G._launch_gateup("cuda", xi, stacked[i % len(pairs)], ts[i % len(ts)],
                                                                        rpw=rpw), x)
                print(f"gate_up {wtype} 2x{out_dim}x{in_dim} s={s} rpw={rpw}{'*' if rpw == ship else ' '} "
                      f"{t * 1e6:6.1f} us  dense {dense * 1e6:6.1f} us  {dense / t:4.2f}x", flush=True)


if __name__ == "__main__":
    main()
