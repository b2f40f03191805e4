"""The whole-step compiled decode (chess_mlx/compiled_step.py) against the model op by op.

Its fixed-size KV buffer, array offset and attention mask must give the logits of mlx-lm's own
cache path, the sparse layers must record the same densities through the trace, a method switch
must retrace, and every call it does not handle must reach the model unchanged."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import calibrate, compiled_step, set_method, sparsify
from chess_mlx.methods import METHODS
from tiny import tiny_model


@pytest.fixture
def step_on():
    was = compiled_step.enabled()
    compiled_step.enable(True)
    yield
    compiled_step.enable(was)


def _run(fwd, model, prompt, tokens):
    """Teacher-forced one-token steps after ``prompt``: logits and recorded densities per step."""
    from mlx_lm.models.cache import make_prompt_cache

    state = sparsify(model)
    cache = make_prompt_cache(model)
    fwd(prompt[None], cache=cache)
    logits, dens = [], []
    state.recorder.enabled = True
    for t in tokens:
        state.recorder.clear()
        logits.append(np.array(fwd(mx.array([[t]]), cache=cache)[0, -1]))
        calls = state.recorder.pop()
        dens.append(calls[-1].density if calls else None)
    state.recorder.enabled = False
    return np.stack(logits), dens, cache


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_compiled_step_matches_the_model_for_every_method(step_on, family):
    model, _ = tiny_model(family, seed=3)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 256, (2, 64), key=mx.random.key(1)), [0.5])
    prompt = mx.random.randint(0, 256, (250,), key=mx.random.key(2))  # decode crosses the 256 block
    tokens = [int(t) for t in np.random.default_rng(0).integers(0, 256, 12)]
    step = compiled_step.wrap(model, cpu=True)
    assert step is not model
    for method in METHODS:  # one model, methods in turn: each switch must retrace
        set_method(model, method, th if method != "dense" else None, 0.5)
        ref, ref_d, ref_cache = _run(model, model, prompt, tokens)
        got, got_d, cache = _run(step, model, prompt, tokens)
        assert cache[0].offset == ref_cache[0].offset == 262
        assert cache[0].keys.shape[2] == 512  # grown by the compiled step itself
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=method)
        for a, b in zip(ref_d, got_d):
            if method == "dense":
                assert a is None and b is None
            else:
                np.testing.assert_array_equal(a, b)
        off = ref_cache[0].offset
        np.testing.assert_allclose(np.array(cache[1].keys[..., :off, :]), np.array(ref_cache[1].keys[..., :off, :]),
                                   rtol=1e-5, atol=1e-6)


def test_trimmed_cache_continues_like_the_model(step_on):
    """The chat trims the cache to a shared prefix and feeds on: masked positions past the offset
    must not leak into attention."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    model, _ = tiny_model("llama", seed=4)
    step = compiled_step.wrap(model, cpu=True)
    prompt = mx.random.randint(0, 256, (1, 20), key=mx.random.key(5))
    ca, cb = make_prompt_cache(model), make_prompt_cache(model)
    model(prompt, cache=ca)
    step(prompt, cache=cb)
    for t in (5, 6, 7, 8):
        step(mx.array([[t]]), cache=cb)
    trim_prompt_cache(cb, 4)  # the buffer past offset still holds the four trimmed tokens
    for t in (9, 10, 11):
        a = model(mx.array([[t]]), cache=ca)
        b = step(mx.array([[t]]), cache=cb)
        np.testing.assert_allclose(np.array(b), np.array(a), rtol=1e-5, atol=1e-5)


def test_calls_it_does_not_handle_reach_the_model(step_on):
    from mlx_lm.models.cache import QuantizedKVCache, make_prompt_cache

    model, _ = tiny_model("llama", seed=5)
    step = compiled_step.wrap(model, cpu=True)
    run = step._run
    cache = make_prompt_cache(model)
    assert not run.applies(mx.array([[1]]), cache)  # empty cache: nothing to attend over yet
    step(mx.array([[1, 2, 3]]), cache=cache)
    assert run.applies(mx.array([[4]]), cache)
    assert not run.applies(mx.array([[4, 5]]), cache)  # several tokens: prefill
    assert not run.applies(mx.array([[4]]), [QuantizedKVCache() for _ in cache])
    assert not compiled_step.wrap(model, cpu=False)._run.applies(mx.array([[4]]), cache)  # CPU: only if asked
    assert not run.compiled  # nothing traced by these checks
    compiled_step.enable(False)
    assert compiled_step.wrap(model) is model
