"""The probe session's decision tools (benchmarks/pick_variant.py, variant_check.py): a GPU call
runs them without a person in between, so their rule and their patching are checked here, on the
probes' real outputs of sessions 24 and 25 (where nothing won) and on those outputs turned into wins."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from chess_mlx import sparse_gemv as G
from test_kernels_cpu import bench_module

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _probe_dir(tmp_path: Path, long_: str) -> Path:
    (tmp_path / "long.txt").write_text(long_)
    return tmp_path


def _faster_chunk(text: str, kc: int, factor: float) -> str:
    """The chunk sweep with chunk ``kc``'s times divided by ``factor``."""
    def row(m: re.Match) -> str:
        return f"{m.group(1)}{float(m.group(2)) / factor:6.1f} us"
    return re.sub(rf"^(spinlong-u\d+ float16 \S+ s=\S+ kc={kc}\*?\s+)([\d.]+) us", row, text, flags=re.M)


def test_pick_variant_keeps_the_shipped_kernels_on_session_24s_losses(tmp_path):
    P = bench_module("pick_variant")
    long_ = (RESULTS / "spin_long_session24.txt").read_text()
    assert P.pick(_probe_dir(tmp_path, long_)) == "shipped"
    # the same rows as wins are picked: the parser reads the files the probes write
    assert P.best_chunk(_faster_chunk(long_, 1024, 1.2)) == 1024
    assert P.pick(_probe_dir(tmp_path, _faster_chunk(long_, 1024, 1.2))) == "kc1024"
    # a chunk still slower after a 1% gain is not picked, nor a run with a wrong row
    assert P.best_chunk(_faster_chunk(long_, 768, 1.01)) is None
    assert P.best_chunk(_faster_chunk(long_, 1024, 1.2) + "\nspinlong-u4 float16 4096x14336 s=0.5 kc=1024 1.0 us  WRONG") is None


def test_variant_check_kc_changes_one_token_float_launches_only(monkeypatch):
    V = bench_module("variant_check")
    monkeypatch.setattr(G, "spin_geometry", G.spin_geometry)  # restored after the test
    monkeypatch.setattr(G, "launch_source", G.launch_source)
    assert G.spin_geometry(1, 14336, 4096)[2] == 512
    V.apply("kc1024")
    assert G.spin_geometry(1, 14336, 4096)[2] == 1024  # the FFN shapes' longest chunk
    assert G.spin_geometry(1, 4096, 14336)[2] == 1024
    assert G.spin_geometry(1, 4096, 4096)[2] == 128  # halved by the shipped rule: untouched
    assert G.spin_geometry(2, 14336, 4096)[2] == 512  # more tokens: shared memory would overflow
    assert G.spin_geometry(1, 14336, 4096, 4)[2] == 256  # quantized: untouched
    assert G.spin_partials(1, 4096) == 3 * 4096  # fixed-point totals: the scratch ignores the chunk


def _kernels_on_reference(monkeypatch):
    """benchmarks/kernels.py as the probes' CPU tests run it: the backend said to be CUDA, the
    sparse-input launches the reference path, one small shape and two weight copies (not hundreds)."""
    K = bench_module("kernels")
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    monkeypatch.setattr(G, "_launch_spin", lambda kind, x, wt, t, ws, **kw: G.reference_sparse_input(x, wt, t)[:2])
    monkeypatch.setattr(K, "SHAPES", [(256, 512)])
    monkeypatch.setattr(K, "L2_BYTES", 1)
    return K


def test_probe_main_loops_run_on_the_cpu(monkeypatch, capsys):
    """Session 24's first GPU call lost every probe at its first check (a changed return type of
    the reference). Each probe's whole loop runs here with small shapes, its launches replaced by
    the reference path and its timer by a constant: it proves the loops run, not the kernels."""
    import mlx.core as mx

    K, timer = _kernels_on_reference(monkeypatch), bench_module("gpu_timer")
    monkeypatch.setattr(K, "time_op", lambda kind, op, x, calls=48: (mx.eval(op(x, 1)), 1e-6)[1])
    monkeypatch.setattr(timer, "chain_time", lambda op, x, calls=48: (mx.eval(op(x, 1)), 1e-6)[1])
    small = [(512, 256)]
    for name, argv in (("spin_balance", ["--wtypes", "float16,q4g64"]),
                       ("spin_rounds", ["--wtypes", "float16,q4g64", "--rounds", "2"])):
        probe = bench_module(name)
        monkeypatch.setattr(probe, "SHAPES", small)
        monkeypatch.setattr("sys.argv", [name, *argv])
        assert probe.main() == 0, name
    sweep = bench_module("chain_sweep")
    sweep.sweep_spin_long(kcs=(128, 256))
    sweep.sweep_spin(("float16",), (0.0, 0.5), (64, 128))  # the spinf section's loop
    out = capsys.readouterr().out
    assert "ALL OK" in out and "WRONG" not in out
    assert out.count("spinlong-u4 float16 256x512") == 3 * 2  # three levels x two chunks
    assert out.count("spin float16 256x512") == 2 * 2 and "err " in out


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_spin_rounds_variants_compile_for_hopper(tmp_path, monkeypatch):
    """benchmarks/spin_rounds.py's edits (rows in flight, L2 prefetch) still apply to the shipped
    sources and give every spin kernel and fused variant, as launched, a kernel that compiles for
    sm_90; the prefetch variants carry their instruction. The shipped kernels add their split-K
    totals with 64-bit integer atomics."""
    import test_kernels_cpu as T

    R = bench_module("spin_rounds")
    spins = [inst for inst in T._INSTANCES if inst[0].startswith("spin")]
    assert {inst[0] for inst in spins} == {n for n in G._INPUTS if n.startswith("spin")}
    shipped = G.launch_source

    def ptx_of(insts: list, variant: str | None = None) -> str:
        """The PTX of ``insts`` as launched, with ``variant``'s texts (None: the shipped ones)."""
        monkeypatch.setattr(G, "launch_source", R.variant_launch_source(variant) if variant else shipped)
        src = ("#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
               "#include <cooperative_groups.h>\nnamespace chess_check {\n"
               + "".join(T._mlx_style_kernel(i, *inst) for i, inst in enumerate(insts)) + "}\n")
        monkeypatch.setattr(G, "launch_source", shipped)
        return T.nvcc_ptx(tmp_path, src)

    for variant, needle in (("u8", None), ("pfb", "cp.async.bulk.prefetch.L2.global"),
                            ("pfl+u8", "prefetch.global.L2")):
        ptx = ptx_of(spins, variant)
        assert ptx.count(".entry") == len(spins), variant
        if needle:
            assert ptx.count(needle) >= len(spins), variant
    # hs (head start) edits the float kernels only: every spin_f instance compiles with it
    floats = [inst for inst in spins if inst[0].startswith("spin_f")]
    ptx = ptx_of(floats, "hs")
    assert ptx.count(".entry") == len(floats) and "shfl.sync.idx" in ptx
    assert R.variant_kernel_source("hs", "cuda", "spin_q") == G.kernel_source("cuda", "spin_q")  # float only
    with pytest.raises(ValueError):
        R.variant_kernel_source("u9", "cuda", "spin_f")
    ptx = ptx_of(spins)
    assert ptx.count("atom.global.add.u64") >= len(spins) and ptx.count("atom.add.acq_rel.gpu.s32") >= len(spins)


def test_variant_check_applies_spin_rounds_edits(monkeypatch):
    V = bench_module("variant_check")
    monkeypatch.setattr(G, "launch_source", G.launch_source)  # restored after the test
    ship_f, ship_q = G.launch_source("cuda", "spin_f")[1], G.launch_source("cuda", "spout_q")
    V.apply("u8+pfb")
    body = G.launch_source("cuda", "spin_f_res")[1]
    assert "constexpr int U = 8;" in body and "ChessRowPrefetch<PFB>" in body and "PFB = 1" in body
    assert "constexpr int U = 4;" in ship_f and "ChessRowPrefetch" not in ship_f
    assert G.launch_source("cuda", "spout_q") == ship_q  # other kernels untouched


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_spin_stamps_text_compiles_for_hopper(tmp_path, monkeypatch):
    """benchmarks/spin_stamps.py's stamped spin_f / spin_q (five clock reads, a ``stamps`` output)
    still apply to the shipped sources and compile for sm_90, shipped and with spin_rounds' u8."""
    import test_kernels_cpu as T

    S, R = bench_module("spin_stamps"), bench_module("spin_rounds")
    monkeypatch.setitem(T._CUDA_TYPES, "uint64", "unsigned long long")
    for name in ("spin_f", "spin_q"):
        monkeypatch.setitem(G._OUTPUTS, name, G._OUTPUTS[name] + ["stamps"])
    insts = [(n, i, o + ["uint64"], tm) for n, i, o, tm in T._INSTANCES if n in ("spin_f", "spin_q")]
    kernel_text = __import__("chess_mlx.kernel_text", fromlist=["launch_text"])
    for base in (G.kernel_source, lambda kd, nm: R.variant_kernel_source("u8", kd, nm)):
        monkeypatch.setattr(G, "launch_source", lambda kd, nm, b=base: kernel_text.launch_text(*S.stamped_source(kd, nm, b)))
        src = ("#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\nnamespace chess_check {\n"
               + "".join(T._mlx_style_kernel(i, *inst) for i, inst in enumerate(insts)) + "}\n")
        ptx = T.nvcc_ptx(tmp_path, src)
        assert ptx.count(".entry") == len(insts) and ptx.count("%globaltimer") >= 5 * len(insts)


def test_spin_stamps_summary_of_known_stamps():
    """The phase table from synthetic stamps: 128 blocks, phases 1/2/3 us, one last block of 4 us."""
    import numpy as np

    S = bench_module("spin_stamps")
    launches = []
    for shift in (0, 50_000):
        t0 = shift + np.arange(128) * 10  # ramp 1.27 us
        s = np.stack([t0, t0 + 1000, t0 + 3000, t0 + 6000, t0 + 6000], axis=1)
        s[-1, 4] += 4000  # the last block's sum of the chunks
        launches.append(s.reshape(-1).astype(np.uint64))
    r = S.summarize(launches, 1)
    assert abs(S.summarize(launches, 2)["tail"] - 2.0) < 1e-9  # two tiles: one with a 4 us sum, one without
    assert abs(r["ramp"] - 1.27) < 1e-9 and abs(r["compact"] - 1.0) < 1e-9 and abs(r["loop"] - 2.0) < 1e-9
    assert abs(r["count_in"] - 3.0) < 1e-9 and abs(r["tail"] - 4.0) < 1e-9
    assert abs(r["span"] - (1.27 + 10.0)) < 1e-9


def test_pick_variant_reads_spin_rounds_output(tmp_path):
    """Session 25's real spin_rounds output (every variant lost) picks nothing; the same rows with
    one variant's ratios made wins pick that variant, and a wrong row or one slow row picks nothing."""
    P = bench_module("pick_variant")
    text = (RESULTS / "spin_rounds_session25.txt").read_text()
    assert P.best_rounds(text) is None
    (tmp_path / "rounds.txt").write_text(text)
    assert P.pick(tmp_path) == "shipped"
    # every ratio of the pfl column (the third) becomes 1.05
    def win(line: str, third: str = "1.050") -> str:
        tok = line.split()
        if len(tok) > 10 and "->" in tok[1] and tok[0] != "wtype":
            tok[5 + 4 + 2] = third  # after 4 + 1 times: xu8, xpfb, xpfl
        return " ".join(tok)
    won = "\n".join(win(line) for line in text.splitlines())
    assert P.best_rounds(won) == "pfl"
    (tmp_path / "rounds.txt").write_text(won)
    assert P.pick(tmp_path) == "pfl"
    assert P.best_rounds(won.replace("ALL OK", "1 WRONG")) is None
    one_slow = won.replace("1.050", "0.960", 1)
    assert P.best_rounds(one_slow) is None
    # the same winning column named as a float-atomic sum is never picked: its y may vary by run
    assert P.best_rounds(won.replace(" xpfl ", " xredv ").replace(" pfl us ", " redv us ")) is None
    assert P.best_rounds(won.replace(" xpfl ", " xredi ").replace(" pfl us ", " redi us ")) == "redi"


def test_adopted_and_retired_probe_edits_are_refused():
    """spin_rounds' edits that the H100 check made shipped text (relatom, session 25; redi, session
    26) are refused as adopted, and those of the chunk-partial sum that redi replaced as retired,
    each with its reason; the shipped epilogue is the adopted one: one acq_rel count-in and
    fixed-point totals, no loop over the chunks' partials."""
    R, V = bench_module("spin_rounds"), bench_module("variant_check")
    header = G.read_source("cuda", "spin_f")[0]
    assert 'asm volatile("atom.add.acq_rel.gpu.s32 %0, [%1], 1;"' in header
    assert "chess_fixed(s)" in header and "c < CHUNKS" not in header
    for part in R.ADOPTED:
        with pytest.raises(ValueError, match="adopted"):
            R.variant_kernel_source(part, "cuda", "spin_f")
        with pytest.raises(SystemExit, match="adopted"):
            V.apply(part)
    for part in R.RETIRED:
        with pytest.raises(ValueError, match="replaced"):
            R.variant_kernel_source(part, "cuda", "spin_q")


def test_variant_check_takes_every_spin_rounds_part(monkeypatch):
    """Session 25's follow-up check died at once: variant_check kept its own copy of spin_rounds'
    part names and missed a new one. Every part the probe applies must be one variant_check takes,
    alone and joined, and an unknown one is refused with the list."""
    V, R = bench_module("variant_check"), bench_module("spin_rounds")
    monkeypatch.setattr(G, "launch_source", G.launch_source)
    for part in R.PARTS:
        V.apply(part)
        R.variant_kernel_source(part, "cuda", "spin_q")  # and the probe applies it
    V.apply("+".join(p for p in R.PARTS if p not in R.COMPACTION_EDITS[1:]))
    with pytest.raises(SystemExit, match="pfl"):
        V.apply("nonsense")
    # two edits of the compaction are refused with one sentence, not a bare assertion at launch
    for joined in ("pfb+pfl", "u8+hs+pfb", "pfl+hs"):
        with pytest.raises(SystemExit, match="join at most one"):
            V.apply(joined)
        with pytest.raises(ValueError, match="join at most one"):
            R.variant_kernel_source(joined, "cuda", "spin_f")


def test_kernel_timings_leave_their_rows_when_cut_short(monkeypatch, tmp_path, capsys):
    """benchmarks/kernels.py prints each timing row and rewrites its JSON as the row is timed, so a
    GPU call stopped by its time limit keeps what it finished (session 28 lost a whole table when
    the rows were printed only at the end). Launches here are the reference path, the timer a
    counter that stops the run at its 12th call."""
    import json

    import mlx.core as mx

    K = _kernels_on_reference(monkeypatch)
    calls = {"n": 0}

    def timer(kind, op, x, calls_=48):
        calls["n"] += 1
        if calls["n"] == 12:
            raise TimeoutError("the call's time limit")
        mx.eval(op(x, 1))
        return 1e-6 * calls["n"]
    monkeypatch.setattr(G, "_launch_spout", lambda kind, x, w, a: G.reference_gated_sparse_output(x, w, a))
    monkeypatch.setattr(K, "time_op", timer)
    monkeypatch.setattr(K, "copy_bandwidth", lambda kind: 1e12)
    out = tmp_path / "gemv.json"
    monkeypatch.setattr("sys.argv", ["kernels", "--quick", "--skip-check", "--benches", "gemv", "--wtypes", "bfloat16",
                                     "--json", str(out)])
    with pytest.raises(TimeoutError):
        K.main()
    rows = json.loads(out.read_text())["bench"]
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("sparse_")]
    # timer calls: dense (1), then per level sparse-output and sparse-input, and for s > 0 the
    # same-bytes dense of each: levels 0 (2-3), 0.5 (4-7), 0.7 (8-11); 0.9 stops at its first
    assert [r["kernel"] for r in rows] == ["sparse_output", "sparse_input"] * 3
    assert [r["sparsity"] for r in rows] == [0.0, 0.0, 0.5, 0.5, 0.7, 0.7] and len(printed) == 6
    assert {r["wtype"] for r in rows} == {"bfloat16"}  # --wtypes picks the timed types too
    assert rows[0]["us"] == pytest.approx(2.0) and rows[1]["us"] == pytest.approx(3.0)
