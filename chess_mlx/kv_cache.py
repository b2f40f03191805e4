"""The KV cache of a decode: mlx-lm's, with each one-token write made in place on a GPU.

Why: MLX's slice update (mlx-lm's ``KVCache`` writes a step's k and v with one each) writes into
its buffer only when it may donate it, and while the previous token still runs on the GPU, that
token's launches hold the buffer, so in pipelined decode the update copies the whole buffer: at
every layer and token, both caches, 2 x 16.8 MB a layer after 4096 positions of Llama-3-8B.
``InPlaceKVCache`` writes k and v with one launch (``cuda/kv_write.cu``, ``metal/kv_write.metal``)
into buffers it owns, and hands q on as that launch's output, which orders the attention after the
write (MLX orders launches through their output buffers only). On the H100 after a 4096-token
prompt, float16 dense decoded at 156.7 tok/s with it against 143.1 without, CHESS+attention at
213.3 against 190.1 (benchmarks/RESULTS.md, session 35).

Prompts, batches of sequences, the CPU and the reference switch keep mlx-lm's code
(``update_and_fetch``); contents, growth in steps of 256 positions, trimming, masks and state are
mlx-lm's either way. ``CHESS_MLX_INPLACE_KV=0`` gives mlx-lm's own caches.

Session 22's joint cache (keys and values in one buffer, one slice update a token) is gone: it
saved one launch a layer, which the in-place write also saves, and after 4096 positions it cost
12% of float16 CHESS+attention against mlx-lm's cache (session 34), for a reason not found.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, make_prompt_cache

from . import sparse_gemv as G
from .switches import env_switch

inplace_enabled, enable_inplace = env_switch(
    "CHESS_MLX_INPLACE_KV", "the KV cache written in place on a GPU (off: mlx-lm's slice updates)")


_META: dict[tuple[int, int, int], mx.array] = {}


def _backend() -> str:
    """The kernels' backend, as the sparse modules take it (apart, for tests to fake)."""
    return G.backend()


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
    write's q output; buffers set from outside (``state``) are first copied into the cache's own.
    The other way round, arrays it hands out (``state``, fetched keys and values) share its buffers,
    so a later write shows in them past their offset, and at positions a trim gave back, which
    never happens with mlx-lm's cache. The library reads them within the step that fetched them
    only; a caller that keeps a cache's state for later should copy it (or switch this cache off)."""

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
        kind = _backend()
        if kind == "reference" or not self._fits(q, k, v):
            return (q, *self.update_and_fetch(k, v))
        p = self.offset
        if not self.own or p + 1 > self.keys.shape[2]:
            q, self.keys, self.values = _launch_grow(kind, q, k, v, self.keys, self.values, p, p + self.step)
            self.own = True
        else:
            q = _launch_write(kind, q, k, v, self.keys, self.values, p)
        self.offset = p + 1
        return (q, *self.keys_and_values())

    def _fits(self, q: mx.array, k: mx.array, v: mx.array) -> bool:
        """Whether the kernels take this token: one of one sequence, in buffers of its heads, head
        size and type."""
        if self.keys is None:
            return False
        _, heads, _, d = self.keys.shape
        return (k.shape == v.shape == (1, heads, 1, d) and self.values.shape[1:] == self.keys.shape[1:]
                and q.dtype == k.dtype == v.dtype == self.keys.dtype)

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
    layer of a patched family (``fused_attention.FAMILIES``) replaced by an ``InPlaceKVCache``."""
    from .fused_attention import FAMILIES

    caches = make_prompt_cache(model)
    if not inplace_enabled():
        return caches
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) != len(caches):
        return caches

    def patched_family(layer) -> bool:  # its attention class, or the one the library derived it from
        return any(c.__module__ in FAMILIES for c in type(getattr(layer, "self_attn", None)).__mro__)

    return [InPlaceKVCache() if type(c) is KVCache and patched_family(layer) else c for c, layer in zip(caches, layers)]
