"""Host cost per graph node: a custom-kernel node against the built-in GEMV it replaces.

    python benchmarks/node_cost.py [--nodes 128] [--reps 7]

Decode on the lent H100 is bound by host work, and a sparse-input node measured ~30 us more build
and encode time than the dense GEMV it replaces (RESULTS.md, session 7). Each variant builds a
chain of ``--nodes`` one-token products of a 4096x4096 float16 matrix (each node's input is the
previous node's output, as in a model) and reports, per node and as the median over ``--reps``:
build = Python creating the graph, encode = ``mx.async_eval`` returning, wait = the rest.

Variants: MLX's GEMV; the sparse-input kernel op by op (``sparse_gemv.sparse_input``) and through
its bound compiled path (``decode_paths.bind_spin``); a bare copy kernel (``mx.fast.cuda_kernel``,
one input, one output), plain and inside ``mx.compile``, and with spin's 5 inputs and 3 outputs.
The kernel variants need the CUDA backend.
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


def _copy_kernel():
    k = mx.fast.cuda_kernel(name="node_cost_copy", input_names=["x"], output_names=["y"],
                            source="int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 4096) y[i] = x[i];")
    return lambda x: k(inputs=[x], grid=(N, 1, 1), threadgroup=(256, 1, 1), output_shapes=[x.shape],
                       output_dtypes=[x.dtype])[0]


def _copy_kernel_spin_shaped(extra: list):
    """The copy kernel with sparse-input's argument list: 4 more inputs (never read) and 2 more
    outputs, one a 28 x 4096 float32 scratch like spin's split-K partials (never written). Tells
    whether argument and output count, not the kernel, cost host time."""
    k = mx.fast.cuda_kernel(name="node_cost_copy5x3", input_names=["x", "a", "b", "c", "d"],
                            output_names=["y", "partial", "dens"],
                            source="int i = blockIdx.x * blockDim.x + threadIdx.x; if (i < 4096) y[i] = x[i];")
    return lambda x: k(inputs=[x, *extra], grid=(N, 1, 1), threadgroup=(256, 1, 1),
                       output_shapes=[x.shape, (28, 1, N), (1,)], output_dtypes=[x.dtype, mx.float32, mx.float32])[0]


def variants() -> dict:
    w = (mx.random.normal((N, N)) * N ** -0.5).astype(mx.float16)
    wt = mx.contiguous(w.T)
    mx.eval(w, wt)
    out = {"gemv (built-in)": lambda x: x @ w.T}
    if G.backend() != "cuda":
        print("no CUDA backend: only the built-in GEMV is timed", flush=True)
        return out
    t = G.zero_threshold(mx.float16)
    ws_a, ws_b = G.workspace(N), G.workspace(N)
    bound = D.bind_spin(t, wt, ws_b)
    copy = _copy_kernel()
    out["spin, op by op"] = lambda x: G.sparse_input(x, wt, t, ws_a)[0]
    out["spin, bound compiled path"] = lambda x: bound(x)[0]
    out["bare copy kernel"] = copy
    out["bare copy kernel, compiled"] = mx.compile(copy)
    out["copy kernel, spin's arguments"] = _copy_kernel_spin_shaped([t, wt, ws_a.sem, ws_a.last])
    return out


def chain(f, nodes: int) -> tuple[float, float, float]:
    x = mx.random.normal((1, N)).astype(mx.float16)
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
    args = ap.parse_args()
    vs = variants()
    for f in vs.values():  # compile kernels, trace compiled paths
        chain(f, 4)
    res = {name: [] for name in vs}
    for _ in range(args.reps):  # interleaved, so a slow spell of the host hits every variant
        for name, f in vs.items():
            res[name].append(chain(f, args.nodes))
    print(f"{'variant':<28} {'build us/node':>14} {'encode us/node':>15} {'wait us/node':>13}")
    for name, runs in res.items():
        b, e, w = (1e6 * statistics.median(r[i] for r in runs) / args.nodes for i in range(3))
        print(f"{name:<28} {b:14.1f} {e:15.1f} {w:13.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
