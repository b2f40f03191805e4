"""The two-thread decode (chess_mlx/pipelined.py) against mlx-lm's one-thread ``generate_step``:
the same tokens and log-probabilities for every method, prompt length and sampler, and the same
text through ``chess_mlx.generate`` as mlx-lm's ``stream_generate``."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import calibrate, pipelined, set_method, sparsify
from chess_mlx.generate import generate
from tiny import tiny_model


def _ref(model, prompt, n, sampler=None, prefill=2048):
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [(t, np.array(lp)) for t, lp in generate_step(prompt, model, max_tokens=n, sampler=sampler,
                                                          prompt_cache=cache, prefill_step_size=prefill)]
    return out, cache


def _ours(model, prompt, n, sampler=None, prefill=2048):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    out = [(t, np.array(lp)) for t, lp in pipelined.generate_step(prompt, model, max_tokens=n, sampler=sampler,
                                                                    prompt_cache=cache, prefill_step_size=prefill)]
    return out, cache


@pytest.fixture(scope="module")
def model_th():
    model, _ = tiny_model("llama", seed=11)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 256, (2, 64), key=mx.random.key(3)), [0.5])
    return model, th


@pytest.mark.parametrize("method", ["dense", "chess", "teal"])
@pytest.mark.parametrize("plen,n", [(1, 1), (5, 20), (40, 12)])
def test_same_tokens_and_logprobs_as_mlx_lm(model_th, method, plen, n, monkeypatch):
    model, th = model_th
    monkeypatch.setenv("CHESS_MLX_PIPELINE_DEPTH", str(1 + (plen // 5 + n) % 3))  # 2, 1 and 3 steps ahead
    set_method(model, method, None if method == "dense" else th, 0.5)
    prompt = mx.random.randint(0, 256, (plen,), key=mx.random.key(plen))
    ref, ref_cache = _ref(model, prompt, n, prefill=16)  # 40 tokens: three prefill chunks
    got, cache = _ours(model, prompt, n, prefill=16)
    assert [t for t, _ in got] == [t for t, _ in ref]
    for (_, a), (_, b) in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    assert cache[0].offset == ref_cache[0].offset


def test_sampling_draws_the_same_random_tokens(model_th):
    """The sampler runs as each step is built, in mlx-lm's order, so a seed gives the same draws."""
    from mlx_lm.sample_utils import make_sampler

    model, th = model_th
    set_method(model, "chess", th, 0.5)
    prompt = mx.array([3, 1, 4, 1, 5])
    mx.random.seed(42)
    ref, _ = _ref(model, prompt, 24, sampler=make_sampler(1.0))
    mx.random.seed(42)
    got, _ = _ours(model, prompt, 24, sampler=make_sampler(1.0))
    assert [t for t, _ in got] == [t for t, _ in ref]
    assert len(set(t for t, _ in got)) > 3  # really sampled, not greedy on a flat model


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_reply_closed_early_leaves_the_cache_as_mlx_lm_does(model_th, monkeypatch, depth):
    """Closed after 4 tokens, the cache holds what mlx-lm's holds (one step computed ahead), plus
    the further steps a deeper pipeline had built (``pipeline_depth``), which the chat trims."""
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import make_prompt_cache

    model, th = model_th
    set_method(model, "chess", th, 0.5)
    monkeypatch.setenv("CHESS_MLX_PIPELINE_DEPTH", str(depth))
    prompt = mx.array([7, 8, 9])
    caches = []
    for gen_fn in (generate_step, pipelined.generate_step):
        cache = make_prompt_cache(model)
        gen = gen_fn(prompt, model, max_tokens=50, prompt_cache=cache)
        toks = [next(gen)[0] for _ in range(4)]
        gen.close()
        caches.append((toks, cache[0].offset))
    assert caches[0][0] == caches[1][0] and caches[1][1] == caches[0][1] + depth - 1
    # and the model is usable again at once: a fresh decode gives the reference tokens
    got, _ = _ours(model, prompt, 6)
    ref, _ = _ref(model, prompt, 6)
    assert [t for t, _ in got] == [t for t, _ in ref]


def test_generate_gives_mlx_lm_text_and_tokens(tiny_dir):
    from mlx_lm import load, stream_generate

    model, tok = load(str(tiny_dir))
    prompt = "The quick brown fox"
    want = list(stream_generate(model, tok, prompt, max_tokens=16))
    g = generate(model, tok, prompt, max_tokens=16)
    assert g.text == "".join(r.text for r in want)
    assert g.tokens == [r.token for r in want][:len(g.tokens)]
    assert g.prompt_tokens == want[-1].prompt_tokens


def test_encoder_hands_errors_to_the_caller(monkeypatch):
    def fails(*arrays):
        raise RuntimeError("encoding failed")

    with monkeypatch.context() as m:
        m.setattr(mx, "async_eval", fails)
        with pytest.raises(RuntimeError, match="encoding failed"):
            pipelined.schedule(mx.array(1.0)).result(timeout=30)
    with mx.stream(pipelined.decode_stream()):  # the encoder may evaluate only that stream
        a = mx.array(1.0) + 1
    assert pipelined.schedule(a).result(timeout=30) is None  # still serving after an error
    assert a.item() == 2.0
    enc = pipelined.encoder()
    assert pipelined.encoder() is enc and enc.thread.daemon


def test_switched_off_it_is_mlx_lm(model_th, monkeypatch):
    model, _ = model_th
    set_method(model, "dense")
    calls = []
    import importlib

    G = importlib.import_module("mlx_lm.generate")
    real = G.generate_step
    monkeypatch.setattr(G, "generate_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    pipelined.enable(False)
    try:
        got, _ = _ours(model, mx.array([1, 2]), 5)
    finally:
        pipelined.enable(True)
    assert calls and len(got) == 5


@pytest.mark.parametrize("plen", [1, 2, 5])
@pytest.mark.parametrize("two_threads", [True, False])
def test_each_token_carries_the_stats_of_its_own_step(model_th, monkeypatch, plen, two_threads):
    """Token n's stats are those of the one-token step that produced it, also after a 2-token
    prompt, whose single prefill chunk is one token long too; prompt chunks count by number."""
    import tempfile
    from pathlib import Path

    from mlx_lm.models.cache import make_prompt_cache
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from mlx_lm.utils import load_tokenizer

    from chess_mlx import generate as GEN
    from chess_mlx.stats import summarize
    from tiny import byte_tokenizer_files

    model, th = model_th
    state = set_method(model, "chess", th, 0.5)
    prompt = mx.random.randint(0, 256, (plen,), key=mx.random.key(20 + plen))
    # the reference: the same steps by hand, the densities of each one-token step
    rec = state.recorder
    rec.clear()
    rec.enabled = True
    cache = make_prompt_cache(model)
    if plen > 1:
        model(prompt[None, :-1], cache=cache)
        rec.pop()
    want, tok = [], prompt[-1:]
    for _ in range(4):
        logits = model(tok[None], cache=cache)[:, -1]
        want.append(summarize(rec.pop()[-1], state.weight_bytes).ffn_sparsity)
        tok = mx.argmax(logits, axis=-1)
    rec.enabled = False
    rec.clear()

    with tempfile.TemporaryDirectory() as d:
        byte_tokenizer_files(Path(d))
        tokenizer = load_tokenizer(Path(d))
    assert isinstance(tokenizer, TokenizerWrapper)
    monkeypatch.setattr(pipelined, "enabled", lambda: two_threads)
    for depth in (1, 2, 3) if two_threads else (1,):  # steps built ahead: the recorder holds more
        monkeypatch.setenv("CHESS_MLX_PIPELINE_DEPTH", str(depth))
        got = [s.stats.ffn_sparsity for s in GEN.stream(model, tokenizer, prompt, max_tokens=4)]
        assert len(got) == 4
        np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"depth {depth}")
    assert len(set(np.round(want, 6))) > 1  # the steps' densities differ, so a shift would show
