"""One-token decode as one compiled MLX function of the whole model.

Why: on a fast GPU a decode token is bound by host time (benchmarks/RESULTS.md, sessions 8 and
13): the Python that builds each token's graph (mlx-lm's attention, the KV-cache update, every
layer's call) costs as much as the GPU work CHESS saves. Compiled, a token replays one trace in
C++ instead, for dense and every sparse method alike.

How: the KV cache stays mlx-lm's ``KVCache`` (prefill, trimming and the chat's reuse are
untouched). A one-token step writes its keys and values into the cache's preallocated buffer at
an *array* offset (``mx.slice_update``) and attends over the whole buffer with a mask of the
positions written so far, so every shape stays fixed while the cache fills a 256-token block:
one trace per (method, buffer size), replayed for every token in between.

The sparse layers' side effects are carried through the trace: each sparse-input call site's
ordering token (``sparse_gemv.Workspace.last``) goes in and comes back as an array, and the
densities the layers record come back as outputs and are handed to the recorder after each
replay, exactly as the layers would have recorded them.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import sparse_gemv as G
from .model_io import model_layers

# Families whose attention takes the cache through mlx-lm's protocol (``cache.offset`` for RoPE,
# ``update_and_fetch``, ``scaled_dot_product_attention(..., cache=cache, mask=mask)``).
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")

# Off by default: on the H100 with MLX 0.32.4 a compiled step costs more host time than the model
# op by op (benchmarks/RESULTS.md, session 14). Its Python build falls from 2.5-2.9 to 1.1-1.4 ms,
# but MLX encodes each ``DynamicSliceUpdate`` as three launches (copy, offset kernel, update) and
# takes no array mask in its CUDA decode attention (the masked attention becomes matmul, softmax,
# matmul), so encoding rises by 1.4-2.8 ms. ``CHESS_MLX_STEP_COMPILE=1`` switches it on.
_ENABLED = os.environ.get("CHESS_MLX_STEP_COMPILE", "0") == "1"


def enabled() -> bool:
    return _ENABLED


def enable(on: bool = True) -> None:
    """Switch whole-step compilation on or off (off: every token runs the model op by op)."""
    global _ENABLED
    _ENABLED = on


class _TraceCache:
    """What one layer's attention sees inside the trace: mlx-lm's cache protocol over a fixed-size
    buffer, with the offset as an array so one trace serves every position of the buffer."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values, self.offset = keys, values, offset

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: Optional[int] = None) -> mx.array:
        """Additive mask over the buffer: 0 up to the token being written, -inf past it (an array
        mask in the activation dtype; MLX's CUDA attention takes no boolean mask)."""
        pos = mx.arange(self.keys.shape[2])[None]
        return mx.where(pos <= self.offset, mx.array(0.0, self.keys.dtype), mx.array(-float("inf"), self.keys.dtype))


def _kv_cache_type():
    from mlx_lm.models.cache import KVCache

    return KVCache


class CompiledDecoder(nn.Module):
    """``model`` for mlx-lm's generation loop, with one-token steps compiled whole.

    Calls that are not a one-token step on plain ``KVCache``s filled by a prompt (prefill,
    quantized or rotating caches, input embeddings, an unsupported family, the CPU unless
    ``cpu=True``) go to ``model`` unchanged."""

    def __init__(self, model: nn.Module, cpu: bool = False):
        super().__init__()
        self.model = model
        self._run = _Runner(model, cpu)

    @property
    def layers(self):
        return self.model.layers

    def __call__(self, inputs: mx.array, cache: Optional[list] = None, **kwargs) -> mx.array:
        if kwargs or not self._run.applies(inputs, cache):
            return self.model(inputs, cache=cache, **kwargs)
        return self._run(inputs, cache)


class _Runner:
    """The compiled step itself (a plain object, so nn.Module does not take it for parameters)."""

    def __init__(self, model: nn.Module, cpu: bool):
        self.model = model
        self.cpu = cpu
        self.family = getattr(model, "model_type", None)
        self.compiled: dict[tuple, Any] = {}
        self.spaces: list[G.Workspace] = []
        self.records: list[tuple] = []  # (layer, projs, n_tokens) of each density output, in order

    def applies(self, inputs: mx.array, cache: Optional[list]) -> bool:
        if not _ENABLED or self.family not in FAMILIES or not cache or inputs.shape != (1, 1):
            return False
        if not self.cpu and mx.default_device() != mx.gpu:
            return False
        kv = _kv_cache_type()
        first = cache[0]
        if type(first) is not kv or first.keys is None:
            return False
        return all(type(c) is kv and c.keys is not None and c.offset == first.offset for c in cache)

    def _key(self) -> tuple:
        state = getattr(self.model, "_chess", None)
        from . import decode_paths as D

        return (getattr(state, "version", 0), D.enabled(), G.backend(), repr(mx.default_stream(mx.default_device())))

    def _prepare(self) -> None:
        """Run one uncompiled one-token step on throwaway caches, so every sparse layer makes its
        one-token plan (transposed weights, workspaces) outside the trace, then list the
        workspaces those plans use: their ordering tokens are the trace's state."""
        from mlx_lm.models.cache import make_prompt_cache

        state = getattr(self.model, "_chess", None)
        rec = state.recorder if state is not None else None
        was = rec.enabled if rec is not None else False
        if rec is not None:
            rec.enabled = False
        try:
            mx.eval(self.model(mx.zeros((1, 1), dtype=mx.int32), cache=make_prompt_cache(self.model)))
        finally:
            if rec is not None:
                rec.enabled = was
        seen: dict[int, G.Workspace] = {}
        for layer in model_layers(self.model):
            for mod in layer.modules():
                ctl = getattr(mod, "ctl", None)
                for plan in (ctl.plans.values() if ctl is not None else ()):
                    bound = plan[0] if isinstance(plan, tuple) else plan
                    for w in getattr(bound, "spaces", ()):
                        seen.setdefault(id(w), w)
        self.spaces = list(seen.values())

    def _traced(self, inputs, offset, keys, values, lasts):
        state = getattr(self.model, "_chess", None)
        caches = [_TraceCache(k, v, offset) for k, v in zip(keys, values)]
        for w, last in zip(self.spaces, lasts):
            w.last = last
        if state is None:
            logits, captured = self.model(inputs, cache=caches), []
        else:
            with state.recorder.capturing() as captured:
                logits = self.model(inputs, cache=caches)
        self.records = [(layer, projs, n) for layer, projs, _, n in captured]
        return (logits, [c.keys for c in caches], [c.values for c in caches], [w.last for w in self.spaces],
                [d for _, _, d, _ in captured])

    def __call__(self, inputs: mx.array, cache: list) -> mx.array:
        key = self._key()
        fn = self.compiled.get(key)
        if fn is None:
            self.compiled.clear()  # an older method's traces hold arrays nobody uses any more
            self._prepare()
            fn = self.compiled[key] = mx.compile(self._traced)
        kv = cache[0]
        if kv.offset >= kv.keys.shape[2]:
            for c in cache:  # the next 256-token block, as KVCache.update_and_fetch would add it
                _grow(c)
        spaces = self.spaces
        saved = [w.last for w in spaces]
        try:
            logits, keys, values, lasts, dens = fn(inputs, mx.array([kv.offset], dtype=mx.int32),
                                                   [c.keys for c in cache], [c.values for c in cache], saved)
        except BaseException:
            for w, last in zip(spaces, saved):  # a failed trace leaves tracers behind
                w.last = last
            raise
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        for w, last in zip(spaces, lasts):
            w.last = last
        state = getattr(self.model, "_chess", None)
        if state is not None and state.recorder.enabled:
            for (layer, projs, n), d in zip(self.records, dens):
                state.recorder.record_density(layer, projs, d, n)
        return logits


def _grow(c) -> None:
    b, h, n, dk = c.keys.shape
    dv = c.values.shape[3]
    step = getattr(c, "step", 256)
    c.keys = mx.concatenate([c.keys[..., :c.offset, :], mx.zeros((b, h, step, dk), c.keys.dtype)], axis=2)
    c.values = mx.concatenate([c.values[..., :c.offset, :], mx.zeros((b, h, step, dv), c.values.dtype)], axis=2)


def wrap(model: nn.Module, cpu: bool = False) -> nn.Module:
    """The model to hand mlx-lm's generation loop: ``model`` itself when whole-step compilation is
    off or the family is not one it knows, else a ``CompiledDecoder`` around it (made once)."""
    if not _ENABLED or getattr(model, "model_type", None) not in FAMILIES:
        return model
    dec = getattr(model, "_chess_decoder", None)
    if dec is None or dec._run.cpu != cpu:
        dec = CompiledDecoder(model, cpu)
        object.__setattr__(model, "_chess_decoder", dec)
    return dec
