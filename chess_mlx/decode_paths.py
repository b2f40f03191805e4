"""Compiled one-token decode paths of the sparse blocks (GPU kernels only).

A CHESS decode step builds, per layer, a threshold (abs, compare, select), the sparse kernels and
the density the statistics report. Built op by op from Python that is a dozen graph nodes per
layer, and each ``mx.fast.cuda_kernel``/``metal_kernel`` call also assembles its kernel source on
the host: measured on the H100, the host then cannot keep up with the GPU (RESULTS.md). Here each
path is one ``mx.compile``d function of arrays only: the first call traces it (per shape and
dtype), later calls replay the traced graph, and the elementwise ops fuse into one kernel.

Every function returns ``(y, densities...)``; the densities are lazy scalars for the recorder.
The reference path (CPU, prefill, quantized weights without the kernels) does not come here.
"""

from __future__ import annotations

import os

import mlx.core as mx

from . import sparse_gemv as G
from .stats import kept_fraction

_ENABLED = os.environ.get("CHESS_MLX_COMPILE", "1") != "0"


def enabled() -> bool:
    return _ENABLED


def enable(on: bool = True) -> None:
    """Switch the compiled paths on or off (off: the layers build the same ops one by one)."""
    global _ENABLED
    _ENABLED = on


def _threshold(x: mx.array, t: mx.array) -> tuple[mx.array, mx.array]:
    # x * keep rather than where(keep, x, 0): no scalar constant, which a replayed trace would copy
    # into a fresh buffer on every call (Nsight: one extra kernel per layer). Same values for finite x.
    keep = mx.abs(x) >= t
    return x * keep.astype(x.dtype), keep


def _silu(x: mx.array) -> mx.array:
    return x * mx.sigmoid(x)  # inline (nn.silu is itself compiled, which stops fusion at its edge)


def _rows(x: mx.array) -> mx.array:
    return x.reshape(-1, x.shape[-1])


def _act_mlp(x: mx.array, wg: mx.array, t: mx.array, wu, wt_down) -> tuple[mx.array, mx.array]:
    """CATS (scalar t) / CHESS (per-channel t): down(thr(SiLU(gate x)) * up x)."""
    a, keep = _threshold(_silu(x @ wg.T), t)
    h = G.gated_sparse_output(_rows(x), wu, _rows(a))
    return G.sparse_input(h, wt_down).reshape(*x.shape[:-1], -1), kept_fraction(keep)


def _teal_mlp(x: mx.array, t_in: mx.array, wt_gate, wt_up, t_down: mx.array, wt_down):
    """TEAL: thresholded inputs of gate/up and of down, all three sparse-input products."""
    xs, keep_in = _threshold(_rows(x), t_in)
    h = _silu(G.sparse_input(xs, wt_gate)) * G.sparse_input(xs, wt_up)
    hs, keep_d = _threshold(h, t_down)
    return G.sparse_input(hs, wt_down).reshape(*x.shape[:-1], -1), kept_fraction(keep_in), kept_fraction(keep_d)


def _spin(x: mx.array, t: mx.array, wt) -> tuple[mx.array, mx.array]:
    """A projection with a thresholded input (q/o under CHESS+attention, every one under TEAL)."""
    xs, keep = _threshold(_rows(x), t)
    return G.sparse_input(xs, wt).reshape(*x.shape[:-1], -1), kept_fraction(keep)


# A traced graph keeps the stream it was traced on; replayed under another stream (mlx-lm decodes
# on its own generation stream) every layer would wait across streams. So: one compiled function
# per (path, stream), each a distinct callable, since mx.compile caches traces by function.
_COMPILED: dict[tuple[str, str], object] = {}


def _compiled(fn):
    key = (fn.__name__, repr(mx.default_stream(mx.default_device())))
    c = _COMPILED.get(key)
    if c is None:
        c = _COMPILED[key] = mx.compile(lambda *args: fn(*args))
    return c


def act_mlp(x, wg, t, wu, wt_down):
    return _compiled(_act_mlp)(x, wg, t, wu, wt_down)


def teal_mlp(x, t_in, wt_gate, wt_up, t_down, wt_down):
    return _compiled(_teal_mlp)(x, t_in, wt_gate, wt_up, t_down, wt_down)


def spin(x, t, wt):
    return _compiled(_spin)(x, t, wt)
