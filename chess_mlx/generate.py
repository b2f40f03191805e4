"""Generation with the sparsity of every step attached: mlx-lm's ``stream_generate`` loop (its
tokenizer wrapper, detokenizer and EOS handling), over ``pipelined.generate_step``.

The decode builds steps ahead of the token it hands out (``pipelined.pipeline_depth``), so the
recorder may hold calls ahead.
The recorded calls are, in order, the prompt's chunks (all of the prompt but its last token, in
chunks of ``PREFILL_STEP``) and then one call per token, which is how they are matched.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import mlx.core as mx
import mlx.nn as nn

from . import block_step, fused_attention, pipelined
from .sparse_layers import sparsify
from .stats import CallStats, TokenStats, merge, summarize

PREFILL_STEP = 2048  # prompt tokens per prefill call (mlx-lm's default)
# chess-mlx's decode paths, each switchable (``enable``); all off is dense as mlx-lm decodes it
DECODE_PATHS = (pipelined, fused_attention, block_step)


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
    ttft: float  # seconds from the call to the first token, after any one-time setup
    peak_memory_gb: float
    finish_reason: Optional[str]
    active_memory_gb: float = 0.0
    setup_s: float = 0.0  # one-time setup this call ran before its TTFT clock started (warm_up)


def _token_ids(tokenizer, prompt) -> mx.array:
    """A prompt as token ids: text is encoded (with the BOS token unless it already starts with it)."""
    if isinstance(prompt, mx.array):
        return prompt
    if isinstance(prompt, str):
        bos = getattr(tokenizer, "bos_token", None)
        prompt = tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos))
    return mx.array(prompt)


WARM_PROMPT, WARM_STEPS = 8, 3  # a multi-token prefill chunk, and decode steps past the pipeline's depth


def _warm_key(model: nn.Module) -> tuple:
    """What a one-time setup belongs to: the method, and which of chess-mlx's decode paths are on
    (``bench``'s mlx-lm row is dense with them off; it compiles other things than dense)."""
    return (sparsify(model).method, *(m.enabled() for m in DECODE_PATHS))


def needs_warm_up(model: nn.Module) -> bool:
    """Whether the model's current method has not run in this process yet (``warm_up`` would run it)."""
    return _warm_key(model) not in sparsify(model).warm


def warm_up(model: nn.Module) -> float:
    """Run the model's current method once on a throwaway cache, unless it already ran in this
    process; returns the seconds it took (0 when it had run).

    Why: a fresh process compiles each custom kernel at its first launch (NVRTC on CUDA, about
    1.5 s a kernel on an H100, and MLX keeps no copy across processes: about 3 s for CHESS and
    6 s for CHESS+attn on a Llama-3-8B model, RESULTS.md session 33), and builds the kernels' transposed
    weights and MLX's compiled paths. Inside a reply that would read as time to first token; here
    it is done once, timed, and reported as setup."""
    if not needs_warm_up(model):
        return 0.0
    state = sparsify(model)
    rec = state.recorder
    was = rec.enabled
    rec.enabled = False
    t0 = time.perf_counter()
    try:
        gen = pipelined.generate_step(mx.zeros((WARM_PROMPT,), dtype=mx.int32), model, max_tokens=WARM_STEPS)
        for _ in gen:  # greedy, the default sampler
            pass
        mx.synchronize()
    finally:
        rec.enabled = was
        rec.clear()
    state.warm.add(_warm_key(model))
    return time.perf_counter() - t0


def stream(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, sampler=None,
           prompt_cache: Optional[list] = None) -> Iterator[Step]:
    """Yield a ``Step`` per token, as mlx-lm's ``stream_generate`` yields its responses (the last
    one carries the finish reason, and the EOS token when it stopped there), with the decode
    steps on two threads (``pipelined``)."""
    from mlx_lm.generate import wired_limit
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    if max_tokens < 1:
        raise ValueError("max_tokens must be at least 1")
    if not isinstance(tokenizer, TokenizerWrapper):
        tokenizer = TokenizerWrapper(tokenizer)
    prompt = _token_ids(tokenizer, prompt)
    eos = tokenizer.eos_token_ids
    detok = tokenizer.detokenizer
    detok.reset()
    state = sparsify(model)
    setup = warm_up(model)
    rec, wb = state.recorder, state.weight_bytes
    rec.clear()
    rec.enabled = True
    decode: deque[CallStats] = deque()
    start = time.perf_counter()
    ttft = prompt_tps = 0.0
    gen = pipelined.generate_step(prompt, model, max_tokens=max_tokens, sampler=sampler, prompt_cache=prompt_cache,
                                  prefill_step_size=PREFILL_STEP, also=rec.current)
    # the prompt's chunks come first; by count, not by size (a 2-token prompt's chunk is 1 token)
    chunks = [-(-(prompt.size - 1) // PREFILL_STEP)]

    def step(token: int, n: int, finish: Optional[str]) -> Step:
        for c in rec.pop(closed_only=True):
            if chunks[0]:
                chunks[0] -= 1
            else:
                decode.append(c)
        call = decode.popleft() if decode else CallStats.dense(wb.per_proj.shape[0])
        return Step(text=detok.last_segment, token=token, stats=summarize(call, wb), prompt_tokens=prompt.size,
                    prompt_tps=prompt_tps, generation_tokens=n + 1,
                    generation_tps=(n + 1) / max(time.perf_counter() - tic, 1e-9), ttft=ttft,
                    peak_memory_gb=mx.get_peak_memory() / 1e9, finish_reason=finish,
                    active_memory_gb=mx.get_active_memory() / 1e9, setup_s=setup)

    try:
        with wired_limit(model, [pipelined.decode_stream()]):
            token = None
            for n, (token, _lp) in enumerate(gen):
                if n == 0:
                    ttft = time.perf_counter() - start
                    prompt_tps = prompt.size / ttft
                    tic = time.perf_counter()
                if token in eos:
                    break
                detok.add_token(token)
                if n + 1 == max_tokens:
                    break
                yield step(token, n, None)
            detok.finalize()
            yield step(token, n, "stop" if token in eos else "length")
    finally:
        gen.close()  # waits for a step still in flight (a reply stopped early)
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
    setup_s: float = 0.0


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
        setup_s=last.setup_s,
    )


def generate(model: nn.Module, tokenizer, prompt, max_tokens: int = 256, on_text=None, **kwargs) -> Generation:
    """Run ``stream`` to the end; ``on_text(segment)`` is called as text arrives."""
    steps = stream(model, tokenizer, prompt, max_tokens=max_tokens, **kwargs)
    return from_steps(steps, sparsify(model).weight_bytes, on_text)


def _setup(seconds: float) -> str:
    """The one-time setup beside TTFT, only in the reply that ran it."""
    return f" (after {seconds:.2f} s one-time setup)" if seconds > 0 else ""


def format_stats(g: Generation, method: str, sparsity: float | None) -> str:
    level = f"@{sparsity:g}" if sparsity is not None else ""
    s = g.stats
    return (
        f"[{method}{level}] prompt {g.prompt_tokens} tok {g.prompt_tps:.1f} tok/s | "
        f"gen {g.steps} tok {g.generation_tps:.1f} tok/s | TTFT {g.ttft:.2f} s{_setup(g.setup_s)} | "
        f"FFN sparsity {s.ffn_sparsity:.1%} | attn sparsity {s.attn_sparsity:.1%} | "
        f"weights/token {s.bytes_fraction:.1%} of dense | peak mem {g.peak_memory_gb:.2f} GB"
    )
