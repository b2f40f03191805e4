"""One-token transformer block as two compiled functions around the KV cache: less Python.

Why: once the fused attention cut MLX's encoding (``fused_attention``), the Python that builds a
token's graph, ~25 op calls and a dozen module calls per layer, became what keeps CHESS at
dense's speed on some lent hosts (benchmarks/RESULTS.md, session 15). Where q, k, v and o are
dense (dense, CATS and CHESS), a block's one-token step is here:

- ``head``, compiled: input norm, the ``[Wq; Wk; Wv]`` product, heads, RoPE -> q, k, v;
- the KV cache update and attention, outside (the cache grows with every token, and attention
  keeps MLX's one-token kernel; traced whole steps lost both, RESULTS.md sessions 7 and 14);
- ``mid``, compiled: the o product, the residual, the post-attention norm;
- the MLP module (its own compiled path under CATS/CHESS) with the last residual, which CATS/CHESS
  add inside down's kernel (``SparseMLP.add_to``).

The graph nodes are those of the fused attention path, so MLX's encoding is unchanged. RoPE takes
the position as an array, so one trace serves every token. A trace keeps the stream it was made
on, so each block keeps one pair per stream. Prefill, calibration collectors, CHESS+attention and
TEAL take the fused attention path (``fused_attention``): with their sparse-input kernels inside
these traces the two-thread decode hung on the H100 (RESULTS.md session 15, section 7).
``CHESS_MLX_BLOCK_STEP=0`` switches this off.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention

from . import fused_attention as FA
from .linear_ops import dense_linear
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_BLOCK_STEP", "the compiled one-token block")

_OFFSETS: dict[int, mx.array] = {}
_MISSING = object()


def _offset(n: int) -> mx.array:
    """The position ``n`` as a materialised int32 scalar (one per position, shared by all layers)."""
    a = _OFFSETS.get(n)
    if a is None:
        if len(_OFFSETS) > 8192:
            _OFFSETS.clear()
        a = _OFFSETS[n] = mx.array(n, dtype=mx.int32)
    return a


class _Step:
    """A block's compiled ``head`` and ``mid`` for one stream."""

    __slots__ = ("head", "mid")

    def __init__(self, block: nn.Module, rows: nn.Module):
        attn, st = block.self_attn, block.self_attn._fused
        ln1, ln2, o, rope = block.input_layernorm, block.post_attention_layernorm, attn.o_proj, attn.rope
        qn, kn = (attn.q_norm, attn.k_norm) if st.norms else (None, None)

        def head(x, offset):
            return FA.heads(st, dense_linear(ln1(x), rows), rope, qn, kn, offset)

        def mid(x, o_heads):
            h = x + dense_linear(o_heads.reshape(x.shape[0], 1, -1), o)
            return h, ln2(h)

        # The weights are captured as constants of the traces; set_method drops the traces, so
        # weights loaded later take effect then, as for every other cached plan.
        self.head, self.mid = mx.compile(head), mx.compile(mid)


class _BlockState(FA.Collectors):
    """Plain state of one block: its steps per stream, for the current method (None: fall back)."""

    def __init__(self, block: nn.Module):
        attn = block.self_attn
        super().__init__(attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj)
        self.steps: Optional[dict] = None

    def step(self, block: nn.Module) -> Optional[_Step]:
        if self.steps is None:
            self.steps = {}
        key = repr(mx.default_stream(mx.default_device()))
        s = self.steps.get(key, _MISSING)
        if s is _MISSING:
            s = self.steps[key] = self._make(block)
        return s

    def _make(self, block: nn.Module) -> Optional[_Step]:
        attn = block.self_attn
        plan = FA.plan_of(attn)
        if plan.qkv is None or not FA.is_dense(attn.o_proj):
            return None
        return _Step(block, plan.qkv)


def _one_token(self, x: mx.array, mask, cache) -> Optional[mx.array]:
    if x.shape[1] != 1 or cache is None or not enabled() or not FA.enabled() or self._step.collecting():
        return None
    s = self._step.step(self)
    if s is None:
        return None
    attn = self.self_attn
    off = cache.offset  # an int, or one position per sequence (mlx-lm's BatchKVCache)
    q, k, v = s.head(x, _offset(off) if type(off) is int else off)
    k, v = cache.update_and_fetch(k, v)
    o = scaled_dot_product_attention(q, k, v, cache=cache, scale=attn.scale, mask=mask)
    h, hn = s.mid(x, o)
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
