"""Compiled one-token decode paths of the sparse blocks (GPU kernels only).

Decode on a GPU is bound by per-node host work (graph building and MLX's encoding of each node,
benchmarks/RESULTS.md), so a sparse block must cost no more graph nodes than the dense one it
replaces. Here the CATS/CHESS FFN is two launches (``gate_up``: gate GEMV + SiLU + channel
threshold + sparse-output up; ``sparse_input``: down with its split-K reduction and density
count), a thresholded projection is one, and TEAL's FFN is three plus one fused elementwise
node. Each path is one ``mx.compile``d function of arrays only: the first call traces it (per
shape and dtype), later calls replay the trace without rebuilding kernel sources in Python.

Every function returns ``(y, densities...)``; the densities are lazy scalars for the recorder.
The layers bind each path's constant arguments once per plan (``Bound``) and pass only ``x``.
Quantized weights come here unless ``CHESS_MLX_QUANT_KERNELS=0`` (``linear_ops``). The
reference path (CPU, prefill) does not come here, except in the CPU tests, where the same
functions wrap the reference products.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx

from . import sparse_gemv as G
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_COMPILE", "the compiled one-token paths (off: the layers build the same ops one by one)")


def _act_mlp_residual(x, r, w_gate_up, t, wt_down, ws_down, zero):
    """CATS (scalar t) / CHESS (per-channel t): ``r + down(keep(SiLU(gate x), t) * up x)`` with the
    add inside down's kernel (the block's last residual; none for r None), the gate and up rows
    stacked (``sparse_gemv.stack_gate_up``). The density is that of down's input, i.e. of the kept
    channels (up rows and down rows read)."""
    h = G.gate_up_stacked(x, w_gate_up, t)
    return G.sparse_input(h, wt_down, zero, ws_down, residual=r)


def _act_mlp(x, *args):
    """``_act_mlp_residual`` without a residual (the MLP called on its own)."""
    return _act_mlp_residual(x, None, *args)


def _teal_mlp(x, t_in, wt_gate, wt_up, t_down, wt_down, ws_gate, ws_up, ws_down):
    """TEAL: thresholded inputs of gate/up and of down, all three sparse-input products."""
    g, d_in = G.sparse_input(x, wt_gate, t_in, ws_gate)
    u, _ = G.sparse_input(x, wt_up, t_in, ws_up)
    y, d_down = G.sparse_input(G.silu(g) * u, wt_down, t_down, ws_down)
    return y, d_in, d_down


def _spin(x, t, wt, ws, nt=None):
    """A projection with a thresholded input (q/o under CHESS+attention, every one under TEAL);
    with ``nt``, that projection and dense ones on the same input as one launch (q with k and v
    under CHESS+attention): the first ``nt`` outputs take the thresholded x."""
    return G.sparse_input(x, wt, t, ws, nt=nt)


def _spin_residual(x, r, t, wt, ws, nt=None):
    """``r + _spin(x)``, the add inside the kernel (o under CHESS+attention: the attention's
    residual, one graph node fewer per layer)."""
    return G.sparse_input(x, wt, t, ws, residual=r, nt=nt)


def _spin_xnorm(x, t, wt, ws, g, eps, nt=None):
    """``_spin(rms_norm(x, g, eps))``, the norm inside the kernel (q's head launch under
    CHESS+attention takes the block's input: one launch fewer per layer)."""
    return G.sparse_input(x, wt, t, ws, nt=nt, xnorm=(g, eps))


def _spin_residual_ynorm(x, r, t, wt, ws, g, eps):
    """``_spin_residual`` and ``rms_norm`` of its sum, one launch (o under CHESS+attention: the
    residual stream and the post-attention norm's output)."""
    return G.sparse_input(x, wt, t, ws, residual=r, ynorm=(g, eps))


def _spin_rope(x, pos, t, wt, ws, inv_freq, dims, n_rot, traditional, scale, nt=None):
    """``_spin`` with MLX's rope of the first ``n_rot`` outputs at position ``pos`` (an array: it
    changes with every token, the rest is bound), inside the kernel: the split launch gives q's and
    k's heads rotated (one launch fewer per layer)."""
    return G.sparse_input(x, wt, t, ws, nt=nt, rope=G.Rope(inv_freq, dims, n_rot, bool(traditional), scale, pos))


def _spin_xnorm_rope(x, pos, t, wt, ws, g, eps, inv_freq, dims, n_rot, traditional, scale, nt=None):
    """``_spin_xnorm`` and ``_spin_rope`` in one launch."""
    return G.sparse_input(x, wt, t, ws, nt=nt, xnorm=(g, eps),
                          rope=G.Rope(inv_freq, dims, n_rot, bool(traditional), scale, pos))


# A traced graph keeps the stream it was traced on; replayed under another stream (mlx-lm decodes
# on its own generation stream) every layer would wait across streams. So: one compiled function
# per (path, stream, quantization of each weight argument), each a distinct callable, since
# mx.compile caches traces by function.
_COMPILED: dict[tuple, object] = {}


def _static(a):
    """What an argument contributes to a Bound's constant inputs (a Workspace: its counters and
    split-K scratch; its ordering token changes with every launch and travels separately)."""
    if isinstance(a, G.QWeight):
        if a.sb is None:  # the layers pass packed weights; a bound input must not stay lazy
            a = a.packed()
            mx.eval(a.sb)
        return a.w, a.sb
    if isinstance(a, G.Workspace):
        return a.sem, a.partial
    if isinstance(a, (int, float)):  # a compile-time constant, baked into the trace (``Bound``)
        return ()
    return a


def _compiled(fn, meta: tuple):
    """The compiled twin of ``fn`` for arguments of kinds ``meta`` on the current stream. mx.compile
    takes arrays (and tuples of them), so a QWeight travels as its packed arrays (``w``, ``sb``), and its bits and
    group size, which the kernels need as compile-time constants, are part of the key and baked
    into the traced function, as is any int or float argument. A Workspace travels as its counters and scratch plus its ordering token; the
    launches' new tokens come back as extra outputs (a side effect inside the trace would only
    ever see tracers)."""
    key = (fn.__name__, meta, repr(mx.default_stream(mx.default_device())))
    c = _COMPILED.get(key)
    if c is None:
        def rebuilt(xs, static, lasts):
            objs, tokens = [], iter(lasts)
            for a, m in zip(static, meta):
                objs.append(a if m is None else G.Workspace(a[0], next(tokens), a[1]) if m == "ws"
                            else m[1] if m[0] == "const" else G.QWeight.from_packed(*a, *m))
            out = fn(*xs, *objs)
            return (*out, *(o.last for o in objs if isinstance(o, G.Workspace)))
        c = _COMPILED[key] = mx.compile(rebuilt)
    return c


class Bound:
    """A compiled path with every argument but the activations bound once (a sparse module's
    one-token plan).

    Decode is bound by host time per token (benchmarks/RESULTS.md), and sorting arguments into
    compile inputs cost ~15 us of Python per call and 2-3 calls per layer; bound, a step passes
    only ``x`` (and the residual, for ``residual=True``) and the workspaces' tokens."""

    __slots__ = ("c", "static", "spaces")

    def __init__(self, fn, *args):
        meta = tuple((a.bits, a.group_size) if isinstance(a, G.QWeight) else "ws" if isinstance(a, G.Workspace)
                     else ("const", a) if isinstance(a, (int, float)) else None for a in args)
        self.c = _compiled(fn, meta)
        self.static = tuple(_static(a) for a in args)
        self.spaces = tuple(a for a in args if isinstance(a, G.Workspace))

    def __call__(self, *xs: mx.array) -> tuple:
        out = self.c(xs, self.static, tuple(w.last for w in self.spaces))
        n = len(self.spaces)
        if not n:
            return out
        for w, token in zip(self.spaces, out[len(out) - n:]):
            w.last = token
        return tuple(out[:len(out) - n])


def _one_token_scratch(ws: G.Workspace, wt) -> G.Workspace:
    """``ws`` with a split-K scratch large enough for one-token launches on ``wt``. A bound input
    is fixed once traced, so a scratch the launch had to grow would be a fill node replayed at
    every token (the layers' workspaces come sized; this covers any other)."""
    ws.hold(G.spin_partials(1, wt.cols if isinstance(wt, G.QWeight) else wt.shape[1]))
    mx.eval(ws.partial)
    return ws


def bind_act_mlp(w_gate_up, t, wt_down, ws_down, dtype, residual: bool = False) -> Bound:
    """Called as ``bound(x)``: ``(mlp(x), density)``; with ``residual``, as ``bound(x, r)``:
    ``(r + mlp(x), density)``."""
    return Bound(_act_mlp_residual if residual else _act_mlp, w_gate_up, t, wt_down,
                 _one_token_scratch(ws_down, wt_down), G.zero_threshold(dtype))


def bind_teal_mlp(t_in, wt_gate, wt_up, t_down, wt_down, ws_gate, ws_up, ws_down) -> Bound:
    return Bound(_teal_mlp, t_in, wt_gate, wt_up, t_down, wt_down, _one_token_scratch(ws_gate, wt_gate),
                 _one_token_scratch(ws_up, wt_up), _one_token_scratch(ws_down, wt_down))


def bind_spin(t, wt, ws, residual: bool = False, nt: Optional[int] = None, xnorm: Optional[G.Norm] = None,
              ynorm: Optional[G.Norm] = None, rope: Optional[G.Rope] = None) -> Bound:
    """Called as ``bound(x)``: ``(x's product, density)``; with ``residual``, as ``bound(x, r)``:
    ``(r + x's product, density)``. ``nt``: the threshold on the first ``nt`` outputs only, x's
    product as it is past them (``sparse_gemv.sparse_input``). ``xnorm`` = (weight, eps): x is that
    RMSNorm's input; ``ynorm`` (with ``residual``): a third result, that RMSNorm of the sum.
    ``rope``: called as ``bound(x, pos)`` (``sparse_gemv.rope_position``), the product's first
    ``rope.n`` outputs rotated at that position."""
    args = (t, wt, _one_token_scratch(ws, wt))
    if rope is not None:
        if residual or ynorm is not None:
            raise ValueError("a rope is fused without the residual add or an output norm only")
        spec = (rope.inv_freq, rope.dims, rope.n, rope.traditional, float(rope.scale), *(() if nt is None else (nt,)))
        if xnorm is not None:
            return Bound(_spin_xnorm_rope, *args, xnorm[0], float(xnorm[1]), *spec)
        return Bound(_spin_rope, *args, *spec)
    if xnorm is not None:
        return Bound(_spin_xnorm, *args, xnorm[0], float(xnorm[1]), *(() if nt is None else (nt,)))
    if ynorm is not None:
        if not residual or nt is not None:
            raise ValueError("an output norm is fused with the residual add only")
        return Bound(_spin_residual_ynorm, *args, ynorm[0], float(ynorm[1]))
    return Bound(_spin_residual if residual else _spin, *args, *(() if nt is None else (nt,)))


def spin(x, t, wt, ws):
    return bind_spin(t, wt, ws)(x)
