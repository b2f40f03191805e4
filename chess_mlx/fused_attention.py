"""One-token attention with fewer graph nodes: q, k and v as one product, RoPE once.

Why: on a fast GPU a decode token is bound by MLX's host-side encoding, which grows with the
number of graph nodes (benchmarks/RESULTS.md, sessions 3, 13 and 14). mlx-lm's attention costs a
token, per layer, three products, three reshapes, four transposes and two RoPEs. Here, for one
token, it is:

- one product over the rows ``[Wq; Wk; Wv]`` (under CHESS+attention, on a GPU, one sparse-input
  launch over ``[Wq^T | Wk^T | Wv^T]`` that thresholds q's input only,
  ``SparseInputLinear.with_dense``; where q's outputs do not end a kernel tile, q's own
  sparse-input launch and one ``[Wk; Wv]`` product);
- one reshape straight to heads: a single token's ``(1, H*D)`` row already is ``(H, 1, D)`` in
  memory, so no transpose is needed, on the way in or out;
- one RoPE over the q and k heads together (they are adjacent rows), unless the model normalises
  q and k per head first (Qwen3).

The three projections keep their parameter names: their weights become row views of one stored
block, so the fused product costs no extra memory and checkpoints, calibration and the prefill
path (mlx-lm's own ``__call__``) see the same parameters as before. Prefill, calibration
collectors and models outside the families listed in ``FAMILIES`` take mlx-lm's code unchanged.
``CHESS_MLX_FUSED_ATTN=0`` switches this off (mlx-lm's attention everywhere).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models.base import scaled_dot_product_attention

from . import sparse_gemv as G
from .kv_cache import append_token
from .linear_ops import dense_linear
from .row_store import RowStore, fusable
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_FUSED_ATTN", "the fused one-token attention (off: mlx-lm's attention)")

# mlx-lm attention modules whose one-token call this module reproduces (Mistral is mlx-lm's llama).
FAMILIES = ("mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.qwen3")


class _Rows(nn.Module):
    """Consecutive output rows of several projections as one projection for ``dense_linear``."""

    def __init__(self, mods: list[nn.Module], rows: dict[str, mx.array], start: int, stop: int):
        super().__init__()
        for key, a in rows.items():
            self[key] = a[start:stop]
        if "scales" in rows:
            self.group_size, self.bits = mods[0].group_size, mods[0].bits
            self.mode = getattr(mods[0], "mode", "affine")
        mx.eval(self.parameters())  # views now, or each step would slice anew


@dataclass
class _Plan:
    """The one-token attention of the current method: which projections share one product."""

    qkv: Optional[_Rows]  # q, k and v dense: one product
    kv: Optional[_Rows]  # q thresholded, k and v dense: q alone, then k and v as one product


class Collectors:
    """The controls of some sparse projections, looked up once, to see a calibration collector
    cheaply at every layer and token (a collector needs mlx-lm's own call, which calls them)."""

    def __init__(self, *projs: nn.Module):
        self.ctls = [c for p in projs if (c := getattr(p, "ctl", None))]

    def collecting(self) -> bool:
        for c in self.ctls:
            if c.collector is not None:
                return True
        return False


class _State(Collectors):
    """Plain (non-parameter) state of one attention module: its stored rows, current plan, and
    what a step reads of the module, looked up once (Module attribute lookups cost host time at
    every layer and token)."""

    def __init__(self, attn: nn.Module):
        super().__init__(attn.q_proj, attn.k_proj, attn.v_proj)
        self.store = RowStore()  # the [Wq; Wk; Wv] block
        self.plan: Optional[_Plan] = None
        self.hq, self.hkv = attn.n_heads, attn.n_kv_heads
        self.norms = "q_norm" in attn


def is_dense(p: nn.Module) -> bool:
    """Whether a projection takes its input as it is (no threshold: one dense product)."""
    ctl = getattr(p, "ctl", None)
    return ctl is None or ctl.threshold is None


def _make_plan(attn: nn.Module, st: _State) -> _Plan:
    q, k, v = attn.q_proj, attn.k_proj, attn.v_proj
    if not (is_dense(k) and is_dense(v) and fusable([q, k, v])):
        return _Plan(None, None)
    rows = st.store.rows_of([q, k, v])
    nq, nkv = q["weight"].shape[0], k["weight"].shape[0]
    if is_dense(q):
        return _Plan(_Rows([q, k, v], rows, 0, nq + 2 * nkv), None)
    return _Plan(None, _Rows([k, v], rows, nq, nq + 2 * nkv))


def plan_of(attn: nn.Module) -> _Plan:
    """The attention's one-token plan for the current method (made on first use)."""
    st: _State = attn._fused
    if st.plan is None:
        st.plan = _make_plan(attn, st)
    return st.plan


def rope_spec(attn: nn.Module) -> Optional[G.Rope]:
    """The attention's RoPE as a sparse-input launch can apply it to the q and k heads of its
    ``[q | k | v]`` output (``sparse_gemv.Rope``), or None: q and k are normalised per head first
    (Qwen3), the rope is not MLX's plain ``nn.RoPE`` or mlx-lm's ``Llama3RoPE``, or it rotates part
    of a head only. The inverse frequencies are MLX's: exp2(-(i / half) * log2(base)) in float32,
    or 1 / freqs."""
    from mlx_lm.models.rope_utils import Llama3RoPE

    st: _State = attn._fused
    r = attn.rope
    d = attn.q_proj["weight"].shape[0] // st.hq
    if st.norms or getattr(r, "dims", None) != d or d % 2:
        return None
    if type(r) is nn.RoPE:
        inv_freq, scale = G.rope_inverse_frequencies(d, r.base), float(r.scale)
    elif type(r) is Llama3RoPE:
        inv_freq, scale = mx.array((1.0 / np.array(r._freqs, dtype=np.float64)).astype(np.float32)), 1.0
    else:
        return None
    mx.eval(inv_freq)
    return G.Rope(inv_freq, d, (st.hq + st.hkv) * d, bool(r.traditional), scale)


def heads(st: _State, h: mx.array, rope, q_norm, k_norm, offset) -> tuple[mx.array, mx.array, mx.array]:
    """q, k, v heads of one token from the fused product ``h`` (B, 1, (hq + 2 hkv) * D), with
    RoPE at ``offset``: one reshape, one RoPE over q and k together unless q/k are normalised.
    ``rope`` None: q and k came rotated (the launch applied it, ``rope_spec``)."""
    hq, hkv = st.hq, st.hkv
    B = h.shape[0]
    h = h.reshape(B, hq + 2 * hkv, 1, h.shape[-1] // (hq + 2 * hkv))
    v = h[:, hq + hkv:]
    if rope is None:
        return h[:, :hq], h[:, hq:hq + hkv], v
    if q_norm is not None:
        return rope(q_norm(h[:, :hq]), offset=offset), rope(k_norm(h[:, hq:hq + hkv]), offset=offset), v
    r = rope(h[:, :hq + hkv], offset=offset)
    return r[:, :hq], r[:, hq:], v


def heads_kv(st: _State, q: mx.array, kv: mx.array, rope, q_norm, k_norm, offset) -> tuple[mx.array, ...]:
    """q, k, v heads of one token from q (B, 1, hq * D) and the fused ``[Wk; Wv]`` product ``kv``,
    with RoPE at ``offset``."""
    hq, hkv = st.hq, st.hkv
    B = q.shape[0]
    q = q.reshape(B, hq, 1, q.shape[-1] // hq)
    kv = kv.reshape(B, 2 * hkv, 1, q.shape[-1])
    k, v = kv[:, :hkv], kv[:, hkv:]
    if q_norm is not None:
        q, k = q_norm(q), k_norm(k)
    return rope(q, offset=offset), rope(k, offset=offset), v


def _one_token(self, x: mx.array, mask, cache) -> mx.array:
    """mlx-lm's attention for a single token ``x`` of shape (B, 1, dim), in fewer nodes."""
    st: _State = self._fused
    plan, hq, hkv = plan_of(self), st.hq, st.hkv
    qn, kn = (self.q_norm, self.k_norm) if st.norms else (None, None)
    B = x.shape[0]
    if plan.qkv is not None:
        q, k, v = heads(st, dense_linear(x, plan.qkv), self.rope, qn, kn, cache.offset)
    elif plan.kv is not None:
        y = self.q_proj.with_dense(x, [self.k_proj, self.v_proj])  # q is thresholded: a SparseInputLinear
        if y is not None:
            q, k, v = heads(st, y, self.rope, qn, kn, cache.offset)
        else:
            q, k, v = heads_kv(st, self.q_proj(x), dense_linear(x, plan.kv), self.rope, qn, kn, cache.offset)
    else:
        q = self.q_proj(x)
        q = q.reshape(B, hq, 1, q.shape[-1] // hq)
        k = self.k_proj(x).reshape(B, hkv, 1, q.shape[-1])
        v = self.v_proj(x).reshape(B, hkv, 1, q.shape[-1])
        if qn is not None:
            q, k = qn(q), kn(k)
        q, k = self.rope(q, offset=cache.offset), self.rope(k, offset=cache.offset)
    q, k, v = append_token(cache, q, k, v)
    o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
    return self.o_proj(o.reshape(B, 1, -1))


_SUBCLASSES: dict[tuple[type, str], type] = {}


def one_token_subclass(base: type, prefix: str, one_token: Callable) -> type:
    """A subclass of the mlx-lm module class ``base`` whose call first tries
    ``one_token(self, x, mask, cache)`` and, where that returns None, runs ``base``'s own call.
    Swapping an instance's class this way changes its call and keeps its parameters and names."""
    key = (base, prefix)
    cls = _SUBCLASSES.get(key)
    if cls is None:
        def __call__(self, x, mask=None, cache=None):
            out = one_token(self, x, mask, cache)
            return base.__call__(self, x, mask=mask, cache=cache) if out is None else out

        cls = _SUBCLASSES[key] = type(f"{prefix}{base.__name__}", (base,), {"__call__": __call__})
    return cls


def _try_one_token(self, x: mx.array, mask, cache) -> Optional[mx.array]:
    if x.shape[1] != 1 or cache is None or not enabled() or self._fused.collecting():
        return None
    return _one_token(self, x, mask, cache)


def install(attn: nn.Module) -> bool:
    """Give one attention module the fused one-token call (in place: its class, not its
    parameters, changes). Returns False for a family this module does not know."""
    if isinstance(getattr(attn, "_fused", None), _State):
        return True
    if type(attn).__module__ not in FAMILIES:
        return False
    attn.__class__ = one_token_subclass(type(attn), "Fused", _try_one_token)
    attn._fused = _State(attn)
    return True


def reset(attn: nn.Module) -> None:
    """Forget the plan (the method changed); the stored rows stay."""
    st = getattr(attn, "_fused", None)
    if st is not None:
        st.plan = None
