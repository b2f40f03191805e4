"""Decode with graph building and MLX's encoding on two threads.

Why: on a fast GPU a decode token is bound by host work. ``mlx_lm.generate_step`` builds token
n+1's graph in Python and then lets MLX encode it, one after the other on one thread. Together
they take longer than CHESS's GPU time for the token (benchmarks/RESULTS.md, sessions 13-14).
``mx.async_eval`` releases the GIL while MLX encodes, so here the calling thread builds token n+1
while one lasting encoder thread encodes token n. A token then costs the longer of the two, not
their sum.

The graphs live on a stream from ``mx.new_thread_unsafe_stream``: one that may be evaluated on
another thread. Only the encoder evaluates the decode steps, in the order they were built, and the
calling thread reads a token only after the encoder has scheduled it, so nothing is evaluated
twice or out of order. The tokens are exactly those of the same steps on one thread (the probe
and the CPU tests check this). ``CHESS_MLX_PIPELINE=0`` falls back to mlx-lm's ``generate_step``.
"""

from __future__ import annotations

import sys
import threading
from concurrent.futures import Future
from functools import partial
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .mlx_thread import MLXThread
from .switches import env_switch

enabled, enable = env_switch("CHESS_MLX_PIPELINE", "the two-thread decode (off: mlx-lm's one-thread generate_step)")


_ENCODER: Optional[MLXThread] = None
_STREAMS: dict = {}
_LOCK = threading.Lock()


# Python hands the GIL to a waiting thread only every switch interval (5 ms by default): the
# encoder, back from MLX, would wait that long for the builder to let go, longer than a token.
SWITCH_INTERVAL_S = 2e-4


def encoder() -> MLXThread:
    """The process's encoder thread (lasting: see ``mlx_thread``), made on first use; from then on
    the interpreter switches threads every ``SWITCH_INTERVAL_S`` at most."""
    global _ENCODER
    with _LOCK:
        if _ENCODER is None:
            sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
            _ENCODER = MLXThread("chess-mlx-encoder")
        return _ENCODER


def schedule(*arrays: mx.array) -> Future:
    """``mx.async_eval(*arrays)`` on the encoder thread; the future completes once they are
    encoded (their values may still be on their way from the GPU), or carries its error."""
    return encoder().submit(partial(mx.async_eval, *arrays))


def decode_stream() -> mx.Stream:
    """The stream decode steps are built on, one per device: any thread may evaluate it."""
    dev = mx.default_device()
    key = repr(dev)
    with _LOCK:
        s = _STREAMS.get(key)
        if s is None:
            s = _STREAMS[key] = mx.new_thread_unsafe_stream(dev)
        return s


def _greedy(logprobs: mx.array) -> mx.array:
    return mx.argmax(logprobs, axis=-1)


def generate_step(prompt: mx.array, model: nn.Module, *, max_tokens: int = 256,
                  sampler: Optional[Callable[[mx.array], mx.array]] = None, prompt_cache: Optional[list] = None,
                  prefill_step_size: int = 2048,
                  also: Optional[Callable[[], list]] = None) -> Iterator[tuple[int, mx.array]]:
    """``mlx_lm.generate.generate_step`` with the same arguments, steps and tokens, (token,
    log-probabilities) per step, the first one from the prompt, but with each step's encoding on
    the encoder thread while the next step is built here.

    ``also()`` is called after each prompt chunk and each step is built, and returns lazy arrays
    of it to evaluate or schedule with it (the recorder's densities). Anything of the decode
    stream left lazy and evaluated later on this thread would be encoded here while the encoder
    encodes on the same stream, which corrupts MLX's CUDA graph (seen on the H100:
    ``cudaGraphAddDependencies ... invalid argument``)."""
    from mlx_lm.models.cache import make_prompt_cache

    if not enabled():
        from mlx_lm.generate import generate_step as one_thread
        from mlx_lm.generate import generation_stream

        try:
            yield from one_thread(prompt, model, max_tokens=max_tokens, sampler=sampler, prompt_cache=prompt_cache,
                                  prefill_step_size=prefill_step_size)
        finally:
            # A stopped reply leaves mlx-lm's prefetched step in flight on its stream; an interpreter
            # exiting while that stream still works can abort ("terminate called without an active
            # exception", seen when quitting chat mid-reply).
            mx.synchronize(generation_stream)
        return
    from .sparse_layers import settle

    settle(model)
    sampler = sampler or _greedy
    also = also or tuple
    cache = prompt_cache if prompt_cache is not None else make_prompt_cache(model)
    stream = decode_stream()

    def step(tokens: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """(token, log-probabilities, the token as the next step's input). The input is its own
        array: this thread reads the token (``item``, which waits on and clears its completion
        event) while the encoder evaluates the next step, and MLX's eval reads the event of every
        input scheduled earlier; the two met on the token (segfaults in ``Event::is_signaled`` on
        the CPU, RESULTS.md session 16 §5)."""
        logits = model(tokens, cache=cache)[:, -1, :]
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        y = sampler(logprobs)
        return y, logprobs.squeeze(0), y[None]

    with mx.stream(stream):  # the prompt, on this thread (the encoder is idle)
        while prompt.size > 1:
            n = min(prefill_step_size, prompt.size - 1)
            model(prompt[:n][None], cache=cache)
            # ``also()`` here is the chunk's own densities: evaluated now, while the encoder is idle,
            # a later read on this thread cannot encode beside it.
            mx.eval([c.state for c in cache], *also())
            prompt = prompt[n:]
            mx.clear_cache()
        y, logprobs, y_in = step(prompt[None])
    mx.async_eval(y, logprobs, y_in, *also())
    scheduled: Optional[Future] = None  # y's encoding, once the encoder has it
    ahead: Optional[Future] = None  # the next step's encoding
    n = 0
    try:
        while True:
            ahead = None
            if n != max_tokens:
                with mx.stream(stream):
                    next_y, next_logprobs, next_in = step(y_in)
                ahead = schedule(next_y, next_logprobs, next_in, *also())
            if scheduled is not None:
                scheduled.result()  # read y only once the encoder has scheduled it
            if n == max_tokens:
                break
            yield y.item(), logprobs
            if n % 256 == 0 and ahead is not None:
                ahead.result()  # the encoder idle: the allocator's cache may be cleared
                mx.clear_cache()
            y, logprobs, y_in, scheduled = next_y, next_logprobs, next_in, ahead
            n += 1
    finally:
        for f in (scheduled, ahead):  # a stopped reply leaves a step in flight: let it land
            if f is not None:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - the reply is over; its error is moot
                    pass
        mx.synchronize(stream)
