"""The CUDA and Metal kernels, run on the CPU through emulations of CUDA and Metal
(tests/cuda_emu.h, tests/metal_emu.h, on tests/emu_core.h), against the reference path.

No Apple GPU reaches this project, and the H100 is lent for 30 minutes a session, so until now
the Metal twins were only compared with their CUDA twins as text, and a CUDA change was first
run on the GPU. Here each launch is built by the library itself for the backend (the launchers
with ``kind="metal"`` / ``"cuda"``: that backend's geometry, template values and launched text),
recorded instead of run, and executed by a C++ program that compiles the launched text against
the emulation (blocks / threadgroups as real threads with barriers, warp and simdgroup
collectives, atomics). Every output must be written (outputs start as NaN), match the reference
path within the GPU check's tolerance, the density must be exact, and a sparse-input launch must
leave its workspace counters and its split-K totals at zero and give the same bits with its
blocks run in the reverse order. The emulation says nothing about speed, and nothing about
races between blocks that a GPU runs side by side: the H100 check stays the authority for CUDA.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import sparse_gemv as G
from test_kernels_cpu import _METAL_BUILTINS  # MLX's thread-position arguments

pytestmark = pytest.mark.skipif(shutil.which("g++") is None, reason="g++ not installed")

_TYPES = {
    "metal": {mx.float16: "half", mx.bfloat16: "bfloat16_t", mx.float32: "float", mx.uint32: "uint32_t",
              mx.int32: "int"},
    "cuda": {mx.float16: "__half", mx.bfloat16: "__nv_bfloat16", mx.float32: "float", mx.uint32: "uint32_t",
             mx.int32: "int32_t"},
}
_DEFINES = sorted({d for _, defines in G.VARIANTS.values() for d in defines})
# Shared / threadgroup storage (not a pointer): one copy per block, i.e. a static here (one block
# runs at a time in the emulation)
_STORAGE = {
    "metal": re.compile(r"^(\s*)threadgroup\s+([\w:<>]+)\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;", re.M),
    "cuda": re.compile(r"^(\s*)__shared__\s+((?:__align__\(\d+\)\s+)?[\w:<>]+)\s+(\w+)((?:\s*\[[^\]]*\])*)\s*;", re.M),
}


class Launch:
    """One recorded kernel launch: what MLX's metal_kernel / cuda_kernel would have been given."""

    def __init__(self, name: str, kw: dict):
        self.name = name
        self.inputs = [mx.contiguous(a) for a in kw["inputs"]]
        mx.eval(self.inputs)
        self.template = kw["template"]
        self.grid, self.tg = kw["grid"], kw["threadgroup"]
        self.out_shapes, self.out_dtypes = kw["output_shapes"], kw["output_dtypes"]


def _recording(monkeypatch, kind: str) -> list:
    launches: list[Launch] = []
    real = G._kernel

    def fake(k: str, name: str):
        if k != kind:
            return real(k, name)

        def call(**kw):
            launches.append(Launch(name, kw))
            return [mx.zeros(s, dtype=d) for s, d in zip(kw["output_shapes"], kw["output_dtypes"])]
        return call
    monkeypatch.setattr(G, "_kernel", fake)
    return launches


def _cpp_kernel(kind: str, i: int, launch: Launch) -> str:
    """Launch ``i``'s text as MLX would compile it (the launched header, then the kernel around the
    launched body: inputs const, outputs written, template values as constants) plus ``run``, its
    entry point in the emulation."""
    header, body = (_STORAGE[kind].sub(r"\1static \2 \3\4;", part) for part in G.launch_source(kind, launch.name))
    names = G._INPUTS[launch.name] + G._OUTPUTS[launch.name]
    types = [_TYPES[kind][a.dtype] for a in launch.inputs] + [_TYPES[kind][d] for d in launch.out_dtypes]
    n_in = len(launch.inputs)
    args = [f"{'const ' if j < n_in else ''}{t}* {n}" for j, (n, t) in enumerate(zip(names, types))]
    consts = "".join(f"  using {k} = {_TYPES[kind][v]};\n" if k == "T" else f"  constexpr int {k} = {int(v)};\n"
                     for k, v in launch.template)
    casts = ", ".join(f"({'const ' if j < n_in else ''}{t}*)b[{j}]" for j, t in enumerate(types))
    if kind == "metal":
        params, entry = ", ".join(args + [_METAL_BUILTINS]), (
            "metal_launch(uint3(g[0], g[1], g[2]), uint3(t[0], t[1], t[2]), [&](uint3 gp, uint l, uint w, uint3 tp, "
            f"uint3 gs) {{ kern({casts}, gp, l, w, tp, gs); }});")
    else:
        params, entry = ", ".join(args), (
            f"cuda_launch({{g[0], g[1], g[2]}}, {{t[0], t[1], t[2]}}, [&] {{ kern({casts}); }});")
    return (f"namespace k{i} {{\n{header}\nvoid kern({params}) {{\n{consts}{body}\n}}\n"
            f"void run(void** b, const unsigned* g, const unsigned* t) {{\n  {entry}\n}}\n}}\n"
            + "".join(f"#undef {d}\n" for d in _DEFINES))


_MAIN = r"""
#include <cstdio>
#include <cstdlib>
#include <string>
typedef void (*Run)(void**, const unsigned*, const unsigned*);
static Run RUNS[] = {RUN_TABLE};
int main(int argc, char** argv) {
  const int id = std::atoi(argv[1]);
  const std::string dir = argv[2];
  FILE* man = std::fopen((dir + "/manifest.txt").c_str(), "r");
  unsigned g[3], t[3];
  int n_in, n_out;
  if (std::fscanf(man, "%u %u %u %u %u %u %d %d", &g[0], &g[1], &g[2], &t[0], &t[1], &t[2], &n_in, &n_out) != 8) return 2;
  std::vector<void*> bufs;
  std::vector<size_t> sizes;
  for (int j = 0; j < n_in + n_out; ++j) {
    size_t bytes;
    if (std::fscanf(man, "%zu", &bytes) != 1) return 2;
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64 + 64);
    if (j < n_in) {
      FILE* f = std::fopen((dir + "/b" + std::to_string(j) + ".bin").c_str(), "rb");
      if (bytes && std::fread(p, 1, bytes, f) != bytes) return 3;
      std::fclose(f);
    } else {
      std::memset(p, 0xff, bytes);  // NaN in every float type: unwritten outputs show
    }
    bufs.push_back(p);
    sizes.push_back(bytes);
  }
  std::fclose(man);
  RUNS[id](bufs.data(), g, t);
  for (int j = 0; j < n_in + n_out; ++j) {
    FILE* f = std::fopen((dir + "/r" + std::to_string(j) + ".bin").c_str(), "wb");
    std::fwrite(bufs[j], 1, sizes[j], f);
    std::fclose(f);
  }
  return 0;
}
"""


def _build(kind: str, tmp: Path, launches: list) -> Path:
    src = f'#include "{kind}_emu.h"\n' + "".join(_cpp_kernel(kind, i, l) for i, l in enumerate(launches))
    src += _MAIN.replace("RUN_TABLE", ", ".join(f"k{i}::run" for i in range(len(launches))))
    (tmp / f"{kind}.cpp").write_text(src)
    exe = tmp / f"{kind}_emu"
    r = subprocess.run(["g++", "-std=c++20", "-O1", "-pthread", "-fno-strict-aliasing", "-Wno-literal-suffix",
                        f"-I{Path(__file__).parent}", "-o", str(exe), str(tmp / f"{kind}.cpp")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return exe


def _np(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        return np.array(a.view(mx.uint16))
    return np.array(a)


def _from_bytes(data: bytes, dtype, shape) -> mx.array:
    if dtype == mx.bfloat16:
        return mx.array(np.frombuffer(data, np.uint16).reshape(shape)).view(mx.bfloat16)
    np_t = {mx.float16: np.float16, mx.float32: np.float32, mx.int32: np.int32, mx.uint32: np.uint32}[dtype]
    return mx.array(np.frombuffer(data, np_t).reshape(shape))


def _run(exe: Path, i: int, launch: Launch, tmp: Path, reverse: bool = False) -> tuple[list, list]:
    """(outputs, inputs after the run) of launch ``i`` in the emulator; ``reverse``: its blocks in
    the reverse order."""
    d = tmp / f"l{i}{'r' if reverse else ''}"
    d.mkdir()
    sizes = []
    for j, a in enumerate(launch.inputs):
        raw = _np(a).tobytes()
        (d / f"b{j}.bin").write_bytes(raw)
        sizes.append(len(raw))
    out_sizes = [int(np.prod(s, dtype=np.int64)) * dt.size for s, dt in zip(launch.out_shapes, launch.out_dtypes)]
    grid, tg = launch.grid, launch.tg
    (d / "manifest.txt").write_text(" ".join(map(str, [*grid, *tg, len(sizes), len(out_sizes), *sizes, *out_sizes])))
    env = {**os.environ, "CHESS_EMU_REVERSE": "1"} if reverse else None
    r = subprocess.run([str(exe), str(i), str(d)], capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, (launch.name, r.returncode, r.stderr[-2000:])
    n_in = len(sizes)
    outs = [_from_bytes((d / f"r{n_in + j}.bin").read_bytes(), dt, s)
            for j, (s, dt) in enumerate(zip(launch.out_shapes, launch.out_dtypes))]
    after = [_from_bytes((d / f"r{j}.bin").read_bytes(), a.dtype, a.shape) for j, a in enumerate(launch.inputs)]
    return outs, after


def _rel_err(y: mx.array, ref: mx.array) -> float:
    y64, r64 = np.array(y.astype(mx.float32), np.float64), np.array(ref.astype(mx.float32), np.float64)
    assert not np.isnan(y64).any(), "an output element was never written"
    return float(np.abs(y64 - r64).max() / max(np.abs(r64).max(), 1e-30))


def _sparse(shape, s: float, dtype, seed: int) -> mx.array:
    rng = np.random.default_rng(seed)
    v = rng.standard_normal(shape).astype(np.float32)
    v[rng.random(shape) < s] = 0.0
    return mx.array(v).astype(dtype)


def _weight(out_dim: int, in_dim: int, wtype: str, transposed: bool, seed: int):
    rng = np.random.default_rng(seed)
    shape = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    w = mx.array(rng.standard_normal(shape).astype(np.float32) / np.sqrt(in_dim))
    if wtype.startswith("q"):
        bits, gs = (int(v) for v in wtype[1:].split("g"))
        return G.QWeight.quantize(w.astype(mx.float16), bits, gs).packed()
    return w.astype(getattr(mx, wtype))


def _f32(w):
    """A weight as float32 for the reference (a QWeight dequantized: the kernels read the same values)."""
    return (w.dequantize() if isinstance(w, G.QWeight) else w).astype(mx.float32)


# (label, wtype, M, K, N, sparsity): small shapes that still give several tiles and split-K chunks
CASES = [("f16", "float16", 1, 512, 768, 0.5), ("f16-m2", "float16", 2, 384, 512, 0.7),
         ("bf16", "bfloat16", 1, 512, 512, 0.5), ("q4g64", "q4g64", 1, 512, 1024, 0.5),
         ("q8g32-m2", "q8g32", 2, 256, 512, 0.3)]


def _cases(kind: str, launches: list) -> list:
    """Launch every kernel of backend ``kind`` on each case through the library's own launchers
    (recorded, not run); return (label, reference outputs, check) in launch order."""
    checks = []
    for label, wtype, m, k, n, s in CASES:
        dtype = mx.float16 if wtype.startswith("q") else getattr(mx, wtype)
        x = _sparse((m, k), 0.0, dtype, 1)
        xs = _sparse((m, k), s, dtype, 2)
        # sparse-input: plain, a per-channel threshold, the residual, both norms, the rope
        wt = _weight(n, k, wtype, True, 3)
        ref_in = G.reference_sparse_input(xs.astype(mx.float32), _f32(wt))
        ws = G.workspace(n)
        G._launch_spin(kind, xs, wt, G.zero_threshold(dtype), ws)
        checks.append((f"spin {label}", [ref_in[0]], "spin"))
        t = mx.abs(_sparse((k,), 0.0, dtype, 4)) * 0.7
        G._launch_spin(kind, x, wt, t.astype(dtype), ws)
        checks.append((f"spin {label} per-channel t", [G.reference_sparse_input(x.astype(mx.float32), _f32(wt),
                                                                                t.astype(mx.float32))[0]], "spin"))
        r = _sparse((m, n), 0.0, dtype, 5)
        G._launch_spin(kind, xs, wt, G.zero_threshold(dtype), ws, residual=r)
        checks.append((f"spin {label} residual", [(ref_in[0] + r.astype(mx.float32))], "spin"))
        gx, gy = mx.abs(_sparse((k,), 0.0, dtype, 6)) + 0.5, mx.abs(_sparse((n,), 0.0, dtype, 7)) + 0.5
        G._launch_spin(kind, x, wt, G.zero_threshold(dtype), ws, xnorm=(gx, 1e-5))
        xn = mx.fast.rms_norm(x.astype(mx.float32), gx.astype(mx.float32), 1e-5)
        checks.append((f"spin {label} xnorm", [G.reference_sparse_input(xn, _f32(wt))[0]], "spin"))
        G._launch_spin(kind, xs, wt, G.zero_threshold(dtype), ws, residual=r, ynorm=(gy, 1e-5))
        yr = ref_in[0] + r.astype(mx.float32)
        checks.append((f"spin {label} residual+ynorm",  # outputs y, dens, yn
                       [yr, None, mx.fast.rms_norm(yr, gy.astype(mx.float32), 1e-5)], "spin"))
        dims = 64
        rope = G.Rope(G.rope_inverse_frequencies(dims, 10000.0), dims, 256).at(G.rope_position(37))
        assert G.rope_fits(rope, n, G.spin_tile(G.spin_words(m, wt.bits, kind) if isinstance(wt, G.QWeight) else 0,
                                                 wt.bits if isinstance(wt, G.QWeight) else None))
        G._launch_spin(kind, xs, wt, G.zero_threshold(dtype), ws, rope=rope)
        checks.append((f"spin {label} rope", [G.reference_rope(ref_in[0], rope)], "spin"))
        bits = wt.bits if isinstance(wt, G.QWeight) else None
        tile = G.spin_tile(G.spin_words(m, bits, kind) if bits else 0, bits)
        if n > tile:  # the split launch: the first tile thresholded (q), the rest dense (k, v)
            t_half = G.scalar_threshold(0.5, dtype)
            G._launch_spin(kind, x, wt, t_half, ws, nt=tile)
            checks.append((f"spin {label} split nt={tile}", [G.reference_sparse_input(
                x.astype(mx.float32), _f32(wt), mx.array(0.5, dtype=dtype).astype(mx.float32), nt=tile)[0]], "split"))
        # sparse-output (up under CATS/CHESS) and the fused gate/up front
        w = _weight(n, k, wtype, False, 8)
        a = _sparse((m, n), s, dtype, 9)
        G._launch_spout(kind, x, w, a)
        checks.append((f"spout {label}", [G.reference_gated_sparse_output(x.astype(mx.float32), _f32(w),
                                                                          a.astype(mx.float32))], "plain"))
        wg, wu = _weight(n, k, wtype, False, 10), _weight(n, k, wtype, False, 11)
        # channel thresholds far from every token's |SiLU(gate)|: half the channels kept (t at half
        # the smallest), half dropped (t at twice the largest), so no rounding can flip a decision
        act = mx.abs(G.silu(x.astype(mx.float32) @ _f32(wg).T))
        keep = mx.array(np.random.default_rng(12).random(n) < 0.5)
        tg = mx.where(keep, 0.5 * act.min(axis=0), 2.0 * act.max(axis=0) + 1e-3)
        G._launch_gateup(kind, x, G.stack_gate_up(wg, wu), tg.astype(dtype))
        checks.append((f"gateup {label}", [G.reference_gate_up(x.astype(mx.float32), _f32(wg), _f32(wu),
                                                               tg.astype(mx.float32))], "gate"))
    # split-K chunks longer than any default (probe variant kcN, benchmarks/variant_check.py): 4
    # rows per thread in the compaction, and a last chunk of 256 of its 1024 rows
    for dtype in (mx.float16, mx.bfloat16):
        xs, wt = _sparse((1, 2304), 0.5, dtype, 13), _weight(256, 2304, "float16", True, 14).astype(dtype)
        G._launch_spin(kind, xs, wt, G.zero_threshold(dtype), G.workspace(256), kc=1024)
        checks.append((f"spin {dtype} kc=1024", [G.reference_sparse_input(xs.astype(mx.float32), _f32(wt))[0]], "spin"))
    # one token, the narrow tile with longer chunks (spin_q_words: 4096 -> 4096 on a GPU): 4-bit 1 word
    # per lane (256-output tiles), 8-bit 2 words, 128-row chunks
    for wtype, words in (("q4g64", 1), ("q8g32", 2)):
        xs, wt = _sparse((1, 512), 0.5, mx.float16, 15), _weight(512, 512, wtype, True, 16)
        G._launch_spin(kind, xs, wt, G.zero_threshold(mx.float16), G.workspace(512), kc=128, words=words)
        checks.append((f"spin {wtype} words={words} kc=128", [G.reference_sparse_input(xs.astype(mx.float32),
                                                                                       _f32(wt))[0]], "spin"))
    assert len(checks) == len(launches), (len(checks), len(launches))
    return checks


@pytest.mark.parametrize("kind", ["metal", "cuda"])
def test_kernels_run_in_the_emulator_match_the_reference(monkeypatch, tmp_path, kind):
    launches = _recording(monkeypatch, kind)
    checks = _cases(kind, launches)
    assert {l.name for l in launches} >= {"spin_f", "spin_q", "spin_f_res", "spin_q_res_ynorm", "spin_f_xnorm",
                                         "spin_q_rope", "spout_f", "spout_q", "gateup_f", "gateup_q"}
    exe = _build(kind, tmp_path, launches)
    failures = []
    for i, (launch, (label, refs, kind)) in enumerate(zip(launches, checks)):
        outs, after = _run(exe, i, launch, tmp_path)
        for j, ref in enumerate(refs):
            if ref is None:
                continue
            err = _rel_err(outs[j], ref)
            if not err < 1e-2:  # the GPU check's bound for half types (seen here: <= 4.1e-3, bfloat16)
                failures.append(f"{label} output {j}: rel. error {err:.2e}")
        if kind in ("spin", "split"):
            sem = np.array(after[G._INPUTS[launch.name].index("sem")])
            if sem.any():
                failures.append(f"{label}: workspace counters not reset ({sem[:4]})")
            scratch = np.array(after[G._INPUTS[launch.name].index("partial")])
            if not np.array(launch.inputs[G._INPUTS[launch.name].index("partial")]).any() and scratch.any():
                failures.append(f"{label}: split-K totals not zeroed ({np.count_nonzero(scratch)} words left)")
            # the blocks in the reverse order (another block of each tile finishes last, the chunks
            # add up in another order): the fixed-point totals must give the same bits
            if launch.grid[1] > 1 and not np.array_equal(_np(_run(exe, i, launch, tmp_path, reverse=True)[0][0]),
                                                          _np(outs[0])):
                failures.append(f"{label}: y depends on the order the blocks run in")
        if kind == "spin":
            density = float(outs[1].item())
            x = np.array(launch.inputs[0].astype(mx.float32))
            if "per-channel" not in label and "xnorm" not in label:
                want = float(np.count_nonzero(x)) / x.size
                if abs(density - want) > 1e-6:
                    failures.append(f"{label}: density {density} != {want}")
    assert not failures, "\n".join(failures)
