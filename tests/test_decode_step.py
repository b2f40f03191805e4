"""The compiled whole-step decoder (chess_mlx/decode_step.py) against the model called token by
token through mlx-lm's own KV cache: same tokens, same log-probabilities, same recorded densities,
for every method, across cache growth, trimming and multi-turn reuse."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import calibrate, set_method, sparsify
from chess_mlx import decode_step as DS
from chess_mlx.methods import METHODS
from tiny import tiny_model


def _greedy(model, prompt, n, cache=None):
    """(tokens, log-probs, densities per step) of mlx-lm's generate_step on ``model``."""
    from mlx_lm.generate import generate_step

    state = sparsify(model)
    state.recorder.clear()
    state.recorder.enabled = True
    toks, lps = [], []
    try:
        for tok, lp in generate_step(prompt, model, max_tokens=n, prompt_cache=cache,
                                     sampler=lambda lp: mx.argmax(lp, axis=-1)):
            toks.append(tok)
            lps.append(np.array(lp))
        calls = [c.density for c in state.recorder.pop() if c.n_tokens == 1]
    finally:
        state.recorder.enabled = False
    return toks, np.stack(lps), calls


@pytest.fixture(autouse=True)
def _on(monkeypatch):
    monkeypatch.setattr(DS, "_ENABLED", True)


@pytest.fixture(scope="module")
def calibrated():
    out = {}
    for model_type in ("llama", "qwen3"):
        model, cfg = tiny_model(model_type, 3)
        rng = np.random.default_rng(5)
        th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(3, 40))), [0.5])
        out[model_type] = model, cfg, th, mx.array(rng.integers(0, cfg["vocab_size"], size=(9,)))
    return out


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_steps_match_the_model_for_every_method(calibrated, model_type):
    model, cfg, th, prompt = calibrated[model_type]
    dec = DS.decoder(model)
    assert isinstance(dec, DS.StepDecoder) and DS.decoder(model) is dec and DS.decoder(dec) is dec
    for method in METHODS:
        set_method(model, method, th, 0.5)
        want, want_lp, want_d = _greedy(model, prompt, 12)
        before = dec.replays
        got, got_lp, got_d = _greedy(dec, prompt, 12)
        # 12 tokens = the prompt's last token + 11 one-token steps + 1 built ahead; the first
        # configuration's first step runs eagerly (warm-up), the rest replay a trace.
        assert dec.replays - before >= 10, method
        assert got == want, method
        np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5, err_msg=method)
        assert len(got_d) == len(want_d)
        for a, b in zip(got_d, want_d):
            np.testing.assert_allclose(a, b, atol=1e-7, err_msg=method)
        if method != "dense":
            assert (np.array(got_d) < 1).any()  # the traced steps really were sparse
    set_method(model, "dense")


def test_switching_methods_reuses_traces_and_never_mixes_them(calibrated):
    """A configuration's trace bakes in its thresholds: switching away and back replays it, and a
    different level or method gets its own (a stale CHESS trace under CATS would be wrong)."""
    model, cfg, th, prompt = calibrated["llama"]
    dec = DS.decoder(model)
    results = {}
    for method in ("chess", "cats", "chess", "teal", "cats"):
        set_method(model, method, th, 0.5)
        toks, lp, _ = _greedy(dec, prompt, 6)
        if method in results:
            assert toks == results[method][0]
            np.testing.assert_array_equal(lp, results[method][1])
        results[method] = toks, lp
    set_method(model, "chess", th, 0.5)
    key = dec._config()
    set_method(model, "cats", th, 0.5)
    assert dec._config() != key
    set_method(model, "chess", th, 0.5)
    assert dec._config() == key
    set_method(model, "dense")


def test_cache_growth_and_trimming(calibrated, monkeypatch):
    """Past the cache's capacity the step that grows it runs eagerly and the next traces the new
    size; a trimmed cache (stale entries past the offset) is masked, not read."""
    from mlx_lm.models.cache import KVCache, make_prompt_cache, trim_prompt_cache

    monkeypatch.setattr(KVCache, "step", 8)
    model, cfg, th, prompt = calibrated["llama"]
    set_method(model, "chess", th, 0.5)
    dec = DS.decoder(model)
    want, want_lp, _ = _greedy(model, prompt, 30)
    cache, before = make_prompt_cache(model), dec.replays
    got, got_lp, _ = _greedy(dec, prompt, 30, cache)
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)
    # 9 + 30 positions: capacities 16, 24, 32, 40; only the three growing steps (and at most one
    # warm-up) ran eagerly.
    assert cache[0].keys.shape[2] == 40 and dec.replays - before >= 30 - 4
    # Trim back into the middle of a filled cache and continue: stale keys must stay invisible.
    runs = []
    for m in (model, dec):
        cache = make_prompt_cache(model)
        _greedy(m, prompt, 20, cache)
        trim_prompt_cache(cache, 13)
        runs.append(_greedy(m, mx.array([5, 7, 11]), 10, cache))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_allclose(runs[1][1], runs[0][1], rtol=1e-5, atol=1e-5)
    set_method(model, "dense")


def test_switch_off_and_fallbacks(calibrated, monkeypatch):
    """CHESS_MLX_STEP_COMPILE=0 (enable(False)) and every case the trace cannot take call the model
    itself: several tokens (prefill), extra arguments, caches of another kind."""
    from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache

    model, cfg, th, prompt = calibrated["llama"]
    set_method(model, "dense")
    dec = DS.decoder(model)
    monkeypatch.setattr(DS, "_ENABLED", False)
    assert DS.decoder(model) is model
    before = dec.replays
    _greedy(dec, prompt, 5)
    assert dec.replays == before
    monkeypatch.setattr(DS, "_ENABLED", True)
    rot = [RotatingKVCache(max_size=64) for _ in model.layers]
    want = _greedy(model, prompt, 6, rot)
    rot = [RotatingKVCache(max_size=64) for _ in model.layers]
    got = _greedy(dec, prompt, 6, rot)
    assert dec.replays == before and got[0] == want[0]
    cache = make_prompt_cache(model)
    dec(prompt[None], cache=cache)  # prefill: the model itself
    assert dec.replays == before and cache[0].offset == prompt.size


def test_workspace_tokens_leave_the_trace(calibrated, monkeypatch):
    """The sparse-input kernels' ordering tokens travel through the compiled step: afterwards every
    workspace holds a real array (a tracer left behind would fail to evaluate) equal to the density
    of its call site's last launch. Kernels faked on the CPU by the reference product."""
    from chess_mlx import linear_ops as L
    from chess_mlx import sparse_gemv as G
    from chess_mlx import sparse_layers as SL
    from test_decode_paths import _FakeSpin

    class _ThresholdingSpin(_FakeSpin):  # the reference product of spin: threshold, then x @ W^T
        def __call__(self, inputs, output_shapes, output_dtypes, **kw):
            x, t = inputs[0], inputs[1]
            xs = x * (mx.abs(x) >= t).astype(x.dtype)
            return super().__call__([xs, *inputs[1:]], output_shapes, output_dtypes, **kw)

    model, cfg = tiny_model("llama", 4)
    rng = np.random.default_rng(2)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(2, 40))), [0.5])
    prompt = mx.array(rng.integers(0, cfg["vocab_size"], size=(6,)))
    set_method(model, "teal", th, 0.5)
    want, want_lp, want_d = _greedy(model, prompt, 8)
    fake = _ThresholdingSpin()
    monkeypatch.setattr(G, "_kernel", lambda kind, name: fake)
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    monkeypatch.setattr(G, "kernel_supports", lambda *a, **k: True)
    monkeypatch.setattr(SL, "compiled_path_ok", lambda x, *p: x.size == x.shape[-1])
    monkeypatch.setattr(L, "_use_kernels", lambda x, p: x.size == x.shape[-1])
    dec = DS.decoder(model)
    before = dec.replays
    got, got_lp, got_d = _greedy(dec, prompt, 8)
    assert dec.replays - before >= 6 and fake.after
    assert got == want
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-4, atol=1e-4)
    (spaces,) = {id(t.spaces): t.spaces for t in dec._traces.values() if t.spaces}.values()
    assert len(spaces) == 7 * len(model.layers)  # q,k,v,o + gate, up, down under TEAL
    last = got_d[-1]
    for layer in model.layers:
        for p, proj in [("q", layer.self_attn.q_proj), ("down", layer.mlp.down_proj)]:
            tok = proj._kernel_ws.last
            mx.eval(tok)
            assert tok.shape == (1,)
    np.testing.assert_allclose(
        model.layers[1].mlp.down_proj._kernel_ws.last.item(), last[1, 6], atol=1e-6)
    set_method(model, "dense")
