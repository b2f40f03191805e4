"""Decode speed, dense vs sparse methods, on a model of a real architecture's shape, or on a model
folder with its own thresholds.

A preset's weights are random (no checkpoint needed) and its thresholds are calibrated on random
tokens: speed depends on shapes and sparsity, not on what the weights mean. Decoding is what ``chess-mlx
generate`` and ``chat`` run: ``pipelined.generate_step`` (mlx-lm's KV cache and steps, graph
building and encoding on two threads; ``CHESS_MLX_PIPELINE=0``: mlx-lm's ``generate_step``),
greedy, with no EOS stop.
"""

from __future__ import annotations

import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import pipelined
from .calibrate import calibrate
from .generate import DECODE_PATHS, warm_up
from .methods import DENSE
from .sparse_layers import set_method, sparsify
from .stats import CallStats, TokenStats, summarize

PRESETS = {
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, rope_theta=10000.0),
}


def preset_weight_bytes(preset: str, layers: int | None, dtype, bits: int | None, group_size: int) -> int:
    """Bytes of a ``random_model``'s weights: what the benchmark must hold before it runs. Norm
    weights are left out (a few hundred KB); quantized matrices count their scales and biases
    (two half values per group), the embedding is quantized with them, as ``nn.quantize`` does."""
    c = PRESETS[preset]
    h, f, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], layers or c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    params = n * (2 * h * h + 2 * h * kv + 3 * h * f) + 2 * v * h
    per = bits / 8 + 4 / group_size if bits else dtype.size
    return int(params * per)


def preset_config(preset: str, layers: int | None = None) -> dict:
    """The mlx-lm Llama config of a preset: what ``random_model`` builds, and what a folder of
    that model (``benchmarks/random_folder.py``) writes as its config.json."""
    cfg = dict(PRESETS[preset], model_type="llama", rms_norm_eps=1e-5, tie_word_embeddings=False)
    if layers:
        cfg["num_hidden_layers"] = layers
    return cfg


def random_model(preset: str, layers: int | None = None, dtype=mx.float16, bits: int | None = None,
                 group_size: int = 64, seed: int = 0) -> nn.Module:
    from mlx_lm.models import llama

    model = llama.Model(llama.ModelArgs.from_dict(preset_config(preset, layers)))
    mx.random.seed(seed)
    new = []
    for name, p in tree_flatten(model.parameters()):
        if "norm" in name:
            new.append((name, mx.ones(p.shape, dtype=dtype)))
        else:
            new.append((name, (mx.random.normal(p.shape) * p.shape[-1] ** -0.5).astype(dtype)))
        mx.eval(new[-1][1])
    model.load_weights(new)
    if bits:
        nn.quantize(model, group_size=group_size, bits=bits)
    mx.eval(model.parameters())
    return model


@dataclass
class DecodeResult:
    method: str
    tokens_per_s: float
    runs: list[float]
    ffn_sparsity: float
    ahead_tokens_per_s: float = 0.0  # graph built ahead (``greedy_ahead``); 0 when not measured
    ahead_runs: list[float] = field(default_factory=list)
    attn_sparsity: float = 0.0  # of the thresholded attention inputs (q_proj, o_proj)
    bytes_fraction: float = 1.0  # weight bytes a token reads / dense: what the speed-up is bounded by
    setup_s: float = 0.0  # the method's one-time setup in this process (generate.warm_up: kernel compiles)


def bench_prompt(prompt_len: int, vocab: int, seed: int) -> mx.array:
    """The random prompt both decode timings start from (the same tokens for every method)."""
    return mx.random.randint(0, vocab, (prompt_len,), key=mx.random.key(seed))


def decode_speed(model: nn.Module, n_tokens: int = 128, prompt_len: int = 32, runs: int = 3,
                 vocab: int = 512, seed: int = 1, warmup: bool = True, prompt: mx.array | None = None) -> list[float]:
    """Tokens/s of greedy decode after a short prompt (``prompt``, else random ids), one number per
    run (after one untimed run that warms up kernels and allocations, unless ``warmup`` is False)."""
    prompt = bench_prompt(prompt_len, vocab, seed) if prompt is None else prompt
    out = []
    for _ in range(runs + int(warmup)):
        gen = pipelined.generate_step(prompt, model, max_tokens=n_tokens, sampler=lambda lp: mx.argmax(lp, axis=-1))
        next(gen)
        t0 = time.perf_counter()
        n = 0
        for _tok, _lp in gen:
            n += 1
        out.append(n / (time.perf_counter() - t0))
    return out[int(warmup):]


def greedy_ahead(model: nn.Module, prompt: mx.array, n_tokens: int) -> tuple[mx.array, float]:
    """Greedy decode of ``n_tokens`` after ``prompt`` (1-D token ids), with every step built as one
    lazy graph and then evaluated at once: (the first token after the prompt followed by the
    n_tokens decoded ones, seconds of that one evaluation). Each step's input is the argmax of the
    step before, so the GPU still runs the steps one after another. What the time leaves out is the
    Python graph building that ordinary decode does between tokens; MLX's own encoding still runs,
    overlapped with the GPU. So n_tokens / seconds is the decode speed of a host that keeps ahead
    of the GPU: on the lent H100 host ordinary decode is bound by host work (RESULTS.md), which
    hides what the kernels save."""
    from .kv_cache import make_cache

    cache = make_cache(model)
    tok = mx.argmax(model(prompt[None], cache=cache)[:, -1, :], axis=-1)
    mx.eval(tok)
    toks = [tok]
    for _ in range(n_tokens):
        tok = mx.argmax(model(tok[:, None], cache=cache)[:, -1, :], axis=-1)
        toks.append(tok)
    out = mx.concatenate(toks)
    mx.synchronize()
    t0 = time.perf_counter()
    mx.eval(out)
    mx.synchronize()
    return out, time.perf_counter() - t0


def ahead_speed(model: nn.Module, n_tokens: int, prompt_len: int = 32, vocab: int = 512, seed: int = 1,
                prompt: mx.array | None = None) -> float:
    """Tokens/s of one ``greedy_ahead`` run on the bench's prompt."""
    _, dt = greedy_ahead(model, bench_prompt(prompt_len, vocab, seed) if prompt is None else prompt, n_tokens)
    return n_tokens / dt


# The baseline as mlx-lm itself decodes: dense, with mlx-lm's attention, block and one-thread
# generate_step (chess-mlx's decode paths switched off). "dense" is the same model through
# chess-mlx's own decode path, the fair baseline for what sparsity adds.
MLX_LM = "mlx-lm"


def needs_thresholds(methods: list[str]) -> bool:
    """Whether any of ``methods`` is sparse (everything but dense and the mlx-lm baseline)."""
    return any(m not in (DENSE, MLX_LM) for m in methods)


@contextmanager
def _as_method(model: nn.Module, method: str, th, sparsity: float):
    """Set ``method`` on the model for a timing; ``MLX_LM`` is dense with chess-mlx's decode paths off."""
    plain = method == MLX_LM
    was = [m.enabled() for m in DECODE_PATHS]
    for m in DECODE_PATHS:
        m.enable(not plain and m.enabled())
    set_method(model, DENSE if plain else method, th, sparsity)
    try:
        yield
    finally:
        for m, on in zip(DECODE_PATHS, was):
            m.enable(on)


def random_thresholds(model: nn.Module, vocab: int, sparsity: float, calib_tokens: int = 1024):
    """Thresholds of a random model at ``sparsity``, calibrated on random token ids (its speed
    depends on shapes and sparsity, not on what its text means)."""
    tokens = mx.random.randint(0, vocab, (max(1, calib_tokens // 256), min(256, calib_tokens)), key=mx.random.key(7))
    return calibrate(model, tokens, [sparsity])


def run_bench(model: nn.Module, methods: list[str], sparsity: float, vocab: int, n_tokens: int = 128,
              runs: int = 3, calib_tokens: int = 1024, progress=None, ahead: int = 0, th=None,
              prompt: mx.array | None = None, prompt_len: int = 32) -> list[DecodeResult]:
    """Median tokens/s of each method, runs interleaved method by method; with ``ahead`` > 0 also
    the speed with the graph built ahead (``greedy_ahead`` of that many tokens) after each run.
    ``th``: a model folder's own thresholds; without them (a random model) they are calibrated on
    random tokens. ``prompt``: token ids of real text for a trained model, whose activations (and
    so sparsity) on random ids are not those of use; the FFN sparsity is then the mean over its tokens.
    Without it, every timing starts after ``prompt_len`` random ids (a long one: decode with a full
    KV cache, whose attention reads stay dense under every method)."""
    state = sparsify(model)
    if th is None and needs_thresholds(methods):
        th = random_thresholds(model, vocab, sparsity, calib_tokens)
    measured: dict[str, TokenStats] = {}
    setups: dict[str, float] = {}
    for m in methods:  # one-time setup, measured sparsity of one decode token, and a warm-up run, per method
        with _as_method(model, m, th, sparsity):
            setups[m] = warm_up(model)
            state.recorder.enabled = True
            # a text prompt's first tokens (unchunked, so not all of a long one)
            model(mx.random.randint(0, vocab, (1, 1), key=mx.random.key(3)) if prompt is None else prompt[None, :512])
            calls = state.recorder.pop()
            state.recorder.enabled = False
            measured[m] = summarize(calls[-1] if calls else CallStats.dense(state.recorder.n_layers), state.weight_bytes)
            decode_speed(model, n_tokens=n_tokens, runs=0, vocab=vocab, prompt=prompt, prompt_len=prompt_len)
            if ahead:
                ahead_speed(model, ahead, vocab=vocab, prompt=prompt, prompt_len=prompt_len)  # warm-up: a graph of this size once
    # Runs interleave the methods, so a slow spell of the (shared) host CPU hits all of them alike.
    speeds: dict[str, list[float]] = {m: [] for m in methods}
    aheads: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(runs):
        for m in methods:
            with _as_method(model, m, th, sparsity):
                speeds[m] += decode_speed(model, n_tokens=n_tokens, runs=1, vocab=vocab, warmup=False, prompt=prompt,
                                          prompt_len=prompt_len)
                if ahead:
                    aheads[m].append(ahead_speed(model, ahead, vocab=vocab, prompt=prompt, prompt_len=prompt_len))
    results = []
    for m in methods:
        st = measured[m]
        results.append(DecodeResult(m, statistics.median(speeds[m]), speeds[m], st.ffn_sparsity,
                                    statistics.median(aheads[m]) if aheads[m] else 0.0, aheads[m],
                                    st.attn_sparsity, st.bytes_fraction, setups[m]))
        if progress:
            progress(m, results[-1])
    set_method(model, DENSE)
    return results


def paired_ratios(results: list[DecodeResult], base: str = DENSE, ahead: bool = False) -> dict[str, float]:
    """Each method's speed over ``base`` as the median of run-by-run ratios (of the graph-ahead
    speeds if ``ahead``). Runs interleave the methods, so run i of every method saw the same spell
    of the shared host CPU; pairing them cancels what a slow spell does to all (single runs spread
    by 20-30% on the lent H100 host)."""
    ref = next((r for r in results if r.method == base), None)
    if ref is None:
        return {}
    key = (lambda r: r.ahead_runs) if ahead else (lambda r: r.runs)
    if not key(ref):
        return {}
    return {r.method: statistics.median(a / b for a, b in zip(key(r), key(ref))) for r in results}
