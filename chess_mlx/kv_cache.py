"""One layer's keys and values in one buffer, written by one copy per decode step.

Why: mlx-lm's ``KVCache`` writes a step's k and v with a slice update each, two copy launches per
layer and token (2.5-2.8 us each on the H100, benchmarks/RESULTS.md session 21) and two graph
nodes for MLX to encode. Under CHESS+attention k and v leave the split q/k/v launch side by side
(``[q | k | v]``, RoPE applied inside the launch), so one buffer ``(B, Hk + Hv, T, D)`` with the
keys' heads first and the values' after takes both with one slice update (``update_joint``).
Attention reads keys and values as slices ``(B, H, T, D)`` of it, laid out as mlx-lm's (MLX's
one-token attention kernels, CUDA and Metal, read them without a copy for one sequence), and each
fetch is one slice, as mlx-lm's: the decode graph gains no nodes. (A time-major buffer, whose
token rows are contiguous, needed a transpose per fetch and write: 6 more graph nodes per layer,
which cost a host-bound 4-bit decode ~5%, benchmarks/RESULTS.md session 22.)
Producers of separate k and v (prefill, dense, q/k-normalised families) go through
``update_and_fetch``, which writes them apart: two copies per step, as mlx-lm's cache.

``make_cache`` gives this cache to the layers of the families the library patches (plain
attention, equal key and value head sizes) for one-sequence generation; ``CHESS_MLX_JOINT_KV=0``
keeps mlx-lm's cache.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import KVCache, _BaseCache, create_attention_mask, make_prompt_cache

from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_JOINT_KV", "the joint key/value cache (one copy per layer and token)")


class JointKVCache(_BaseCache):
    """mlx-lm's ``KVCache`` (same growth in steps of 256 positions, trimming, masks) for one
    sequence, with keys and values in one buffer ``kv`` of ``(1, Hk + Hv, capacity, D)``."""

    step = 256

    def __init__(self):
        self.kv: Optional[mx.array] = None
        self.n_keys = 0  # Hk: the buffer's first heads are the keys'
        self.offset = 0

    # -- writing -------------------------------------------------------------------------------
    def _append(self, B: int, heads: int, L: int, D: int, n_keys: int, dtype) -> int:
        """Room for ``L`` more positions of ``heads`` heads of size ``D``; the first free position."""
        if B != 1:
            raise ValueError("JointKVCache holds one sequence (a batch needs mlx-lm's caches)")
        if self.kv is not None and ((heads, D) != (self.kv.shape[1], self.kv.shape[3]) or n_keys != self.n_keys):
            raise ValueError("JointKVCache: the heads changed between updates")
        prev = self.offset
        if self.kv is None or prev + L > self.kv.shape[2]:
            grow = mx.zeros((B, heads, (self.step + L - 1) // self.step * self.step, D), dtype)
            self.kv = grow if self.kv is None else mx.concatenate([self.kv[:, :, :prev], grow], axis=2)
        self.n_keys = n_keys
        self.offset += L
        return prev

    def update_joint(self, kv: mx.array, n_keys: int) -> tuple[mx.array, mx.array]:
        """Append ``kv`` (B, Hk + Hv, L, D), the keys' ``n_keys`` heads then the values', with one
        write. Returns (keys, values) up to the new offset, views (B, H, T, D) of the buffer."""
        prev = self._append(*kv.shape[:2], kv.shape[2], kv.shape[3], n_keys, kv.dtype)
        self.kv[:, :, prev:self.offset] = kv
        return self.keys_and_values()

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """mlx-lm's interface: keys (B, Hk, L, D) and values (B, Hv, L, D), written apart (two
        writes, as mlx-lm's cache; joining them first would copy once more)."""
        if keys.shape[-1] != values.shape[-1]:
            raise ValueError("JointKVCache needs keys and values of one head size")
        B, hk, L, D = keys.shape
        prev = self._append(B, hk + values.shape[1], L, D, hk, keys.dtype)
        self.kv[:, :hk, prev:self.offset] = keys
        self.kv[:, hk:, prev:self.offset] = values
        return self.keys_and_values()

    # -- reading -------------------------------------------------------------------------------
    def keys_and_values(self) -> tuple[mx.array, mx.array]:
        return self.kv[:, :self.n_keys, :self.offset], self.kv[:, self.n_keys:, :self.offset]

    @property
    def keys(self) -> Optional[mx.array]:
        return None if self.kv is None else self.keys_and_values()[0]

    @property
    def values(self) -> Optional[mx.array]:
        return None if self.kv is None else self.keys_and_values()[1]

    @property
    def state(self):
        return [] if self.kv is None else list(self.keys_and_values())

    @state.setter
    def state(self, v):
        self.kv, self.n_keys, self.offset = None, 0, 0
        if v:
            keys, values = v
            self.update_and_fetch(keys, values)

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.kv is None

    @property
    def nbytes(self) -> int:
        return 0 if self.kv is None else self.kv.nbytes

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    def make_mask(self, *args, **kwargs):
        return create_attention_mask(*args, offset=self.offset, **kwargs)


def make_cache(model: nn.Module) -> list:
    """The KV caches of one generated sequence: mlx-lm's, with its plain ``KVCache`` of each
    layer of a patched family (``fused_attention.FAMILIES``) replaced by a ``JointKVCache``."""
    from .fused_attention import FAMILIES

    caches = make_prompt_cache(model)
    if not enabled():
        return caches
    layers = getattr(model, "layers", None)
    if layers is None or len(layers) != len(caches):
        return caches

    def patched_family(layer) -> bool:  # its attention class, or the one the library derived it from
        return any(c.__module__ in FAMILIES for c in type(getattr(layer, "self_attn", None)).__mro__)

    return [JointKVCache() if type(c) is KVCache and patched_family(layer) else c for c, layer in zip(caches, layers)]
