"""Generation through mlx-lm's ``stream_generate``, with the sparsity of every step attached.

mlx-lm builds step n+1 before it hands out token n, so the recorder may hold a call ahead; the
steps that produce tokens are the one-token calls, in order, which is how they are matched.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from .sparse_layers import sparsify
from .stats import CallStats, TokenStats, merge, summarize


@dataclass
class Step:
    """One generated text segment with everything the UI shows about it."""

    text: str
    token: int
    stats: TokenStats
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    ttft: float  # seconds from the call to the first token
    peak_memory_gb: float
    finish_reason: Optional[str]
    active_memory_gb: float = 0.0


def stream(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> Iterator[Step]:
    """Yield a ``Step`` per token. ``kwargs`` go to ``mlx_lm.stream_generate`` (sampler, prompt_cache...)."""
    from mlx_lm.generate import generation_stream, stream_generate

    state = sparsify(model)
    rec, wb = state.recorder, state.weight_bytes
    rec.clear()
    rec.enabled = True
    decode: deque[CallStats] = deque()
    start = time.perf_counter()
    ttft = None
    gen = stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    try:
        for resp in gen:
            if ttft is None:
                ttft = time.perf_counter() - start
            decode.extend(c for c in rec.pop() if c.n_tokens == 1)
            call = decode.popleft() if decode else CallStats.dense(wb.per_proj.shape[0])
            yield Step(
                text=resp.text,
                token=int(resp.token),
                stats=summarize(call, wb),
                prompt_tokens=resp.prompt_tokens,
                prompt_tps=resp.prompt_tps,
                generation_tokens=resp.generation_tokens,
                generation_tps=resp.generation_tps,
                ttft=ttft,
                peak_memory_gb=resp.peak_memory,
                finish_reason=resp.finish_reason,
                active_memory_gb=mx.get_active_memory() / 1e9,
            )
    finally:
        # A reply stopped early leaves mlx-lm's prefetched next token in flight on its generation
        # stream; an interpreter exiting while that stream's thread still works aborts Python
        # ("terminate called without an active exception", seen when quitting chat mid-reply).
        gen.close()
        mx.synchronize(generation_stream)
        rec.enabled = False
        rec.clear()


@dataclass
class Generation:
    text: str
    tokens: list[int]
    steps: int
    stats: TokenStats  # token-weighted mean over the generated tokens
    prompt_tokens: int
    prompt_tps: float
    generation_tps: float
    ttft: float
    peak_memory_gb: float


def from_steps(steps: Iterable[Step], wb, on_text=None) -> Generation:
    """Aggregate a stream of ``Step``s into one ``Generation``; ``on_text(segment)`` is called as
    text arrives."""
    texts, tokens, calls, last = [], [], [], None
    for step in steps:
        texts.append(step.text)
        tokens.append(step.token)
        calls.append(CallStats(step.stats.density, 1))
        if on_text is not None and step.text:
            on_text(step.text)
        last = step
    if last is None:
        raise RuntimeError("generation produced no step")
    # The final step of an EOS-terminated stream carries the EOS token, which is not text.
    if last.finish_reason == "stop":
        tokens = tokens[:-1]
    return Generation(
        text="".join(texts),
        tokens=tokens,
        steps=last.generation_tokens,
        stats=summarize(merge(calls), wb),
        prompt_tokens=last.prompt_tokens,
        prompt_tps=last.prompt_tps,
        generation_tps=last.generation_tps,
        ttft=last.ttft,
        peak_memory_gb=last.peak_memory_gb,
    )


def generate(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, on_text=None, **kwargs) -> Generation:
    """Run ``stream`` to the end; ``on_text(segment)`` is called as text arrives."""
    steps = stream(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    return from_steps(steps, sparsify(model).weight_bytes, on_text)


def format_stats(g: Generation, method: str, sparsity: float | None) -> str:
    level = f"@{sparsity:g}" if sparsity is not None else ""
    s = g.stats
    return (
        f"[{method}{level}] prompt {g.prompt_tokens} tok {g.prompt_tps:.1f} tok/s | "
        f"gen {g.steps} tok {g.generation_tps:.1f} tok/s | TTFT {g.ttft:.2f} s | "
        f"FFN sparsity {s.ffn_sparsity:.1%} | attn sparsity {s.attn_sparsity:.1%} | "
        f"weights/token {s.bytes_fraction:.1%} of dense | peak mem {g.peak_memory_gb:.2f} GB"
    )
