"""Decode with graph building and MLX's encoding on two threads.

Why: on a fast GPU a decode token is bound by host work. ``mlx_lm.generate_step`` builds token
n+1's graph in Python and then lets MLX encode it, one after the other on one thread. Together
they take longer than CHESS's GPU time for the token (benchmarks/RESULTS.md, sessions 13-14).
``mx.async_eval`` releases the GIL while MLX encodes, so here the calling thread builds the next
steps while one lasting encoder thread encodes the earlier ones, ``pipeline_depth`` steps ahead of
the token being read. A token then costs the longest of building, encoding and its GPU time, not
their sum.

The graphs live on a stream from ``mx.new_thread_unsafe_stream``: one that may be evaluated on
another thread. Only the encoder evaluates the decode steps, in the order they were built, and the
calling thread reads a token only after the encoder has scheduled it, so nothing is evaluated
twice or out of order. The tokens are exactly those of the same steps on one thread (the probe
and the CPU tests check this). ``CHESS_MLX_PIPELINE=0`` falls back to mlx-lm's ``generate_step``.
"""

from __future__ import annotations

import os
import sys
import threading
from collections import deque
from concurrent.futures import Future
from functools import partial
from typing import Callable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .errors import ChessError
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


def pipeline_depth() -> int:
    """Decode steps built and scheduled ahead of the token being read (``CHESS_MLX_PIPELINE_DEPTH``,
    default 2; 1 is mlx-lm's one step ahead). Why 2: with one step ahead, the next step's graph is
    built only once the current token is read, so building and then encoding it lie on the GPU's
    critical path; on the lent H100 host they took ~2.5 + ~3 ms a token against 4.5 ms of GPU time
    under CHESS+attention (benchmarks/RESULTS.md, session 21). Two ahead, the GPU always has a
    whole step queued. The cost: a reply stopped early (EOS) has computed one more step, which the
    chat trims from its cache (``chat_session``)."""
    text = os.environ.get("CHESS_MLX_PIPELINE_DEPTH", "2")
    try:
        depth = int(text)
    except ValueError:
        depth = 0
    if depth < 1:  # refused, not replaced: a mistyped debug setting would otherwise time the wrong thing
        raise ChessError(f"CHESS_MLX_PIPELINE_DEPTH must be a whole number of steps >= 1, got {text!r}")
    return depth


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
    from .kv_cache import make_cache

    if not enabled():
        from mlx_lm.generate import generate_step as one_thread
        from mlx_lm.generate import generation_stream

        try:
            yield from one_thread(prompt, model, max_tokens=max_tokens, sampler=sampler,
                                  prompt_cache=prompt_cache if prompt_cache is not None else make_cache(model),
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
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
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
    # Steps built and not yet handed out, oldest first: (token, log-probabilities, the encoder's
    # future; None for the prompt's step, scheduled here). ``depth`` steps stay built ahead of the
    # token being read, never more than max_tokens in all.
    queue: deque = deque([(y, logprobs, None)])
    last_in, built, n = y_in, 1, 0
    depth = pipeline_depth()
    try:
        while True:
            while len(queue) <= depth and built <= max_tokens:
                with mx.stream(stream):
                    next_y, next_logprobs, last_in = step(last_in)
                queue.append((next_y, next_logprobs, schedule(next_y, next_logprobs, last_in, *also())))
                built += 1
            if n == max_tokens:
                break
            # Read y only once the encoder has scheduled it, and every step but the newest too: a
            # reader of ``also()``'s arrays (the recorder) takes every step but the one in progress.
            for _y, _lp, f in list(queue)[:-1] if len(queue) > 1 else queue:
                if f is not None:
                    f.result()
            y, logprobs, _f = queue.popleft()
            yield y.item(), logprobs
            n += 1
            if n % 256 == 1:
                for _y, _lp, f in queue:  # the encoder idle: the allocator's cache may be cleared
                    if f is not None:
                        f.result()
                mx.clear_cache()
    finally:
        for _y, _lp, f in queue:  # a stopped reply leaves steps in flight: let them land
            if f is not None:
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - the reply is over; its error is moot
                    pass
        mx.synchronize(stream)
