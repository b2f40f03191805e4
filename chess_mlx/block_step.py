"""One-token transformer block as two compiled functions around the KV cache: less Python.

Why: once the fused attention cut MLX's encoding (``fused_attention``), the Python that builds a
token's graph, ~25 op calls and a dozen module calls per layer, became what keeps CHESS at
dense's speed on some lent hosts (benchmarks/RESULTS.md, session 15). For dense, CATS, CHESS and
CHESS+attention, a block's one-token step is here:

- ``head``, compiled: input norm, the ``[Wq; Wk; Wv]`` product (or, under CHESS+attention, one
  sparse-input launch over ``[Wq^T | Wk^T | Wv^T]`` thresholding q's input only, which applies the
  input norm and RoPE itself; or q's own sparse-input launch and the ``[Wk; Wv]`` product), heads,
  RoPE -> q, k, v;
- the KV cache update and attention, outside (the cache grows with every token, and attention
  keeps MLX's one-token kernel; traced whole steps lost both, RESULTS.md sessions 7 and 14);
- ``mid``, compiled: the o product (or o's sparse-input path, which adds the residual inside its
  kernel and applies the post-attention norm too), the residual, the post-attention norm;
- the MLP module (its own compiled path under CATS/CHESS) with the last residual, which CATS/CHESS
  add inside down's kernel (``SparseMLP.add_to``).

The graph nodes are those of the fused attention path, so MLX's encoding is unchanged. RoPE takes
the position as an array, so one trace serves every token. A trace keeps the stream it was made
on, so each block keeps one pair per stream. A thresholded projection's workspace token (the
order of its launches) enters and leaves the traces as an array. Prefill, calibration
collectors, TEAL, and thresholded projections without a compiled path (the CPU) take the fused
attention path (``fused_attention``). (Session 15 backed CHESS+attention out of these traces
after hangs of the two-thread decode; their cause, threads meeting on arrays that the building
thread read, was found and fixed in session 16: ``pipelined``, ``sparse_gemv.Workspace``.)
``CHESS_MLX_BLOCK_STEP=0`` switches this off.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from . import fused_attention as FA
from . import sparse_gemv as G
from .kv_cache import append_token
from .linear_ops import dense_linear
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_BLOCK_STEP", "the compiled one-token block")
norms_enabled, enable_norms = env_switch(
    "CHESS_MLX_NORM_FUSE", "the block's RMSNorms inside the sparse-input launches under CHESS+attention (off: "
    "their own launches)")
rope_enabled, enable_rope = env_switch(
    "CHESS_MLX_ROPE_FUSE", "RoPE of q and k inside the split q/k/v launch under CHESS+attention (off: its own launch)")

_OFFSETS: dict[tuple[int, bool], mx.array] = {}
_MISSING = object()


def _offset(n: int, fused: bool = False) -> mx.array:
    """The position ``n`` as a materialised int32 scalar for MLX's rope, or (``fused``) as a rope
    inside a launch reads it (``sparse_gemv.rope_position``); one per position, shared by all layers."""
    a = _OFFSETS.get((n, fused))
    if a is None:
        if len(_OFFSETS) > 8192:
            _OFFSETS.clear()
        a = _OFFSETS[(n, fused)] = G.rope_position(n) if fused else mx.array(n, dtype=mx.int32)
    return a


def _norm(ln: nn.Module, x: mx.array):
    """(weight, eps) of a block's RMSNorm for a sparse-input launch to apply itself, or None: the
    switch is off, or the norm is not MLX's plain RMSNorm in x's dtype (the kernels read the weight
    as x's type). Why: each norm of a decode step is a launch of its own, ~4.8 us on the H100, two
    per layer (benchmarks/RESULTS.md, session 20)."""
    if not norms_enabled() or type(ln) is not nn.RMSNorm or ln.weight.dtype != x.dtype or ln.weight.ndim != 1:
        return None
    return ln.weight, ln.eps


class _Site:
    """A thresholded projection's bound sparse-input path (``decode_paths``) called inside a
    block's trace. Its workspace's ordering token enters and leaves the trace as an array, and its
    density is recorded after the call, as ``SparseInputLinear`` does outside a trace."""

    __slots__ = ("c", "static", "ws", "ctl", "proj", "split", "normed", "roped")

    def __init__(self, mod: nn.Module, bound, split: bool = False, normed: bool = False, roped: bool = False):
        self.c, self.static, (self.ws,) = bound.c, bound.static, bound.spaces
        self.ctl, self.proj = mod.ctl, mod.proj
        self.split = split  # q's launch gives [q | k | v] (``SparseInputLinear.split_plan``)
        # the launch applies the block's norm itself: q's takes the block's input (the input norm),
        # o's gives the post-attention norm's output too
        self.normed = normed
        self.roped = roped  # the split launch rotates q's and k's heads (called with the position)

    def __call__(self, *xs: mx.array, last: mx.array) -> tuple:
        """Inside the trace: (y, density, the workspace's new ordering token); ``xs`` is x, and
        the residual for a residual path (o's), or the position for a roped one (q's)."""
        return self.c(xs, self.static, (last,))

    def done(self, density: mx.array, last: mx.array) -> None:
        self.ws.last = last
        self.ctl.recorder.record_density(self.ctl.layer, self.proj, density, 1)


class _Step:
    """A block's compiled ``head`` and ``mid`` for one stream and method. Each returns its arrays,
    then (density, ordering token) of its thresholded projection, if any (q in ``head``, o in
    ``mid``, under CHESS+attention)."""

    __slots__ = ("head", "mid", "q", "o")

    def __init__(self, block: nn.Module, plan, q: Optional[_Site], o: Optional[_Site]):
        attn, st = block.self_attn, block.self_attn._fused
        ln1, ln2, o_proj, rope = block.input_layernorm, block.post_attention_layernorm, attn.o_proj, attn.rope
        qn, kn = (attn.q_norm, attn.k_norm) if st.norms else (None, None)
        self.q, self.o = q, o

        def head(x, offset, lasts):
            if q is None:
                return FA.heads(st, dense_linear(ln1(x), plan.qkv), rope, qn, kn, offset)
            xn = x if q.normed else ln1(x)  # normed: ln1 inside the [q | k | v] launch
            # roped: the launch rotates q and k (offset is then the position as it reads it)
            y, dens, last = q(xn, offset, last=lasts[0]) if q.roped else q(xn, last=lasts[0])
            if q.split:  # roped: the launch rotated q and k itself
                return (*FA.heads(st, y, None if q.roped else rope, qn, kn, offset), dens, last)
            return (*FA.heads_kv(st, y, dense_linear(xn, plan.kv), rope, qn, kn, offset), dens, last)

        def mid(x, o_heads, lasts):
            flat = o_heads.reshape(x.shape[0], 1, -1)
            if o is None:
                h = x + dense_linear(flat, o_proj)
                return h, ln2(h)
            if o.normed:  # x + o's product and ln2 of it, one launch
                h, dens, hn, last = o(flat, x, last=lasts[0])
                return h, hn, dens, last
            h, dens, last = o(flat, x, last=lasts[0])  # x + o's product, the add inside the kernel
            return h, ln2(h), dens, last

        # The weights are captured as constants of the traces; set_method drops the traces, so
        # weights loaded later take effect then, as for every other cached plan.
        self.head, self.mid = mx.compile(head), mx.compile(mid)


class _BlockState(FA.Collectors):
    """Plain state of one block: its steps per stream, for the current method (None: fall back)."""

    def __init__(self, block: nn.Module):
        attn = block.self_attn
        super().__init__(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        self.steps: Optional[dict] = None

    def step(self, block: nn.Module, x: mx.array) -> Optional[_Step]:
        if self.steps is None:
            self.steps = {}
        key = repr(mx.default_stream(mx.default_device()))
        s = self.steps.get(key, _MISSING)
        if s is _MISSING:
            s = self.steps[key] = self._make(block, x)
        return s

    def _make(self, block: nn.Module, x: mx.array) -> Optional[_Step]:
        """The step of the current method: q, k, v as one product, or q thresholded and k, v one
        product; o dense or thresholded. Thresholded projections need their bound compiled path
        (a GPU, one token); otherwise, and for TEAL, None."""
        attn = block.self_attn
        plan = FA.plan_of(attn)
        if plan.qkv is None and plan.kv is None:
            return None
        sites = []
        for p, dense in ((attn.q_proj, plan.qkv is not None), (attn.o_proj, FA.is_dense(attn.o_proj))):
            if dense:
                sites.append(None)
                continue
            if p is attn.q_proj and hasattr(p, "split_plan"):  # [q | k | v] in one launch
                norm = _norm(block.input_layernorm, x)
                rope = FA.rope_spec(attn) if rope_enabled() else None
                bound = p.split_plan(x, [attn.k_proj, attn.v_proj], xnorm=norm, rope=rope) if rope else None
                if bound is None:  # no rope fits the launch: MLX's rope after it
                    rope, bound = None, p.split_plan(x, [attn.k_proj, attn.v_proj], xnorm=norm)
                if bound is not None:
                    sites.append(_Site(p, bound, split=True, normed=norm is not None, roped=rope is not None))
                    continue
            # o's path adds the attention's residual inside its kernel (one graph node fewer), and
            # applies the post-attention norm where it can
            norm = _norm(block.post_attention_layernorm, x) if p is attn.o_proj else None
            bound = (p.residual_plan(x, ynorm=norm) if p is attn.o_proj else p.ctl.plan(x, p._plan)) \
                if hasattr(p, "_plan") else None
            if bound is None or len(bound.spaces) != 1:
                return None
            sites.append(_Site(p, bound, normed=norm is not None))
        return _Step(block, plan, *sites)


def _one_token(self, x: mx.array, mask, cache) -> Optional[mx.array]:
    if x.shape[1] != 1 or cache is None or not enabled() or not FA.enabled() or self._step.collecting():
        return None
    s = self._step.step(self, x)
    if s is None:
        return None
    attn = self.self_attn
    off = cache.offset  # an int, or one position per sequence (mlx-lm's BatchKVCache)
    roped = s.q is not None and s.q.roped
    if type(off) is not int:
        if roped:  # the fused rope takes one position for all rows
            return None
    else:
        off = _offset(off, roped)
    out = s.head(x, off, (s.q.ws.last,) if s.q else ())
    q, k, v = append_token(cache, *out[:3])  # an in-place cache hands q on: the attention waits for the write
    rest = out[3:]
    if s.q:
        s.q.done(*rest)
    o = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    out = s.mid(x, o, (s.o.ws.last,) if s.o else ())
    h, hn = out[:2]
    if s.o:
        s.o.done(*out[2:])
    add_to = getattr(self.mlp, "add_to", None)  # a SparseMLP: the residual add inside down's kernel
    return h + self.mlp(hn) if add_to is None else add_to(h, hn)


def install(block: nn.Module) -> bool:
    """Give one transformer block the compiled one-token step (in place: its class changes, not
    its parameters). Needs the fused attention installed on its ``self_attn``."""
    if isinstance(getattr(block, "_step", None), _BlockState):
        return True
    if type(block).__module__ not in FA.FAMILIES or not hasattr(block.self_attn, "_fused"):
        return False
    block.__class__ = FA.one_token_subclass(type(block), "Stepped", _one_token)
    block._step = _BlockState(block)
    return True


def reset(block: nn.Module) -> None:
    """Forget the steps (the method changed)."""
    st = getattr(block, "_step", None)
    if st is not None:
        st.steps = None
