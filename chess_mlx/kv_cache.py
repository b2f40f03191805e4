"""One layer's keys and values in one buffer once k and v come side by side: one copy per step.

Why: mlx-lm's ``KVCache`` writes a step's k and v with a slice update each, two copy launches per
layer and token (2.5-2.8 us each on the H100, benchmarks/RESULTS.md session 21) and two graph
nodes for MLX to encode. Under CHESS+attention k and v leave the split q/k/v launch side by side
(``[q | k | v]``, RoPE applied inside the launch), so one buffer ``(B, Hk + Hv, T, D)`` with the
keys' heads first and the values' after takes both with one slice update (``update_joint``).
Attention reads keys and values as slices ``(B, H, T, D)`` of it, laid out as mlx-lm's (MLX's
one-token attention kernels, CUDA and Metal, read them without a copy for one sequence), one
slice per fetch as mlx-lm's.

A cache stays mlx-lm's own (two buffers, its code) until the first ``update_joint``, which moves
what it holds into the joint buffer once. So the methods whose k and v come apart (dense, CATS,
CHESS, TEAL, prefill, q/k-normalised families) decode exactly as with mlx-lm's cache: with the
joint buffer from the start they decoded ~1-2% slower in one-process A/Bs (session 22), the cause
not found. ``make_cache`` gives this cache to the layers of the families the library patches
when ``CHESS_MLX_JOINT_KV=1``.

**Off by default since session 34:** after a 4096-token prompt, float16 CHESS+attention decoded
at 172 tok/s with it and 192 without (dense 144-147, Llama-3-8B shape, H100; 4-bit 237 and 246,
dense 158). Its gain, one copy launch per layer, is ~2% at a 32-token context; its cost grows
with the context, for a reason not found (MLX's CUDA one-token attention, as its source reads,
takes key and value slices of one sequence without a copy; RESULTS.md session 34).
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import sparse_gemv as G
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_JOINT_KV", "the joint key/value cache (one copy per layer and token)",
                             default=False)
inplace_enabled, enable_inplace = env_switch(
    "CHESS_MLX_INPLACE_KV", "the KV cache written in place on a GPU (off: mlx-lm's slice updates)")


class JointKVCache(KVCache):
    """mlx-lm's ``KVCache`` for one sequence that switches to one buffer ``kv`` of ``(1, Hk + Hv,
    capacity, D)`` at its first ``update_joint`` (same growth in steps of 256 positions, trimming,
    masks and state either way)."""

    def __init__(self):
        super().__init__()
        self.kv: Optional[mx.array] = None  # None: mlx-lm's keys / values buffers hold the cache
        self.n_keys = 0  # Hk: the joint buffer's first heads are the keys'

    # -- writing -------------------------------------------------------------------------------
    def _append(self, B: int, heads: int, L: int, D: int, n_keys: int, dtype) -> int:
        """Room in the joint buffer for ``L`` more positions; the first free position. The first
        call moves mlx-lm's two buffers into it."""
        if B != 1:
            raise ValueError("JointKVCache joins keys and values of one sequence only")
        if self.kv is not None and ((heads, D) != (self.kv.shape[1], self.kv.shape[3]) or n_keys != self.n_keys):
            raise ValueError("JointKVCache: the heads changed between updates")
        prev = self.offset
        if self.kv is None or prev + L > self.kv.shape[2]:
            grow = mx.zeros((B, heads, (self.step + prev + L - 1) // self.step * self.step - prev, D), dtype)
            if self.kv is not None:
                held = self.kv[:, :, :prev]
            elif self.keys is not None:  # mlx-lm's buffers so far: moved once
                held = mx.concatenate([self.keys[..., :prev, :], self.values[..., :prev, :]], axis=1)
            else:
                held = None
            self.kv = grow if held is None else mx.concatenate([held, grow], axis=2)
            self.keys = self.values = None
        self.n_keys = n_keys
        self.offset += L
        return prev

    def update_joint(self, kv: mx.array, n_keys: int) -> tuple[mx.array, mx.array]:
        """Append ``kv`` (B, Hk + Hv, L, D), the keys' ``n_keys`` heads then the values', with one
        write. Returns (keys, values) up to the new offset, slices (B, H, T, D) of the buffer."""
        prev = self._append(kv.shape[0], kv.shape[1], kv.shape[2], kv.shape[3], n_keys, kv.dtype)
        self.kv[:, :, prev:self.offset] = kv
        return self.keys_and_values()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """mlx-lm's interface: mlx-lm's own code until the cache is joint, then two writes."""
        if self.kv is None:
            return super().update_and_fetch(keys, values)
        if keys.shape[-1] != values.shape[-1]:
            raise ValueError("JointKVCache needs keys and values of one head size")
        B, hk, L, D = keys.shape
        prev = self._append(B, hk + values.shape[1], L, D, hk, keys.dtype)
        self.kv[:, :hk, prev:self.offset] = keys
        self.kv[:, hk:, prev:self.offset] = values
        return self.keys_and_values()

    # -- reading -------------------------------------------------------------------------------
    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        if self.kv is None:
            return super().keys_and_values()
        return self.kv[:, :self.n_keys, :self.offset], self.kv[:, self.n_keys:, :self.offset]

    @property
    def state(self):
        if self.kv is None:
            return self.keys, self.values, self.offset
        return (*self.keys_and_values(), self.offset)

    @state.setter
    def state(self, v):
        self.kv, self.n_keys = None, 0
        self.keys, self.values, self.offset = v

    def empty(self) -> bool:
        return self.kv is None and self.keys is None

    @property
    def nbytes(self) -> int:
        return self.kv.nbytes if self.kv is not None else super().nbytes

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        if self.kv is not None:  # back to two buffers, which mlx-lm quantizes
            self.keys, self.values = self.keys_and_values()
            self.kv = None
        return super().to_quantized(group_size=group_size, bits=bits)


_META: dict[tuple[int, int, int], mx.array] = {}


def _meta(p: int, cap: int, cap2: int = 0) -> mx.array:
    """The int32 [p, cap, cap2, 0] a KV write launch reads: one per position, shared by all layers
    (16 bytes: smaller arrays are slow for kernels to read)."""
    a = _META.get((p, cap, cap2))
    if a is None:
        if len(_META) > 8192:
            _META.clear()
        a = _META[(p, cap, cap2)] = mx.array([p, cap, cap2, 0], dtype=mx.int32)
    return a


def _launch_write(kind: str, q: mx.array, k: mx.array, v: mx.array, kb: mx.array, vb: mx.array,
                  p: int) -> mx.array:
    """kv_write: k and v into kb and vb at position p, in place; returns q as the launch's output."""
    nq, nkv = q.size, k.size
    return G._kernel(kind, "kv_write")(
        inputs=[q, k, v, kb, vb, _meta(p, kb.shape[2])],
        template=[("T", q.dtype), ("NQ", nq), ("NKV", nkv), ("D", k.shape[-1])],
        grid=(-(-max(nq, nkv) // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[q.shape], output_dtypes=[q.dtype])[0]


def _launch_grow(kind: str, q: mx.array, k: mx.array, v: mx.array, kb: mx.array, vb: mx.array, p: int,
                 cap2: int) -> tuple[mx.array, mx.array, mx.array]:
    """kv_grow: new buffers of cap2 positions holding kb and vb's first p positions and the token
    at p; returns (q, kb2, vb2)."""
    nq, nkv = q.size, k.size
    shape = (1, kb.shape[1], cap2, kb.shape[3])
    q2, kb2, vb2 = G._kernel(kind, "kv_grow")(
        inputs=[q, k, v, kb, vb, _meta(p, kb.shape[2], cap2)],
        template=[("T", q.dtype), ("NQ", nq), ("NKV", nkv), ("D", k.shape[-1])],
        grid=(-(-max(nq, nkv * cap2) // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
        output_shapes=[q.shape, shape, shape], output_dtypes=[q.dtype] * 3)
    return q2, kb2, vb2


class InPlaceKVCache(KVCache):
    """mlx-lm's ``KVCache`` whose one-token decode write (``write``) goes into its buffers in place
    on a GPU: one launch per layer and token for k and v (``cuda/kv_write.cu``,
    ``metal/kv_write.metal``), where mlx-lm's two slice updates copy both whole buffers whenever the
    previous token still runs (benchmarks/RESULTS.md, session 35). Prompts, batches, the CPU and
    the reference switch take mlx-lm's code (``update_and_fetch``); the contents, growth in steps of
    256 positions, trimming, masks and state are mlx-lm's either way.

    Writing in place is safe here because each write goes to a position no earlier launch of the
    token reads (attention reads positions below it) and the attention that reads it takes the
    write's q output; buffers set from outside (``state``) are first copied into the cache's own."""

    def __init__(self):
        super().__init__()
        self.own = False  # whether keys and values are buffers this cache made (row-contiguous, unshared)

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        out = super().update_and_fetch(keys, values)
        self.own = True  # mlx-lm's growth and slice updates give fresh, row-contiguous buffers
        return out

    def write(self, q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """One token of one sequence: append k and v (1, H, 1, D); returns (q, keys, values) for
        the attention, which must take this q (it orders the attention after the write)."""
        kind = G.backend()
        if (kind == "reference" or k.shape[0] != 1 or k.shape[2] != 1 or self.keys is None
                or k.dtype != self.keys.dtype or v.dtype != self.keys.dtype or q.dtype != k.dtype
                or k.shape != v.shape or self.keys.shape[1:] != self.values.shape[1:]
                or self.keys.shape[1] != k.shape[1] or self.keys.shape[3] != k.shape[3]):
            return (q, *self.update_and_fetch(k, v))
        p = self.offset
        if not self.own or p + 1 > self.keys.shape[2]:
            q, self.keys, self.values = _launch_grow(kind, q, k, v, self.keys, self.values, p, p + self.step)
            self.own = True
        else:
            q = _launch_write(kind, q, k, v, self.keys, self.values, p)
        self.offset = p + 1
        return (q, *self.keys_and_values())

    @property
    def state(self):
        return super().state

    @state.setter
    def state(self, v):
        self.keys, self.values, self.offset = v
        self.own = False  # someone else's arrays (views, shared): the next write copies them first


def append_token(cache, q: mx.array, k: mx.array, v: mx.array) -> tuple[mx.array, mx.array, mx.array]:
    """One-token attention's cache step, whatever the cache: (q, keys, values) to attend with."""
    if type(cache) is InPlaceKVCache:
        return cache.write(q, k, v)
    return (q, *cache.update_and_fetch(k, v))


def make_cache(model: nn.Module) -> list:
    """The KV caches of one generated sequence: mlx-lm's, with its plain ``KVCache`` of each
    layer of a patched family (``fused_attention.FAMILIES``) replaced by an ``InPlaceKVCache``
    (or, with ``CHESS_MLX_INPLACE_KV=0`` and ``CHESS_MLX_JOINT_KV=1``, a ``JointKVCache``)."""
    from .fused_attention import FAMILIES

    caches = make_prompt_cache(model)
    cls = InPlaceKVCache if inplace_enabled() else JointKVCache if enabled() else None
    if cls is None:
        return caches
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) != len(caches):
        return caches

    def patched_family(layer) -> bool:  # its attention class, or the one the library derived it from
        return any(c.__module__ in FAMILIES for c in type(getattr(layer, "self_attn", None)).__mro__)

    return [cls() if type(c) is KVCache and patched_family(layer) else c for c, layer in zip(caches, layers)]
