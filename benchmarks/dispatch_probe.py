"""Where a CHESS FFN decode step spends its time on the GPU: host graph building vs execution.

    python benchmarks/dispatch_probe.py [--layers 32] [--tokens 30]

32 Llama-3-8B-shaped FFNs (random float16 weights, thresholds at ~50% sparsity), chained so each
layer's output feeds the next, as in decode. For each variant: host time to build one token's
graph (no evaluation) and wall time per token with evaluation.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_paths as D  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=30)
    args = ap.parse_args()
    d, f = 4096, 14336
    mx.random.seed(0)
    layers = []
    for _ in range(args.layers):
        wg = (mx.random.normal((f, d)) * d ** -0.5).astype(mx.float16)
        wu = (mx.random.normal((f, d)) * d ** -0.5).astype(mx.float16)
        wd = (mx.random.normal((d, f)) * f ** -0.5).astype(mx.float16)
        wtd = mx.contiguous(wd.T)
        x = mx.random.normal((1, 1, d)).astype(mx.float16)
        a = mx.abs(nn.silu(x @ wg.T)).astype(mx.float32)
        t = mx.broadcast_to(mx.median(a) if hasattr(mx, "median") else mx.sort(a.reshape(-1))[f // 2], (f,))
        t = mx.contiguous(t.astype(mx.float32))
        mx.eval(wg, wu, wd, wtd, t)
        layers.append((wg, wu, wd, wtd, t))

    ws_of = {id(L[3]): G.workspace(L[3].shape[1]) for L in layers}

    def dense(x, L):
        wg, wu, wd, _, _ = L
        return (nn.silu(x @ wg.T) * (x @ wu.T)) @ wd.T

    def chess_ops(x, L):
        wg, wu, _, wtd, t = L
        g = nn.silu(x @ wg.T)
        keep = mx.abs(g) >= t
        a = mx.where(keep, g, mx.zeros((), dtype=g.dtype))
        h = G.gated_sparse_output(x.reshape(1, -1), wu, a.reshape(1, -1))
        return G.sparse_input(h, wtd, ws=ws_of[id(wtd)])[0].reshape(1, 1, -1)

    bound_of = {}  # one bound compiled path per layer, on the stacked gate/up rows, as the layers bind it
    for wg, wu, _, wtd, t in layers:
        w2 = G.stack_gate_up(wg, wu)
        mx.eval(w2)
        bound_of[id(wtd)] = D.bind_act_mlp(w2, t, wtd, ws_of[id(wtd)], mx.float16)

    def chess_compiled(x, L):
        return bound_of[id(L[3])](x)[0]

    thr = mx.compile(lambda g, t: mx.where(mx.abs(g) >= t, g, mx.zeros((), dtype=g.dtype)))

    def chess_thr_compiled(x, L):
        wg, wu, _, wtd, t = L
        a = thr(nn.silu(x @ wg.T), t)
        h = G.gated_sparse_output(x.reshape(1, -1), wu, a.reshape(1, -1))
        return G.sparse_input(h, wtd, ws=ws_of[id(wtd)])[0].reshape(1, 1, -1)

    variants = {"dense": dense, "chess op-by-op": chess_ops, "chess compiled": chess_compiled,
                "chess thr-compiled": chess_thr_compiled}
    gen_stream = mx.new_stream(mx.default_device())  # as mlx-lm's generate_step decodes
    x0 = mx.random.normal((1, 1, d)).astype(mx.float16)
    print(f"{'variant':<20} {'host ms/token':>14} {'wall ms/token':>14} {'tok/s':>8}")
    for name, fn in variants.items():
        def token(x):
            for L in layers:
                x = fn(x, L)
                x = x * (1.0 / (mx.abs(x).max() + 1e-3))  # keep values sane through the chain
            return x
        for _ in range(3):
            mx.eval(token(x0))  # traces compiled paths on the default stream
        if name == "chess compiled":
            with mx.stream(gen_stream):
                for _ in range(3):
                    mx.eval(token(x0))
        host, wall = [], []
        x = x0
        for _ in range(args.tokens):
            t0 = time.perf_counter()
            with mx.stream(gen_stream):
                y = token(x)
            t1 = time.perf_counter()
            mx.eval(y)
            t2 = time.perf_counter()
            host.append((t1 - t0) * 1e3)
            wall.append((t2 - t0) * 1e3)
            x = y
        h, w = statistics.median(host), statistics.median(wall)
        print(f"{name:<20} {h:14.2f} {w:14.2f} {1e3 / w:8.1f}", flush=True)


if __name__ == "__main__":
    main()
