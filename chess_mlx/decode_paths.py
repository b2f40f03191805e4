"""Compiled one-token decode paths of the sparse blocks (GPU kernels only).

Decode on a GPU is bound by per-node host work (graph building and MLX's encoding of each node,
benchmarks/RESULTS.md), so a sparse block must cost no more graph nodes than the dense one it
replaces. Here the CATS/CHESS FFN is two launches (``gate_up``: gate GEMV + SiLU + channel
threshold + sparse-output up; ``sparse_input``: down with its split-K reduction and density
count), a thresholded projection is one, and TEAL's FFN is three plus one fused elementwise
node. Each path is one ``mx.compile``d function of arrays only: the first call traces it (per
shape and dtype), later calls replay the trace without rebuilding kernel sources in Python.

Every function returns ``(y, densities...)``; the densities are lazy scalars for the recorder.
Quantized weights come here only with ``CHESS_MLX_QUANT_KERNELS=1`` (``linear_ops``). The
reference path (CPU, prefill) does not come here, except in the CPU tests, where the same
functions wrap the reference products.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import sparse_gemv as G

_ENABLED = os.environ.get("CHESS_MLX_COMPILE", "1") != "0"


def enabled() -> bool:
    return _ENABLED


def enable(on: bool = True) -> None:
    """Switch the compiled paths on or off (off: the layers build the same ops one by one)."""
    global _ENABLED
    _ENABLED = on


def _rows(x: mx.array) -> mx.array:
    return x.reshape(-1, x.shape[-1])


def _act_mlp(x, wg, wu, t, wt_down, ws_down, zero):
    """CATS (scalar t) / CHESS (per-channel t): down(keep(SiLU(gate x), t) * up x). The density is
    that of down's input, i.e. of the kept channels (up rows and down rows read)."""
    h = G.gate_up(_rows(x), wg, wu, t)
    y, dens = G.sparse_input(h, wt_down, zero, ws_down)
    return y.reshape(*x.shape[:-1], -1), dens


def _teal_mlp(x, t_in, wt_gate, wt_up, t_down, wt_down, ws_gate, ws_up, ws_down):
    """TEAL: thresholded inputs of gate/up and of down, all three sparse-input products."""
    xr = _rows(x)
    g, d_in = G.sparse_input(xr, wt_gate, t_in, ws_gate)
    u, _ = G.sparse_input(xr, wt_up, t_in, ws_up)
    y, d_down = G.sparse_input(G.silu(g) * u, wt_down, t_down, ws_down)
    return y.reshape(*x.shape[:-1], -1), d_in, d_down


def _spin(x, t, wt, ws):
    """A projection with a thresholded input (q/o under CHESS+attention, every one under TEAL)."""
    y, dens = G.sparse_input(_rows(x), wt, t, ws)
    return y.reshape(*x.shape[:-1], -1), dens


# A traced graph keeps the stream it was traced on; replayed under another stream (mlx-lm decodes
# on its own generation stream) every layer would wait across streams. So: one compiled function
# per (path, stream, quantization of each weight argument), each a distinct callable, since
# mx.compile caches traces by function.
_COMPILED: dict[tuple, object] = {}


def _flat(a):
    if isinstance(a, G.QWeight):
        return a.w, a.scales, a.biases
    if isinstance(a, G.Workspace):
        return a.sem, a.last
    return a


def _call(fn, *args):
    """``fn(*args)`` through its compiled twin. mx.compile takes arrays (and tuples of them), so a
    QWeight travels as its three arrays, and its bits and group size, which the kernels need as
    compile-time constants, become part of the cache key and are baked into the traced function.
    A Workspace travels as its counters and ordering token; the launches' new tokens come back as
    extra outputs and are stored on the caller's workspaces (a side effect inside the trace would
    only ever see tracers)."""
    meta = tuple((a.bits, a.group_size) if isinstance(a, G.QWeight) else "ws" if isinstance(a, G.Workspace) else None
                 for a in args)
    key = (fn.__name__, meta, repr(mx.default_stream(mx.default_device())))
    c = _COMPILED.get(key)
    if c is None:
        def rebuilt(*flat):
            objs = [a if m is None else G.Workspace(*a) if m == "ws" else G.QWeight(*a, *m)
                    for a, m in zip(flat, meta)]
            out = fn(*objs)
            return (*out, *(o.last for o in objs if isinstance(o, G.Workspace)))
        c = _COMPILED[key] = mx.compile(rebuilt)
    out = c(*(_flat(a) for a in args))
    spaces = [a for a in args if isinstance(a, G.Workspace)]
    if not spaces:
        return out
    for w, token in zip(spaces, out[len(out) - len(spaces):]):
        w.last = token
    return tuple(out[:len(out) - len(spaces)])


def act_mlp(x, wg, wu, t, wt_down, ws_down):
    return _call(_act_mlp, x, wg, wu, t, wt_down, ws_down, G.zero_threshold(x.dtype))


def teal_mlp(x, t_in, wt_gate, wt_up, t_down, wt_down, ws_gate, ws_up, ws_down):
    return _call(_teal_mlp, x, t_in, wt_gate, wt_up, t_down, wt_down, ws_gate, ws_up, ws_down)


def spin(x, t, wt, ws):
    return _call(_spin, x, t, wt, ws)
