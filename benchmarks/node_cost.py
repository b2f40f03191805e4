"""Host cost per graph node: a custom-kernel node against the built-in GEMV it replaces.

    python benchmarks/node_cost.py [--nodes 128] [--reps 7] [--layers 32]

Decode on the lent H100 is bound by host work, and a sparse-input node measured ~30 us more build
and encode time than the dense GEMV it replaces (RESULTS.md, session 7). Each variant builds a
chain of ``--nodes`` one-token products of a 4096x4096 float16 matrix (each node's input is the
previous node's output, as in a model) and reports, per node and as the median over ``--reps``:
build = Python creating the graph, encode = ``mx.async_eval`` returning, wait = the rest.

Variants: MLX's GEMV; the sparse-input kernel op by op (``sparse_gemv.sparse_input``) and through
its bound compiled path (``decode_paths.bind_spin``); a bare copy kernel (``mx.fast.cuda_kernel``,
one input, one output), plain and inside ``mx.compile``, with spin's 5 inputs and 3 outputs, and
with one of those additions at a time (inputs, outputs, a large output, template arguments).
A second table chains ``--layers`` Llama-3-8B FFN layers: MLX's dense FFN against the bound CHESS
path. The kernel variants need the CUDA backend.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_paths as D  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402

N = 4096


def _copy_kernel(name: str, extra: list | tuple = (), outputs: tuple = (), n_template: int = 0, header: str = ""):
    """A copy kernel (y = x, 4096 elements) with ``extra`` inputs (never read), extra float32
    outputs of the given shapes (never written), ``n_template`` integer template arguments and
    a ``header`` text: what spin's launch adds to a bare kernel, all together or one cost at a time."""
    ins = ["x", *(f"a{i}" for i in range(len(extra)))]
    outs = ["y", *(f"o{i}" for i in range(len(outputs)))]
    k = mx.fast.cuda_kernel(name=f"node_cost_{name}", input_names=ins, output_names=outs,
                            source="int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 4096) y[i] = x[i];",
                            header=header)
    tmpl = [(f"P{i}", i + 1) for i in range(n_template)]
    kw = {"template": tmpl} if tmpl else {}
    return lambda x: k(inputs=[x, *extra], grid=(N, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[x.shape, *outputs], output_dtypes=[x.dtype] + [mx.float32] * len(outputs),
                       **kw)[0]


def variants() -> dict:
    w = (mx.random.normal((N, N)) * N ** -0.5).astype(mx.float16)
    wt = mx.contiguous(w.T)
    mx.eval(w, wt)
    out = {"gemv (built-in)": lambda x: x @ w.T}
    if G.backend() != "cuda":
        print("no CUDA backend: only the built-in GEMV is timed", flush=True)
        return out
    t = G.zero_threshold(mx.float16)
    ws_a, ws_b = G.workspace(N), G.workspace(N, mx.zeros((1, N), dtype=mx.float16))  # b: from the input, as the layers make theirs
    bound = D.bind_spin(t, wt, ws_b)
    copy = _copy_kernel("copy")
    small = [mx.zeros((4,), dtype=mx.int32) for _ in range(4)]
    mx.eval(small)
    out["spin, op by op"] = lambda x: G.sparse_input(x, wt, t, ws_a)[0]
    out["spin, bound compiled path"] = lambda x: bound(x)[0]
    out["bare copy kernel"] = copy
    out["bare copy kernel, compiled"] = mx.compile(copy)
    # spin's argument list: its 4 other inputs, and a 28 x 4096 float32 scratch like its split-K
    # partials plus a density output
    out["copy kernel, spin's arguments"] = _copy_kernel("copy5x3", [t, wt, ws_a.sem, ws_a.last], ((28, 1, N), (1,)))
    out["copy, 5 inputs"] = _copy_kernel("in5", small)
    out["copy, +2 small outputs"] = _copy_kernel("out3", outputs=((1,), (1,)))
    out["copy, +28x4096 f32 output"] = _copy_kernel("big", outputs=((28, 1, N),))
    out["copy, 6 template ints"] = _copy_kernel("tmpl6", n_template=6)
    out["copy, 6 template ints, compiled"] = mx.compile(_copy_kernel("tmpl6c", n_template=6))
    # MLX hashes a kernel's whole text at every launch (chess_mlx/kernel_text.py): the shared
    # header as written (comments and all) against no header; spin's bound path with the text
    # as written against the text it is launched with
    out["copy, 24 KB header as written"] = _copy_kernel("hdr", header=G.read_source("cuda", "spin_f")[0])
    out["copy, 24 KB header, compiled"] = mx.compile(_copy_kernel("hdrc", header=G.read_source("cuda", "spin_f")[0]))
    x0 = mx.random.normal((1, N)).astype(mx.float16)
    for label, text in (("as written", G.kernel_source), ("as launched", G.launch_source)):
        out[f"spin, bound, text {label}"] = _traced_with(text, lambda: D.bind_spin(t, wt, G.workspace(N, x0)), x0)
    return out


def launch_with(text) -> None:
    """Kernels take their text from ``text`` (``G.kernel_source`` or ``G.launch_source``) from the
    next trace on. A trace keeps the kernels it was made with, and decode_paths shares compiled
    functions (and their traces) between bound paths of one shape, so those are dropped too."""
    G.launch_source = text
    G._kernel.cache_clear()
    D._COMPILED.clear()


def _traced_with(text, make, x0):
    """``make()``'s bound path traced with the kernel text ``text``, the shipped text restored after."""
    launch = G.launch_source
    launch_with(text)
    try:
        bound = make()
        mx.eval(bound(x0)[0])
    finally:
        launch_with(launch)
    return lambda x: bound(x)[0]


def mlp_variants() -> dict:
    """One FFN layer of Llama-3-8B shape per node, with the residual add a model has: MLX's dense
    FFN (gate, up, SiLU*mul, down) against the bound CHESS path (gate_up + sparse-input down) at
    about 50% of channels kept. Host time per layer is what decode speed depends on."""
    k, f = N, 14336
    wg, wu, wd = ((mx.random.normal(s) * s[1] ** -0.5).astype(mx.float16) for s in ((f, k), (f, k), (k, f)))
    wtd = mx.contiguous(wd.T)
    x0 = mx.random.normal((1, 1, k)).astype(mx.float16)
    t = mx.abs(G.silu(x0 @ wg.T)).reshape(-1)
    t = mx.full((f,), mx.sort(t)[f // 2].item(), dtype=mx.float16)  # CHESS: per channel (here all alike)
    mx.eval(wg, wu, wd, wtd, t)
    out = {"FFN dense (MLX)": lambda x: x + (G.silu(x @ wg.T) * (x @ wu.T)) @ wd.T}
    if G.backend() == "cuda":
        bound = D.bind_act_mlp(G.stack_gate_up(wg, wu), t, wtd, G.workspace(k, x0), mx.float16)
        out["FFN CHESS (bound path)"] = lambda x: x + bound(x)[0]
    return out


def chain(f, nodes: int, shape=(1, N)) -> tuple[float, float, float]:
    x = mx.random.normal(shape).astype(mx.float16)
    mx.eval(x)
    t0 = time.perf_counter()
    for _ in range(nodes):
        x = f(x)
    t1 = time.perf_counter()
    mx.async_eval(x)
    t2 = time.perf_counter()
    mx.eval(x)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=128)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--layers", type=int, default=32, help="FFN layers per chain in the FFN section")
    args = ap.parse_args()
    _table(variants(), args.nodes, args.reps, (1, N), "node")
    _table(mlp_variants(), args.layers, args.reps, (1, 1, N), "layer")
    return 0


def _table(vs: dict, nodes: int, reps: int, shape: tuple, unit: str) -> None:
    for f in vs.values():  # compile kernels, trace compiled paths
        chain(f, 4, shape)
    res = {name: [] for name in vs}
    for _ in range(reps):  # interleaved, so a slow spell of the host hits every variant
        for name, f in vs.items():
            res[name].append(chain(f, nodes, shape))
    print(f"{'variant':<34} {'build us/' + unit:>15} {'encode us/' + unit:>16} {'wait us/' + unit:>14}")
    for name, runs in res.items():
        b, e, w = (1e6 * statistics.median(r[i] for r in runs) / nodes for i in range(3))
        print(f"{name:<34} {b:15.1f} {e:16.1f} {w:14.1f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
