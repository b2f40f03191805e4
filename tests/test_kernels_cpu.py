"""The kernel layer on the CPU: reference numbers, layouts, dispatch, and the kernel sources.

The kernels themselves run only on a GPU (benchmarks/kernels.py checks them there); here the
CUDA sources are compiled with nvcc inside the same wrapper MLX generates, and the Metal twins are
checked against the CUDA sources for the same interface.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import linear_ops as L
from chess_mlx import sparse_gemv as G


def unpack_np(q: G.QWeight) -> np.ndarray:
    """Independent float64 dequantization from the documented layout: element k of a row is in
    word k // (32/bits) at bit bits * (k % (32/bits)); value = scale * q + bias per group."""
    words = np.array(q.w).astype(np.uint64)
    per = 32 // q.bits
    k = np.arange(q.cols)
    vals = (words[:, k // per] >> (np.uint64(q.bits) * (k % per).astype(np.uint64))) & np.uint64((1 << q.bits) - 1)
    s = np.array(q.scales.astype(mx.float32), dtype=np.float64)[:, k // q.group_size]
    b = np.array(q.biases.astype(mx.float32), dtype=np.float64)[:, k // q.group_size]
    return s * vals + b


def bench_module(name: str):
    """A script module of benchmarks/ (a folder, not a package), imported by name."""
    d = str(Path(__file__).resolve().parents[1] / "benchmarks")
    if d not in sys.path:
        sys.path.insert(0, d)
    return importlib.import_module(name)


def nvcc_ptx(tmp_path, src: str) -> str:
    """PTX of the CUDA source ``src`` compiled by nvcc for sm_90 (the H100); a compile error fails
    the test with nvcc's message."""
    (tmp_path / "k.cu").write_text(src)
    r = subprocess.run(["nvcc", "-std=c++17", "-arch=sm_90", "--ptx", "-o", str(tmp_path / "k.ptx"),
                        str(tmp_path / "k.cu")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return (tmp_path / "k.ptx").read_text()


def sparse(shape, s, rng):
    v = rng.standard_normal(shape)
    v[rng.random(shape) < s] = 0.0
    return v


@pytest.mark.parametrize("bits,gs", [(4, 64), (4, 32), (8, 64), (8, 32)])
def test_quantized_layouts_match_documented_packing(bits, gs):
    rng = np.random.default_rng(bits * gs)
    W = rng.standard_normal((128, 256)).astype(np.float32)
    q = G.QWeight.quantize(mx.array(W), bits, gs)
    np.testing.assert_allclose(unpack_np(q), np.array(q.dequantize()), rtol=1e-6, atol=1e-6)
    # transposed layout: quantize(W^T) groups along W's *output* dimension
    qt = G.QWeight.quantize(mx.array(W.T.copy()), bits, gs)
    assert qt.rows == W.shape[1] and qt.cols == W.shape[0]
    assert np.abs(unpack_np(qt) - W.T).max() < (0.2 if bits == 4 else 0.02) * np.abs(W).max()


@pytest.mark.parametrize("wtype", ["f32", "q4", "q8"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9, 0.99])
def test_reference_paths_against_float64(wtype, s):
    rng = np.random.default_rng(int(s * 100) + len(wtype))
    out_dim, in_dim, m = 64, 128, 2
    W = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    x = rng.standard_normal((m, in_dim)).astype(np.float32)
    a = sparse((m, out_dim), s, rng).astype(np.float32)
    xs = sparse((m, in_dim), s, rng).astype(np.float32)
    if wtype == "f32":
        w, wt, Wd, WTd = mx.array(W), mx.array(W.T.copy()), W.astype(np.float64), W.T.astype(np.float64)
    else:
        bits = int(wtype[1])
        w, wt = G.QWeight.quantize(mx.array(W), bits, 32), G.QWeight.quantize(mx.array(W.T.copy()), bits, 32)
        Wd, WTd = unpack_np(w), unpack_np(wt)
    y = np.array(G.gated_sparse_output(mx.array(x), w, mx.array(a)))
    want = a * (x.astype(np.float64) @ Wd.T)
    np.testing.assert_allclose(y, want, rtol=1e-4, atol=1e-4 * np.abs(want).max() + 1e-6)
    assert np.all(y[a == 0] == 0), "inactive rows must be exact zeros"
    y2, d2 = G.sparse_input(mx.array(xs), wt)
    want2 = xs.astype(np.float64) @ WTd
    np.testing.assert_allclose(np.array(y2), want2, rtol=1e-4, atol=1e-4 * np.abs(want2).max() + 1e-6)
    assert d2.item() == pytest.approx(np.mean(xs != 0))


@pytest.mark.parametrize("per_channel", [False, True])
def test_thresholded_sparse_input_and_gate_up_against_float64(per_channel):
    """The fused products' reference: threshold inside sparse_input (with its density), and the
    CATS/CHESS FFN front gate_up = keep(SiLU(x Wg^T), t) * (x Wu^T), against numpy float64."""
    rng = np.random.default_rng(11 + per_channel)
    n, k = 96, 64
    x = rng.standard_normal((1, k)).astype(np.float32)
    Wt = rng.standard_normal((k, n)).astype(np.float32)
    t = (np.abs(rng.standard_normal(k)) * 0.8).astype(np.float32) if per_channel else np.float32(0.7)
    y, dens = G.sparse_input(mx.array(x), mx.array(Wt), mx.array(t))
    keep = np.abs(x) >= t
    want = np.where(keep, x, 0).astype(np.float64) @ Wt
    np.testing.assert_allclose(np.array(y), want, rtol=1e-5, atol=1e-5)
    assert dens.item() == pytest.approx(keep.mean()) and 0 < dens.item() < 1

    Wg = rng.standard_normal((n, k)).astype(np.float32)
    Wu = rng.standard_normal((n, k)).astype(np.float32)
    g = x.astype(np.float64) @ Wg.T
    a = g / (1 + np.exp(-g))
    tc = (np.abs(rng.standard_normal(n)) * 0.5).astype(np.float32) if per_channel else np.float32(0.5)
    h = np.array(G.gate_up(mx.array(x), mx.array(Wg), mx.array(Wu), mx.array(tc)))
    kept = np.abs(a) >= tc
    want_h = np.where(kept, a, 0) * (x.astype(np.float64) @ Wu.T)
    np.testing.assert_allclose(h, want_h, rtol=1e-4, atol=1e-4)
    assert np.all(h[~kept] == 0) and 0 < kept.mean() < 1


def test_workspace_and_threshold_shape_checks():
    ws = G.workspace(14336)
    assert ws.sem.dtype == mx.int32 and ws.sem.size == 14336 // 128 + 2 and not np.array(ws.sem).any()
    # one workspace serves every spin launch on n outputs: spin_f (256-output tiles) and spin_q at
    # any token count and width (8 bits, one word per lane: 128 outputs; missed before session 9),
    # with the counter of a fused output norm (sem[tiles + 1]) too
    for n in (4096, 14336, 4100):
        sem = G.workspace(n).sem.size
        assert sem >= -(-n // 256) + 2
        for kind in ("cuda", "metal"):
            for m in (1, 2, 3, 4):
                for bits in (4, 8):
                    assert sem >= -(-n // (32 * G.spin_words(m, bits, kind) * (32 // bits))) + 2, (n, kind, m, bits)
    # a workspace made with the site's input holds the split-K totals of that launch, zeros: three
    # 32-bit words per token and output whatever the chunk (the Metal twin's lo, mid, hi words)
    for m, k, n in ((1, 14336, 4096), (1, 4096, 4096), (2, 4096, 14336)):
        ws = G.workspace(n, mx.zeros((1, m, k), dtype=mx.float16))
        assert ws.partial.dtype == mx.float32 and ws.partial.size == 3 * m * n
        assert not np.array(ws.partial).any()
        assert ws.last.shape == (1, m, n)
    # the fixed-point totals have headroom for 511 chunks: longer inputs take the reference path
    x_long = mx.zeros((1, 512 * 512), dtype=mx.float16)
    assert not G.kernel_supports("cuda", x_long, mx.zeros((512 * 512, 256), dtype=mx.float16), transposed=True)
    assert G.kernel_supports("cuda", x_long[:, :511 * 512], mx.zeros((511 * 512, 256), dtype=mx.float16), transposed=True)
    with pytest.raises(ValueError, match="at most 511"):
        G._launch_spin("cuda", x_long, mx.zeros((512 * 512, 256), dtype=mx.float16), G.zero_threshold(mx.float16),
                       G.workspace(256))
    assert G._tpc(mx.zeros((1,)), 4096) == 0 and G._tpc(mx.zeros((4096,)), 4096) == 1
    with pytest.raises(ValueError):
        G._tpc(mx.zeros((100,)), 4096)
    with pytest.raises(ValueError, match="workspace too small"):
        G._launch_spin("cuda", mx.zeros((1, 4096), dtype=mx.float16), mx.zeros((4096, 4096), dtype=mx.float16),
                       G.zero_threshold(mx.float16), G.workspace(256))


def test_dispatch_on_cpu_and_force_switch(monkeypatch):
    assert G.backend() == "reference"  # CPU: never a kernel
    G.force_reference(True)
    assert G.backend() == "reference"
    G.force_reference(False)
    x16 = mx.zeros((1, 4096), dtype=mx.float16)
    w16 = mx.zeros((1024, 4096), dtype=mx.float16)
    assert G.kernel_supports("cuda", x16, w16, transposed=False)
    assert not G.kernel_supports("cuda", x16.astype(mx.float32), w16, transposed=False)  # fp32: reference
    assert not G.kernel_supports("cuda", mx.zeros((9, 4096), dtype=mx.float16), w16, transposed=False)
    assert not G.kernel_supports("cuda", mx.zeros((1, 4100), dtype=mx.float16),
                                 mx.zeros((1024, 4100), dtype=mx.float16), transposed=False)
    q = G.QWeight.quantize(mx.zeros((4096, 1024)), 4, 64)
    q = G.QWeight(q.w, q.scales.astype(mx.float16), q.biases.astype(mx.float16), 4, 64)
    assert G.kernel_supports("cuda", x16, q, transposed=True)
    assert not G.kernel_supports("cuda", mx.zeros((8, 4096), dtype=mx.float16), q, transposed=True)  # M <= 4
    # the model only uses kernels for one-token decode
    assert L.KERNEL_MAX_TOKENS == 1


def test_launch_geometry():
    # split-K: the longest chunk that still gives 3 blocks per H100 SM (session 10 sweep)
    assert G.split_k_chunk(14336, 16, quantized=False) == 512  # 448 blocks
    assert G.split_k_chunk(14336, 8, quantized=True) == 256  # 448 blocks (128 rows: 2.3 us slower)
    assert G.split_k_chunk(4096, 28, quantized=True) == 256  # 14336 outputs, 448 blocks
    assert G.split_k_chunk(4096, 8, quantized=True) == 64  # 4096 outputs: 512 blocks
    assert G.split_k_chunk(4096, 2, quantized=True) == 64  # the floor
    assert G.split_k_chunk(4096, 16, quantized=False) == 128  # 512 blocks
    for k, tiles, q in ((14336, 16, False), (4096, 8, True), (4096, 28, True), (1536, 3, False)):
        kc = G.split_k_chunk(k, tiles, q)
        assert kc == 64 or tiles * -(-k // kc) >= 3 * G.H100_SMS
    assert [G.spout_warps_per_row(b) for b in (1152, 2048, 8192, 28672)] == [1, 2, 4, 8]
    assert [G.spin_words(m) for m in (1, 2, 4)] == [2, 2, 1]
    assert [G.spin_words(m, 8) for m in (1, 2, 4)] == [4, 2, 1]  # 8 bits, one token: 512-output tiles
    # what a launch uses: (words per lane, tiles, split-K chunk); overrides move the default chunk
    assert G.spin_geometry(1, 14336, 4096) == (0, 16, 512)
    assert G.spin_geometry(1, 14336, 4096, 4) == (2, 8, 256)
    # one token, the narrow tile where its grid fills one wave (session 26's sweep): 512 blocks
    # on 4096 -> 4096, while down_proj's 14336 inputs would need 896 and keep the wide tile
    assert G.spin_geometry(1, 4096, 4096, 4) == (1, 16, 128)
    assert G.spin_geometry(1, 4096, 4096, 8) == (2, 16, 128)
    assert G.spin_geometry(1, 14336, 4096, 8) == (4, 8, 256)
    assert G.spin_geometry(2, 4096, 4096, 4) == (2, 8, 64)  # more tokens: spin_words as it is
    # q with k and v (4096 -> 6144): the narrow grid would be 384 blocks, under 7/8 of a wave (not
    # measured yet); Qwen2-7B's down_proj (18944 -> 3584): 1036 blocks; small shapes: a few blocks
    assert G.spin_geometry(1, 4096, 6144, 4) == (2, 12, 128) and G.spin_geometry(1, 4096, 6144, 8) == (4, 12, 128)
    assert G.spin_geometry(1, 18944, 3584, 4) == (2, 7, 256) and G.spin_geometry(1, 18944, 3584, 8) == (4, 7, 256)
    assert G.spin_geometry(1, 512, 1024, 4) == (2, 2, 64)
    assert G.spin_geometry(1, 4096, 4096, 4, words=2) == (2, 8, 64)
    assert G.spin_geometry(1, 4096, 4096, 4, kc=64) == (1, 16, 64)
    assert [G.spout_rows_per_warp(m, 4096, 14336) for m in (1, 2, 4, 8)] == [8, 4, 4, 2]
    assert G.spout_rows_per_warp(1, 4096, 4096) == 4  # 8 would leave 64 blocks for 132 SMs
    assert [G.spout_rows_per_warp(m, 14336, 14336) for m in (1, 4, 8)] == [4, 4, 2]
    # spout_q and gateup_q, one token: rows per warp x warps per row group (session 11 sweep)
    assert G.spout_q_geometry(1, 4096, 14336, 4) == (4, 4)
    assert G.spout_q_geometry(1, 14336, 4096, 4) == (4, 2)
    assert G.spout_q_geometry(1, 4096, 14336, 4, mx.bfloat16) == (8, 4)  # float32 dot product: session 10's choice
    assert G.gateup_rows_per_warp(1, 4096, 14336) == 2
    assert G.gateup_rows_per_warp(1, 4096, 14336, mx.bfloat16) == G.spout_rows_per_warp(1, 4096, 14336) == 8
    assert G.spout_q_geometry(1, 4096, 4096, 8) == (4, 4)
    assert G.spout_q_geometry(1, 14336, 4096, 8) == (4, 8)
    assert G.spout_q_geometry(1, 896, 4864, 4) == (4, 1)  # 28 steps per row: one warp's lanes
    assert G.spout_q_geometry(1, 2048, 4864, 4) == (4, 2)
    assert G.spout_q_geometry(4, 4096, 4096, 4) == (4, 1)
    for k, bits in ((512, 4), (896, 8), (4096, 4), (14336, 8)):
        rpw, parts = G.spout_q_geometry(1, k, 4096, bits)
        assert 8 % parts == 0 and (parts == 1 or 32 * parts <= k * bits // 128)


@pytest.mark.parametrize("bits", [4, 8])
def test_metal_spin_geometry_fits_a_threadgroup(bits):
    """Apple GPUs allow 32 KB of threadgroup memory: the Metal launch narrows spin_q's lanes where
    the 4-bit reduction tile would not fit; spin_f fits at its largest chunk and batch."""
    for m in (1, 2, 4):  # spin_q takes M <= 4; quantized chunks are at most 256 rows
        w = G.spin_words(m, bits, "metal")
        assert G.spin_threadgroup_bytes(m, 256, w, bits) <= G.METAL_THREADGROUP_BYTES
        assert w <= G.spin_words(m, bits, "cuda")
    assert G.spin_words(1, 4, "metal") == 2 and G.spin_words(1, 8, "metal") == 4  # 512-output tiles on both
    assert G.spin_threadgroup_bytes(1, 256, 4, 4) > G.METAL_THREADGROUP_BYTES  # what it avoids
    assert G.spin_threadgroup_bytes(G.MAX_TOKENS, 512) <= G.METAL_THREADGROUP_BYTES


@pytest.mark.parametrize("kind,name", [("cuda", "spin_f"), ("cuda", "spin_q"), ("metal", "spin_f"), ("metal", "spin_q")])
def test_spin_threadgroup_bytes_match_the_declarations(kind, name):
    """The byte count the launcher budgets is what the source declares (arrays evaluated with the
    template values), so the Metal geometry check above sees the real footprint."""
    _, body = G.read_source(kind, name)
    sizes = {"int": 4, "float": 4, "float4": 16}
    decl = re.compile(r"^(?:threadgroup|__shared__)\s+(?:__align__\(\d+\)\s+)?(int|float4|float)\s+(\w+)((?:\[[^\]]+\])*);",
                      re.M)
    for m, kc, words, bits in ((1, 512, 2, 4), (1, 256, 4, 4), (2, 128, 2, 8), (4, 64, 1, 4)):
        tile = 256 if name == "spin_f" else 32 * words * (32 // bits)
        env = {"KC": kc, "M": m, "TILE": tile}
        total = 0
        for typ, _name, dims in decl.findall(body):
            n = 1
            for d in re.findall(r"\[([^\]]+)\]", dims):
                n *= eval(d.replace("/", "//"), {}, env)  # C integer division
            total += sizes[typ] * n
        want = G.spin_threadgroup_bytes(m, kc, words, None if name == "spin_f" else bits)
        assert total == want, (kind, name, m, kc, words, bits)


def test_transposed_weight_for_kernels():
    import mlx.nn as nn

    lin = nn.Linear(64, 32, bias=False)
    np.testing.assert_array_equal(np.array(L.transposed_weight(lin)), np.array(lin.weight.T))
    ql = nn.QuantizedLinear(64, 32, bias=False, group_size=32, bits=8)
    wt = L.transposed_weight(ql)
    deq = np.array(mx.dequantize(ql.weight, ql.scales, ql.biases, group_size=32, bits=8))
    assert wt.rows == 64 and wt.cols == 32
    assert np.abs(np.array(wt.dequantize()) - deq.T).max() < 0.02 * np.abs(deq).max()
    assert L.transposed_weight(ql) is wt  # built once


# ------------------------------------------------------------------ kernel sources -------------
def _template_line(src: str) -> tuple[str, ...]:
    m = re.search(r"Template: ([^\n]*)", src)
    assert m, "no Template: line"
    names = re.sub(r"\([^)]*\)", "", m.group(1)).split(".")[0]
    return tuple(t.strip() for t in names.split(","))


def _balanced(src: str) -> bool:
    code = re.sub(r"//.*", "", src)
    return all(code.count(a) == code.count(b) for a, b in ("{}", "()", "[]"))


def test_cuda_sources_use_no_host_only_type_names():
    """NVRTC, which compiles the kernels on a CUDA machine, sees no glibc headers, so ``uint`` and
    its kin (typedefs of <sys/types.h>, and Metal's names) are unknown there, while the nvcc check
    below compiles them through the host compiler's headers (session 35: kv_write.cu failed on the
    GPU only)."""
    root = Path(G.__file__).resolve().parents[1] / "cuda"
    for f in sorted(root.iterdir()):
        code = re.sub(r"//.*", "", f.read_text())
        found = re.findall(r"\b(uint|ulong|ushort|uchar)\b", code)
        assert not found, (f.name, sorted(set(found)))


def test_wheel_carries_every_kernel_source():
    """pyproject.toml maps the top-level cuda/ and metal/ folders into the package (data packages
    chess_mlx.cuda / chess_mlx.metal) and its globs match every source file there, including the
    shared prologue a body includes, so an installed wheel reads what a checkout reads."""
    tomllib = pytest.importorskip("tomllib")
    root = Path(G.__file__).resolve().parents[1]
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    for kind in ("cuda", "metal"):
        pkg = f"chess_mlx.{kind}"
        assert pkg in cfg["packages"] and cfg["package-dir"][pkg] == kind
        files = sorted(p.name for p in (root / kind).iterdir() if p.is_file())
        assert files, kind
        for f in files:
            assert any(Path(f).match(g) for g in cfg["package-data"][pkg]), (kind, f)
        for name in G.TEMPLATES:  # every included file exists beside the body
            body = (root / kind / f"{name}.{'cu' if kind == 'cuda' else 'metal'}").read_text()
            for inc in re.findall(r'^#include "([^"]+)"', body, re.M):
                assert inc in files, (kind, name, inc)
    assert G.source_dir("cuda").name == "cuda" and (G.source_dir("cuda") / "common.cuh").is_file()


@pytest.mark.parametrize("name", sorted(G.TEMPLATES))
def test_cuda_and_metal_twins_share_interface(name):
    cu_h, cu = G.read_source("cuda", name)
    mt_h, mt = G.read_source("metal", name)
    assert _template_line(cu) == G.TEMPLATES[name]
    assert _template_line(mt) == G.TEMPLATES[name]
    assert f"cuda/{name}.cu" in mt, "the Metal source must name its CUDA twin"
    for ident in G._INPUTS[name] + G._OUTPUTS[name]:
        assert re.search(rf"\b{ident}\b", cu) and re.search(rf"\b{ident}\b", mt), ident
    for tmpl in G.TEMPLATES[name]:
        assert re.search(rf"\b{tmpl}\b", cu) and re.search(rf"\b{tmpl}\b", mt), tmpl
    assert _balanced(cu) and _balanced(mt) and _balanced(cu_h) and _balanced(mt_h)
    # same helpers and the same tiling constants on both sides
    for helper in re.findall(r"\b(chess_\w+)\s*[<(]", cu):
        assert helper in mt or helper == "chess_warp_sum", helper
    for const in re.findall(r"constexpr int (\w+) = ", cu):
        assert re.search(rf"constexpr int {const} = ", mt), const


@pytest.mark.parametrize("name", sorted(G.RESIDUAL_VARIANTS))
def test_residual_variants_read_their_input_only_when_defined(name):
    """A residual variant is its base source with CHESS_RESIDUAL defined: both twins read the
    extra input ``r`` inside that #ifdef only (the base kernel has no such input) and pass it to
    the shared epilogue, which adds it after y's own rounding."""
    base = G.RESIDUAL_VARIANTS[name]
    assert G._INPUTS[name] == G._INPUTS[base] + ["r"] and G._OUTPUTS[name] == G._OUTPUTS[base]
    for kind in ("cuda", "metal"):
        header, body = G.kernel_source(kind, name)
        assert body.startswith("#define CHESS_RESIDUAL") and G.read_source(kind, base)[1] in body
        guarded = re.search(r"#ifdef CHESS_RESIDUAL\n(.*?)#else\n(.*?)#endif", body, re.S)
        assert guarded and re.search(r"\br\b", guarded.group(1)) and not re.search(r"\br\b", guarded.group(2))
        rest = body.replace(guarded.group(0), "")
        assert not re.search(r"\br\b", re.sub(r"//.*", "", rest)), "r read outside the #ifdef"
        assert re.search(r"chess_spin_finish<[^;]*\bres\b", body, re.S)
        assert re.search(r"if \(res\) s = ", header)


_NORM_INPUTS = {"CHESS_XNORM": "gx", "CHESS_YNORM": "gy"}


@pytest.mark.parametrize("name", sorted(n for n, (_, d) in G.VARIANTS.items() if set(d) & set(_NORM_INPUTS)))
def test_norm_variants_read_their_inputs_only_when_defined(name):
    """A fused-norm variant is its base source with its defines: both twins read the norm's weight
    (``gx`` / ``gy``) and write ``yn`` inside the #ifdef only, take the norm's eps as the template
    EPSB there only, and hand them to the shared compaction / epilogue."""
    base, defines = G.VARIANTS[name]
    extra = (["r"] if "CHESS_RESIDUAL" in defines else []) + [_NORM_INPUTS[d] for d in defines if d in _NORM_INPUTS]
    extra += ["rp", "rf"] if "CHESS_ROPE" in defines else []
    assert G._INPUTS[name] == G._INPUTS[base] + extra
    assert G._OUTPUTS[name] == G._OUTPUTS[base] + (["yn"] if "CHESS_YNORM" in defines else [])
    for kind in ("cuda", "metal"):
        header, body = G.kernel_source(kind, name)
        assert body.startswith("".join(f"#define {d} 1\n" for d in defines))
        code = re.sub(r"//.*", "", G.read_source(kind, base)[1])
        for d, ident in list(_NORM_INPUTS.items()) + [("CHESS_YNORM", "yn")]:
            guarded = re.search(rf"#ifdef {d}\n(.*?)#else\n(.*?)#endif", code, re.S)
            assert guarded and re.search(rf"\b{ident}\b", guarded.group(1)), (d, ident)
            assert not re.search(rf"\b{ident}\b", code.replace(guarded.group(0), "")), f"{ident} outside #ifdef {d}"
        eps = re.search(r"#if defined\(CHESS_XNORM\) \|\| defined\(CHESS_YNORM\)\n(.*?)#else", code, re.S)
        assert eps and "EPSB" in eps.group(1) and "EPSB" not in code.replace(eps.group(0), "")
        assert re.search(r"chess_compact<M, K, KC, TPC>\(x, t, xg, eps, wss,", code)
        assert re.search(r"res, yg, ynorm, eps(, theta)?\);", code)
        assert re.search(r"chess_rms_scales<T, M, K>\(x, g, eps, nsum, rs", header)


@pytest.mark.parametrize("name", sorted(n for n, (_, d) in G.VARIANTS.items() if "CHESS_ROPE" in d))
def test_rope_variants_read_their_inputs_only_when_defined(name):
    """A fused-rope variant reads the position ``rp`` and inverse frequencies ``rf`` and the ROPE_*
    templates inside #ifdef CHESS_ROPE only (both twins), where it computes its angle, and hands the
    head size, rotated count and layout to the shared epilogue; the other kernels pass zeros."""
    base, defines = G.VARIANTS[name]
    assert G._INPUTS[name][-2:] == ["rp", "rf"] and G._OUTPUTS[name] == G._OUTPUTS[base]
    for kind in ("cuda", "metal"):
        code = re.sub(r"//.*", "", G.read_source(kind, base)[1])
        guarded = re.search(r"#ifdef CHESS_ROPE\n(.*?)#else\n(.*?)#endif", code, re.S)
        assert guarded and "chess_rope_theta<RD, RT>(rp, rf," in guarded.group(1)
        assert "RN = 0" in guarded.group(2) and "theta = 0.0f" in guarded.group(2)
        rest = code.replace(guarded.group(0), "")
        for ident in ("rp", "rf", "ROPE_D", "ROPE_N", "ROPE_TRAD", "ROPE_SB"):
            assert re.search(rf"\b{ident}\b", guarded.group(1)) and not re.search(rf"\b{ident}\b", rest), ident
        assert re.search(r"chess_spin_finish<T, M, N, K, KC, (8|VPL), RD, RN, RT>\(.*eps, theta\);", code, re.S)


_CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16", "uint32": "uint32_t", "float32": "float",
               "int32": "int32_t"}
_INSTANCES = [
    ("spout_f", ["float16", "float16", "float16"], ["float16"], dict(T="float16", M=1, K=4096, N=14336, WPR=4)),
    ("spout_f", ["bfloat16", "bfloat16", "bfloat16"], ["bfloat16"], dict(T="bfloat16", M=2, K=576, N=1536, WPR=1)),
    ("spout_q", ["float16", "uint32", "float16", "float16"], ["float16"],
     dict(T="float16", M=1, K=4096, N=14336, BITS=4, GS=64, RPW=4, PARTS=1)),
    ("spout_q", ["float16", "uint32", "float16", "float16"], ["float16"],
     dict(T="float16", M=1, K=14336, N=4096, BITS=4, GS=64, RPW=8, PARTS=4)),
    ("spout_q", ["bfloat16", "uint32", "bfloat16", "bfloat16"], ["bfloat16"],
     dict(T="bfloat16", M=8, K=4096, N=4100, BITS=8, GS=32, RPW=2, PARTS=2)),
    ("spout_q", ["float16", "uint32", "float16", "float16"], ["float16"],
     dict(T="float16", M=2, K=14336, N=4096, BITS=8, GS=32, RPW=4, PARTS=8)),
    ("spin_f", ["float16", "float16", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=14336, N=4096, KC=512, TPC=0, NT=4096)),
    ("spin_f", ["bfloat16", "float32", "bfloat16", "int32", "float32"], ["bfloat16", "float32"],
     dict(T="bfloat16", M=4, K=1536, N=576, KC=64, TPC=1, NT=576)),
    ("spin_q", ["float16", "float32", "uint32", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=14336, N=4096, BITS=4, GS=64, KC=128, WORDS=2, TPC=1, NT=4096)),
    ("spin_q", ["bfloat16", "bfloat16", "uint32", "bfloat16", "int32", "float32"], ["bfloat16", "float32"],
     dict(T="bfloat16", M=2, K=4096, N=4096, BITS=8, GS=32, KC=128, WORDS=2, TPC=0, NT=4096)),
    ("spin_q", ["float16", "float16", "uint32", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=4, K=4096, N=4096, BITS=8, GS=32, KC=64, WORDS=1, TPC=0, NT=4096)),
    ("spin_q", ["float16", "float16", "uint32", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=2, K=14336, N=4096, BITS=4, GS=32, KC=256, WORDS=4, TPC=0, NT=4096)),
    ("spin_f_res", ["float16", "float16", "float16", "int32", "float32", "float32", "float16"], ["float16", "float32"],
     dict(T="float16", M=1, K=14336, N=4096, KC=512, TPC=0, NT=4096)),
    ("spin_q_res", ["float16", "float16", "uint32", "float16", "int32", "float32", "float32", "float16"],
     ["float16", "float32"], dict(T="float16", M=1, K=14336, N=4096, BITS=4, GS=64, KC=256, WORDS=2, TPC=0, NT=4096)),
    # fused RMSNorms: of x (q's head launch, split), of y (o's launch, with the residual)
    ("spin_f_xnorm", ["float16", "float16", "float16", "int32", "float32", "float32", "float16"], ["float16", "float32"],
     dict(T="float16", M=1, K=4096, N=6144, KC=256, TPC=0, NT=4096, EPSB=897988541)),
    ("spin_q_xnorm", ["bfloat16", "float32", "uint32", "bfloat16", "int32", "float32", "float32", "bfloat16"],
     ["bfloat16", "float32"], dict(T="bfloat16", M=2, K=4096, N=6144, BITS=4, GS=64, KC=128, WORDS=2, TPC=1,
                                   NT=4096, EPSB=897988541)),
    ("spin_f_res_ynorm", ["bfloat16", "bfloat16", "bfloat16", "int32", "float32", "float32", "bfloat16", "bfloat16"],
     ["bfloat16", "float32", "bfloat16"], dict(T="bfloat16", M=1, K=4096, N=4096, KC=128, TPC=0, NT=4096,
                                               EPSB=897988541)),
    ("spin_q_res_ynorm", ["float16", "float16", "uint32", "float16", "int32", "float32", "float32", "float16",
                          "float16"], ["float16", "float32", "float16"],
     dict(T="float16", M=2, K=4096, N=4096, BITS=8, GS=32, KC=128, WORDS=1, TPC=0, NT=4096, EPSB=897988541)),
    ("spin_q_res", ["bfloat16", "float32", "uint32", "bfloat16", "int32", "float32", "float32", "bfloat16"],
     ["bfloat16", "float32"], dict(T="bfloat16", M=2, K=4096, N=4096, BITS=8, GS=32, KC=128, WORDS=2, TPC=1, NT=4096)),
    # fused rope of the q and k heads (the split launch), with and without the input norm
    ("spin_f_xnorm_rope", ["float16", "float16", "float16", "int32", "float32", "float32", "float16", "int32",
                           "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=4096, N=6144, KC=256, TPC=0, NT=4096, EPSB=897988541, ROPE_D=128, ROPE_N=5120,
          ROPE_TRAD=0, ROPE_SB=1065353216)),
    ("spin_q_xnorm_rope", ["float16", "float16", "uint32", "float16", "int32", "float32", "float32", "float16",
                           "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=4096, N=6144, BITS=4, GS=64, KC=128, WORDS=2, TPC=0, NT=4096, EPSB=897988541,
          ROPE_D=128, ROPE_N=5120, ROPE_TRAD=0, ROPE_SB=1065353216)),
    ("spin_f_rope", ["bfloat16", "float32", "bfloat16", "int32", "float32", "float32", "int32", "float32"],
     ["bfloat16", "float32"], dict(T="bfloat16", M=2, K=1024, N=1536, KC=128, TPC=1, NT=1024, ROPE_D=64, ROPE_N=1280,
                                   ROPE_TRAD=1, ROPE_SB=1056964608)),
    ("spin_q_rope", ["bfloat16", "bfloat16", "uint32", "bfloat16", "int32", "float32", "float32", "int32", "float32"],
     ["bfloat16", "float32"], dict(T="bfloat16", M=1, K=4096, N=6144, BITS=8, GS=32, KC=128, WORDS=4, TPC=0,
                                   NT=4096, ROPE_D=128, ROPE_N=5120, ROPE_TRAD=0, ROPE_SB=1065353216)),
    ("gateup_f", ["float16", "float16", "float32"], ["float16"],
     dict(T="float16", M=1, K=4096, N=14336, WPR=4, TPC=1)),
    ("gateup_f", ["bfloat16", "bfloat16", "bfloat16"], ["bfloat16"],
     dict(T="bfloat16", M=2, K=576, N=1536, WPR=1, TPC=0)),
    ("gateup_q", ["float16", "uint32", "float16"] + ["float32"], ["float16"],
     dict(T="float16", M=1, K=4096, N=14336, BITS=4, GS=64, RPW=4, TPC=1)),
    ("gateup_q", ["float16", "uint32", "float16"] + ["float16"], ["float16"],
     dict(T="float16", M=1, K=4096, N=14336, BITS=8, GS=32, RPW=8, TPC=0)),
    ("gateup_q", ["bfloat16", "uint32", "bfloat16"] + ["bfloat16"], ["bfloat16"],
     dict(T="bfloat16", M=8, K=1536, N=580, BITS=8, GS=32, RPW=2, TPC=0)),
    # split launches (q thresholded, k and v dense): NT ends a tile short of N
    ("spin_f", ["float16", "float16", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=4096, N=6144, KC=64, TPC=0, NT=4096)),
    ("spin_q", ["float16", "float16", "uint32", "float16", "int32", "float32"], ["float16", "float32"],
     dict(T="float16", M=1, K=4096, N=6144, BITS=4, GS=64, KC=64, WORDS=2, TPC=0, NT=4096)),
    # the KV cache's in-place write and growth (Llama-3-8B heads: 32 q, 8 k and 8 v heads of 128)
    ("kv_write", ["float16"] * 5 + ["int32"], ["float16"], dict(T="float16", NQ=4096, NKV=1024, D=128)),
    ("kv_grow", ["bfloat16"] * 5 + ["int32"], ["bfloat16"] * 3, dict(T="bfloat16", NQ=4096, NKV=1024, D=128)),
]


_METAL_TYPES = {"float16": "half", "bfloat16": "bfloat16_t", "uint32": "uint32_t", "float32": "float", "int32": "int"}
# The thread-position arguments MLX's metal_kernel adds for the names a source uses (all of them here).
_METAL_BUILTINS = ("uint3 threadgroup_position_in_grid, uint thread_index_in_simdgroup, "
                   "uint simdgroup_index_in_threadgroup, uint3 thread_position_in_threadgroup, uint3 threadgroups_per_grid")


def _mlx_style_kernel(idx: int, name, in_types, out_types, tmpl, kind: str = "cuda") -> str:
    """The text MLX's cuda_kernel (or, with ``kind="metal"``, metal_kernel) compiles for one launch:
    the launched header (only the helpers the kernel uses, ``launch_source``), then the kernel
    function around the launched body (MLX's argument list: inputs const, outputs written, on Metal
    in device memory and followed by the thread positions; template values as constants). MLX
    compiles each kernel apart; here each gets a namespace of one file, and a variant's define is
    undone after it."""
    header, body = G.launch_source(kind, name)
    types, space = (_CUDA_TYPES, "") if kind == "cuda" else (_METAL_TYPES, "device ")
    args = [f"const {space}{types[t]}* {n}" for n, t in zip(G._INPUTS[name], in_types)]
    args += [f"{space}{types[t]}* {n}" for n, t in zip(G._OUTPUTS[name], out_types)]
    if kind == "metal":
        args.append(_METAL_BUILTINS)
    consts = "".join(f"  using {k} = {types[v]};\n" if k == "T" else f"  constexpr int {k} = {v};\n"
                     for k, v in tmpl.items())
    qual = "__global__ " if kind == "cuda" else ""
    return (f"namespace k{idx} {{\n{header}\n{qual}void k{idx}_{name}({', '.join(args)}) {{\n{consts}\n"
            f"{body}\n}}\n}}\n" + "".join(f"#undef {d}\n" for d in _DEFINES))


_DEFINES = sorted({d for _, defines in G.VARIANTS.values() for d in defines})


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_cuda_kernels_compile_for_hopper(tmp_path):
    """Every kernel, as launched (comment-free, with only the shared helpers it uses), compiles."""
    src = ("#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
           "#include <cooperative_groups.h>\nnamespace chess_check {\n"
           + "".join(_mlx_style_kernel(i, *inst) for i, inst in enumerate(_INSTANCES)) + "}\n")
    assert {inst[0] for inst in _INSTANCES} == set(G._INPUTS), "an instance of every launched kernel"
    ptx = nvcc_ptx(tmp_path, src)
    assert ptx.count(".entry") == len(_INSTANCES)
    assert "ld.global.v4" in ptx or "ld.global.nc.v4" in ptx, "16-byte vector loads expected"


@pytest.mark.parametrize("wtype", ["float16", "q4g64"])
def test_gpu_check_thresholds_keep_every_channel_outside_its_margin(wtype):
    """benchmarks/kernels.py's gate/up check fails on any flipped channel, so its thresholds must
    drop the asked share and sit outside the rounding margin, near-zero activations included."""
    K = bench_module("kernels")

    mx.random.seed(3)
    x = mx.random.normal((1, 256)).astype(mx.float16)
    wg = K.make_weight(1024, 256, wtype, transposed=False)
    t = K.robust_channel_thresholds(x, wg, 0.5)
    a = K.act_abs(x, wg)[0]
    a64, t64 = np.array(a, dtype=np.float64), np.array(t, dtype=np.float64)
    margin = 0.02 * t64 + 2e-3 * a64.mean()
    assert np.all(np.abs(a64 - t64) > margin)
    assert 0.4 < np.mean(a64 < t64) < 0.6
    np.testing.assert_allclose(np.array(K.decision_margin(a, t)), margin, rtol=1e-5)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_spin_probe_variants_compile_for_hopper(tmp_path):
    """benchmarks/spin_variants.py edits spin_f's source text into A/B variants: each edit must
    still apply to the shipped source (it asserts so) and give a kernel that compiles, so a GPU
    session's probe does not die on a stale edit."""
    V = bench_module("spin_variants")

    src = "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n#include <cooperative_groups.h>\n"
    names = sorted({v.split("@")[0] for v in V.VARIANTS} | {"acqrel", "relatom", "store", "wsp", "warpc", "tiled", "pair"})
    for i, v in enumerate(names):  # each variant with its (possibly edited) header in a namespace
        head, body = V.variant_source(v)
        src += (f"namespace v{i} {{\n{head}\n__global__ void k(const __half* x, const __half* t, const __half* wt, "
                f"const int* sem, const float* pbuf, __half* y, float* partial, float* dens) {{\n  using T = __half;\n"
                f"  constexpr int M = 1;\n  constexpr int K = 4096;\n  constexpr int N = 14336;\n"
                f"  constexpr int KC = 256;\n  constexpr int TPC = 0;\n  constexpr int NT = N;\n{body}\n}}\n}}\n")
    V.STAMPS = True  # --stamps: the base variant with its clock stamps output
    try:
        head, body = V.variant_source("base")
    finally:
        V.STAMPS = False
    src += (f"namespace vs {{\n{head}\n__global__ void k(const __half* x, const __half* t, const __half* wt, "
            f"const int* sem, __half* y, float* partial, float* dens, unsigned long long* stamps) {{\n"
            f"  using T = __half;\n  constexpr int M = 1;\n  constexpr int K = 4096;\n  constexpr int N = 14336;\n"
            f"  constexpr int KC = 256;\n  constexpr int TPC = 0;\n  constexpr int NT = N;\n{body}\n}}\n}}\n")
    assert nvcc_ptx(tmp_path, src).count(".entry") == len(names) + 1


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_spout_probe_variants_compile_for_hopper(tmp_path):
    """benchmarks/spout_compact.py's three sparse-output layouts (compaction, narrow blocks, full
    unroll) compile against the shipped header, at the template values its sweep uses."""
    S = bench_module("spout_compact")

    header, _ = G.read_source("cuda", "spout_f")
    src = "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" + header
    cases = [(S._BODY, dict(RB=32, WPR=4, U=2)), (S._BODY, dict(RB=256, WPR=1, U=1)),
             (S._NARROW, dict(NW=4, WPR=4)), (S._NARROW, dict(NW=1, WPR=1)), (S._UNROLL, dict(WPR=8))]
    for i, (body, tmpl) in enumerate(cases):
        consts = "".join(f"  constexpr int {k} = {v};\n" for k, v in dict(M=2, K=14336, N=4096, **tmpl).items())
        src += (f"__global__ void k{i}(const __half* x, const __half* w, const __half* a, __half* y) {{\n"
                f"  using T = __half;\n{consts}{body}\n}}\n")
    assert nvcc_ptx(tmp_path, src).count(".entry") == len(cases)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_gpu_timer_stamp_kernel_compiles_for_hopper(tmp_path):
    """benchmarks/gpu_timer.py's stamp kernel (the GPU clock of kernels.py's timings) compiles."""
    gpu_timer = bench_module("gpu_timer")

    src = ("#include <cuda_fp16.h>\n__global__ void k(const __half* x, const float* after0, __half* y, "
           f"unsigned long long* stamp) {{\n  constexpr int SIZE = 14336;\n{gpu_timer._SOURCE}\n}}\n")
    assert "globaltimer" in nvcc_ptx(tmp_path, src)


def test_padded_scalar_threshold_acts_as_one_scalar():
    """A scalar threshold reaches the kernels as SCALAR_SLOTS equal values (>= 16 bytes, out of
    MLX's read-mostly small-buffer pool); the kernels read t[0] (TPC = 0) and the reference path
    must threshold exactly as with the plain scalar (float64 numpy reference)."""
    rng = np.random.default_rng(3)
    for k in (4096, G.SCALAR_SLOTS):
        x = rng.standard_normal((2, k)).astype(np.float32)
        tp = G.scalar_threshold(0.5, mx.float32)
        assert tp.nbytes >= 16 and tp.size == G.SCALAR_SLOTS
        want = np.where(np.abs(x.astype(np.float64)) >= 0.5, x, 0.0)
        np.testing.assert_array_equal(np.array(G.threshold(mx.array(x), tp)), want)
        np.testing.assert_array_equal(np.array(G.threshold(mx.array(x), mx.array([0.5]))), want)
        # per channel only where the sizes say so; a padded scalar read per channel is the same
        assert G._tpc(tp, k) == (1 if k == G.SCALAR_SLOTS else 0)
    assert G._tpc(mx.array([0.5]), 4096) == 0
    assert G.zero_threshold(mx.float16).nbytes >= 16
    with pytest.raises(ValueError, match="threshold has 5 entries"):
        G._tpc(mx.zeros((5,)), 4096)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not installed")
def test_column_tile_probe_compiles_for_hopper(tmp_path):
    """benchmarks/spin_coltile.py (session 11's sparse-input kernel without split-K) builds on the
    shipped header: it must still compile, row-major and tile-major, per-channel threshold."""
    S = bench_module("spin_coltile")

    head, _ = G.read_source("cuda", "spin_f")
    src = "#include <cstdint>\n#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n" + head
    for i, (k, n, nw, tiled) in enumerate([(14336, 4096, 16, 1), (4096, 14336, 8, 0)]):
        src += (f"__global__ void k{i}(const __half* x, const __half* t, const __half* wt, __half* y, float* dens) {{\n"
                f"  using T = __half;\n  constexpr int M = 1;\n  constexpr int K = {k};\n  constexpr int N = {n};\n"
                f"  constexpr int NW = {nw};\n  constexpr int U = 8;\n  constexpr int TPC = 1;\n"
                f"  constexpr int TILED = {tiled};\n{S.SOURCE}\n}}\n")
    assert nvcc_ptx(tmp_path, src).count(".entry") == 2


@pytest.mark.parametrize("bits", [None, 4])
def test_transposed_weight_follows_new_weights(bits):
    """The sparse-input kernels' W^T is cached per projection, and rebuilt when the projection
    holds a new weight array (weights loaded into a sparsified model)."""
    import mlx.nn as nn

    from chess_mlx.linear_ops import transposed_weight

    def dense_of(wt):
        if bits is None:
            return np.array(wt)
        return np.array(mx.dequantize(wt.w, wt.scales, wt.biases, group_size=wt.group_size, bits=wt.bits))

    lin = nn.Linear(64, 32, bias=False)
    if bits:
        lin = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=bits)
    first = dense_of(transposed_weight(lin))
    assert transposed_weight(lin) is transposed_weight(lin)  # cached
    other = nn.Linear(64, 32, bias=False)
    if bits:
        other = nn.QuantizedLinear.from_linear(other, group_size=32, bits=bits)
    lin.update(other.parameters())
    second = dense_of(transposed_weight(lin))
    ref = np.array(other.weight if bits is None else mx.dequantize(other.weight, other.scales, other.biases,
                                                                     group_size=32, bits=bits)).T
    assert not np.allclose(first, second)
    np.testing.assert_allclose(second, ref, atol=0.2 if bits else 0)


@pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")
def test_metal_kernels_parse_and_type_check(tmp_path):
    """Every Metal kernel, as launched, at the same template values as the CUDA compile check,
    passes g++ -fsyntax-only against tests/metal_emu.h (the CPU emulation of Metal that
    test_kernels_emulated.py runs on small shapes; here every instance is parsed and type-checked
    at full size): no Apple toolchain reaches this project, so this is what catches an undeclared
    name, a wrong argument count or a write through a const input in a Metal twin. Address spaces
    and Metal's own rules are not checked."""
    src = '#include "metal_emu.h"\n' + "".join(_mlx_style_kernel(i, *inst, kind="metal") for i, inst in enumerate(_INSTANCES))
    (tmp_path / "k.cpp").write_text(src)
    r = subprocess.run(["g++", "-std=c++20", "-fsyntax-only", "-Wno-literal-suffix", f"-I{Path(__file__).parent}",
                        str(tmp_path / "k.cpp")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert src.count("void k") == len(_INSTANCES) and "simd_sum" in src and "threadgroup_barrier" in src
