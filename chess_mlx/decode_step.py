"""The whole one-token decode step as one compiled graph, replayed token after token.

Why: on a GPU a decode token is bound by host work, not by the weight bytes the sparse kernels
save (benchmarks/RESULTS.md: ~2 ms of Python building the graph and ~3.5 ms of MLX encoding it,
against ~5 ms of GPU time for a dense Llama-3-8B token). Per-layer compiled paths
(``decode_paths``) cut the sparse blocks' share; tracing the *whole* step, every layer dense or
sparse, removes the Python build altogether and lets MLX fuse the elementwise nodes between them.
Dense gains as much as the sparse methods, so comparisons stay fair (every method decodes this way).

mlx-lm's ``KVCache`` holds a Python-int offset and hands out slices that grow by one position per
token, so its graph differs at every step. Inside the trace each layer's cache is a stand-in
(``_TracedKV``): the position is an array input, the update is a ``slice_update`` into the
fixed-capacity buffer and the mask hides the positions not yet written. The buffers come back as
outputs and are stored in the real ``KVCache`` objects, which stay what mlx-lm, the chat session's
trimming and prefill use. A trace is replayed until the buffers grow (mlx-lm's 256-position step; that
one step runs eagerly and the next traces the new capacity) or the model's method changes.

What the step changes besides the cache comes back as outputs too: the ordering tokens of the
sparse-input kernels' workspaces (``sparse_gemv.Workspace``) and the densities the stats report.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import decode_paths as D
from . import sparse_gemv as G

_ENABLED = os.environ.get("CHESS_MLX_STEP_COMPILE", "0") == "1"  # off: slower on the H100 (RESULTS.md session 7)
_MAX_SHAPES = 4  # cache capacities kept traced at once (each holds a tape of the whole model)


def enabled() -> bool:
    return _ENABLED


def enable(on: bool = True) -> None:
    """Switch whole-step compilation on or off (off: every token builds its graph in Python)."""
    global _ENABLED
    _ENABLED = on


class _TracedKV:
    """A layer's KV cache inside the traced step: fixed-capacity buffers and an array position."""

    def __init__(self, keys: mx.array, values: mx.array, pos: mx.array):
        self.keys, self.values, self.offset = keys, values, pos

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n: int, return_array: bool = False, window_size: Optional[int] = None) -> mx.array:
        """Positions 0..pos (the one just written included); the unwritten tail is masked."""
        cols = mx.arange(self.keys.shape[2])
        mask = cols <= self.offset
        if window_size is not None:
            mask = mask & (cols > self.offset - window_size)
        return mask.reshape(1, 1, 1, -1)


def _plain_caches(cache) -> bool:
    """Caches the traced step can stand in for: mlx-lm's plain KVCache, already allocated, room for
    one more position, all layers at one offset, batch 1."""
    from mlx_lm.models.cache import KVCache

    if not cache:
        return False
    off = cache[0].offset
    return all(type(c) is KVCache and c.keys is not None and c.offset == off and off < c.keys.shape[2]
               and c.keys.shape[0] == 1 for c in cache)


class _Trace:
    """One configuration's compiled step, the capacities it has traced, and what its outputs mean."""

    def __init__(self, decoder: "StepDecoder", spaces: list):
        self.fn = mx.compile(decoder._step)
        self.shapes: set = set()
        self.spaces = spaces  # workspaces whose ordering tokens travel through the step
        self.dens_keys: list = []  # (layer, proj) of each density output, set when tracing


class StepDecoder:
    """Callable like the model (``decoder(tokens, cache=cache)``); one-token steps on plain KV caches
    replay a compiled trace, everything else (prefill, other caches, extra arguments) calls the
    model. Attributes not defined here are the model's, so mlx-lm's generation functions take it in
    the model's place."""

    _MAX_CONFIGS = 8

    def __init__(self, model: nn.Module):
        self.model = model
        self._warm: set = set()
        self._traces: dict[tuple, _Trace] = {}
        self._tracing: Optional[_Trace] = None
        self.replays = 0  # one-token steps that ran through a compiled trace (tests, benchmarks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["model"], name)

    def _config(self) -> tuple:
        """What a trace bakes in: the method, level and thresholds (the sparse state's config
        token), the kernel dispatch, the per-layer paths switch and the stream (a trace keeps the
        stream it was made on)."""
        state = getattr(self.model, "_chess", None)
        return (getattr(state, "config", None), G.backend(), D.enabled(),
                repr(mx.default_stream(mx.default_device())))

    def __call__(self, inputs: mx.array, cache=None, **kwargs) -> mx.array:
        if not (_ENABLED and not kwargs and inputs.shape == (1, 1) and _plain_caches(cache)):
            return self.model(inputs, cache=cache, **kwargs)
        key = self._config()
        if key not in self._warm:
            # Run eagerly once per configuration: the sparse layers build their one-token plans
            # (transposed weights, workspaces, cached constants) outside any trace, where they may
            # evaluate arrays; a trace then only reads them.
            self._warm.add(key)
            return self.model(inputs, cache=cache)
        return self._replay(self._trace(key, cache[0].keys.shape[2]), inputs, cache)

    def _trace(self, key: tuple, capacity: int) -> _Trace:
        t = self._traces.get(key)
        if t is None or (capacity not in t.shapes and len(t.shapes) >= _MAX_SHAPES):
            # New, or holding too many capacities: a fresh compiled function (the old one's tapes
            # go with it).
            if t is None and len(self._traces) >= self._MAX_CONFIGS:
                self._traces.pop(next(iter(self._traces)))
            spaces = [m._kernel_ws for m in self.model.modules() if hasattr(m, "_kernel_ws")]
            t = self._traces[key] = _Trace(self, spaces)
        t.shapes.add(capacity)
        return t

    def _step(self, inputs: mx.array, pos: mx.array, lasts: list, kv: list) -> tuple:
        """The traced body: the model on stand-in caches, with the workspaces' tokens and the
        recorded densities routed through inputs and outputs."""
        t = self._tracing
        caches = [_TracedKV(kv[i], kv[i + 1], pos) for i in range(0, len(kv), 2)]
        for w, last in zip(t.spaces, lasts):
            w.last = last
        state = getattr(self.model, "_chess", None)
        if state is None:
            logits, dens = self.model(inputs, cache=caches), {}
        else:
            with state.recorder.capturing() as dens:
                logits = self.model(inputs, cache=caches)
        t.dens_keys = list(dens)
        new_kv = [a for c in caches for a in (c.keys, c.values)]
        return logits, new_kv, [w.last for w in t.spaces], list(dens.values())

    def _replay(self, t: _Trace, inputs: mx.array, cache) -> mx.array:
        saved = [w.last for w in t.spaces]
        kv = [a for c in cache for a in (c.keys, c.values)]
        self._tracing = t
        try:
            logits, new_kv, lasts, dens = t.fn(inputs, mx.array([cache[0].offset], dtype=mx.int32), saved, kv)
        finally:
            # While tracing, the body stored tracers on the workspaces: put the real tokens back.
            self._tracing = None
            for w, last in zip(t.spaces, saved):
                w.last = last
        self.replays += 1
        del kv  # the old buffers: only the step references them now, so it may update them in place
        for i, c in enumerate(cache):
            c.keys, c.values = new_kv[2 * i], new_kv[2 * i + 1]
            c.offset += 1
        for w, last in zip(t.spaces, lasts):
            w.last = last
        state = getattr(self.model, "_chess", None)
        if state is not None and dens:
            state.recorder.record_call(dict(zip(t.dens_keys, dens)), 1)
        return logits


def decoder(model) -> Any:
    """The model's ``StepDecoder`` (made once and kept on the model), or the model itself when
    whole-step compilation is off or ``model`` already is a decoder."""
    if not _ENABLED or isinstance(model, StepDecoder):
        return model
    dec = getattr(model, "_step_decoder", None)
    if dec is None:
        dec = model._step_decoder = StepDecoder(model)
    return dec
