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

from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_JOINT_KV", "the joint key/value cache (one copy per layer and token)",
                             default=False)


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
