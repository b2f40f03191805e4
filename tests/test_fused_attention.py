"""The fused one-token attention (chess_mlx/fused_attention.py) and the compiled one-token block
(chess_mlx/block_step.py) against mlx-lm's attention and block: the same logits for every method
and family, parameters that stay views of one block (no extra memory), and prefill and
calibration left on mlx-lm's code."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from chess_mlx import block_step, calibrate, fused_attention, set_method, sparsify
from tiny import memory_growth_of_first_step, tiny_model

FAMILIES = [("llama", {}), ("qwen2", {}), ("qwen3", {}), ("llama", {"attention_bias": True})]


def _decode_logits(model, prompt, n):
    """Teacher-forced one-token steps after a prefill: logits of every step, in float64."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(prompt[None, :-1], cache=cache)
    out, tok = [], prompt[-1:]
    for i in range(n):
        logits = model(tok[None], cache=cache)[0, -1]
        out.append(np.array(logits, dtype=np.float64))
        tok = mx.array([(7 * i + 3) % 256])
    return np.stack(out)


def _with_mlx_lm_attention(run):
    """``run()`` with the fused attention (and so the compiled block) off: mlx-lm's own code, the
    reference every test here compares with."""
    fused_attention.enable(False)
    try:
        return run()
    finally:
        fused_attention.enable(True)


@pytest.fixture(scope="module", params=FAMILIES, ids=lambda f: f[0] + ("-bias" if f[1] else ""))
def model_th(request):
    family, over = request.param
    model, _ = tiny_model(family, seed=5, **over)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 256, (2, 48), key=mx.random.key(1)), [0.5])
    return model, th


@pytest.mark.parametrize("block", [False, True], ids=["attention", "block"])
@pytest.mark.parametrize("method", ["dense", "cats", "chess", "chess-attn", "teal"])
def test_same_logits_as_mlx_lm_attention(model_th, method, block):
    model, th = model_th
    set_method(model, method, None if method == "dense" else th, 0.5)
    prompt = mx.random.randint(0, 256, (9,), key=mx.random.key(2))
    ref = _with_mlx_lm_attention(lambda: _decode_logits(model, prompt, 6))
    block_step.enable(block)
    try:
        got = _decode_logits(model, prompt, 6)
    finally:
        block_step.enable(True)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    layer = model.model.layers[0]
    assert type(layer.self_attn).__name__.startswith("Fused") and type(layer).__name__.startswith("Stepped")
    # the compiled block runs where q, k, v and o are dense; thresholded q/o need their compiled
    # sparse-input paths, which the CPU lacks (see test_block_step_with_thresholded_q_and_o)
    steps = layer._step.steps
    assert (steps is not None and any(s is not None for s in steps.values())) == (
        block and method in ("dense", "cats", "chess"))


def test_plan_follows_the_method(model_th):
    """Dense q/k/v share one product; a thresholded q leaves k and v as one; TEAL none."""
    model, th = model_th
    attn = model.model.layers[1].self_attn
    x = mx.random.normal((1, 1, attn.q_proj["weight"].shape[1]))
    from mlx_lm.models.cache import KVCache

    expect = {"dense": (True, False), "chess": (True, False), "chess-attn": (False, True), "teal": (False, False)}
    for method, (qkv, kv) in expect.items():
        set_method(model, method, None if method == "dense" else th, 0.5)
        attn(x, cache=KVCache())
        plan = attn._fused.plan
        assert (plan.qkv is not None, plan.kv is not None) == (qkv, kv), method


def test_projections_are_views_of_one_block():
    """After the first one-token step q/k/v hold no memory of their own."""
    model, _ = tiny_model("llama", seed=3, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                          num_key_value_heads=2, head_dim=32)
    sparsify(model)
    attn = model.model.layers[0].self_attn
    before = {p: np.array(getattr(attn, f"{p}_proj")["weight"]) for p in "qkv"}
    grown = memory_growth_of_first_step(model)  # the first one-token step stores the rows
    qkv_bytes = sum(getattr(l.self_attn, f"{p}_proj")["weight"].nbytes for l in model.model.layers for p in "qkv")
    assert grown < qkv_bytes / 4, (grown, qkv_bytes)
    for p in "qkv":
        np.testing.assert_array_equal(np.array(getattr(attn, f"{p}_proj")["weight"]), before[p])


def test_quantized_rows_fuse(tmp_path):
    """MLX 4-bit projections fuse too (scales and biases with them) and give the same logits."""
    model, _ = tiny_model("llama", seed=4)
    nn.quantize(model, group_size=32, bits=4)
    sparsify(model)
    prompt = mx.random.randint(0, 256, (5,), key=mx.random.key(4))
    ref = _with_mlx_lm_attention(lambda: _decode_logits(model, prompt, 4))
    got = _decode_logits(model, prompt, 4)
    assert model.model.layers[0].self_attn._fused.plan.qkv is not None
    assert any(s is not None for s in model.model.layers[0]._step.steps.values())
    assert "scales" in model.model.layers[0].self_attn._fused.plan.qkv
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


def test_calibration_sees_attention_inputs_of_one_token_steps(model_th):
    """A collector on q_proj sends the call to mlx-lm's code, which calls q_proj itself."""
    model, _ = model_th
    set_method(model, "dense")
    attn = model.model.layers[0].self_attn
    seen = []
    attn.q_proj.ctl.collector = lambda _p, x: seen.append(x.shape)
    try:
        from mlx_lm.models.cache import KVCache

        attn(mx.zeros((1, 1, attn.q_proj["weight"].shape[1])), cache=KVCache())
    finally:
        attn.q_proj.ctl.collector = None
    assert seen == [(1, 1, attn.q_proj["weight"].shape[1])]


def test_block_step_follows_weights_of_the_method_switch(model_th):
    """A method switch drops the compiled steps; CHESS after dense decodes as CHESS does."""
    model, th = model_th
    prompt = mx.random.randint(0, 256, (7,), key=mx.random.key(8))
    set_method(model, "chess", th, 0.5)
    fresh = _decode_logits(model, prompt, 3)
    set_method(model, "dense")
    _decode_logits(model, prompt, 3)
    set_method(model, "chess", th, 0.5)
    np.testing.assert_array_equal(_decode_logits(model, prompt, 3), fresh)


def test_block_step_across_a_cache_growth(model_th):
    """Past mlx-lm's 256-position cache step the position stays right (RoPE takes it as an array)."""
    model, th = model_th
    set_method(model, "chess", th, 0.5)
    prompt = mx.random.randint(0, 256, (250,), key=mx.random.key(9))
    ref = _with_mlx_lm_attention(lambda: _decode_logits(model, prompt, 10))
    np.testing.assert_allclose(_decode_logits(model, prompt, 10), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["dense", "chess"])
def test_batched_decode_with_left_padding(model_th, method):
    """mlx-lm's BatchKVCache (positions as an array, an array mask): the same logits as mlx-lm."""
    from mlx_lm.models.cache import BatchKVCache

    model, th = model_th
    set_method(model, method, None if method == "dense" else th, 0.5)
    prompts = mx.random.randint(0, 256, (2, 8), key=mx.random.key(12))

    def run():
        cache = [BatchKVCache([0, 3]) for _ in model.layers]
        model(prompts, cache=cache)
        out, tok = [], mx.array([[5], [9]])
        for _ in range(4):
            logits = model(tok, cache=cache)[:, -1]
            out.append(np.array(logits, dtype=np.float64))
            tok = mx.argmax(logits, axis=-1)[:, None]
        return np.stack(out)

    ref = _with_mlx_lm_attention(run)
    np.testing.assert_allclose(run(), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_block_step_with_thresholded_q_and_o(family, monkeypatch):
    """CHESS+attention through the compiled block: q's and o's sparse-input paths inside the
    traces (on the CPU they wrap the reference products, as in test_decode_paths). Logits and
    recorded densities equal mlx-lm's attention with the same paths op by op. (Backed out in
    session 15 after two-thread hangs on the H100; their cause was fixed in session 16.)"""
    from chess_mlx import decode_paths
    from chess_mlx import sparse_layers as SL

    monkeypatch.setattr(SL, "compiled_path_ok", lambda x, *p: x.size == x.shape[-1] and decode_paths.enabled()
                        and all("bias" not in q and "scales" not in q for q in p))
    model, _ = tiny_model(family, seed=6)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 256, (2, 48), key=mx.random.key(1)), [0.5])
    state = set_method(model, "chess-attn", th, 0.5)
    prompt = mx.random.randint(0, 256, (6,), key=mx.random.key(2))

    def run():
        from mlx_lm.models.cache import make_prompt_cache

        cache = make_prompt_cache(model)
        model(prompt[None, :-1], cache=cache)
        out, dens, tok = [], [], prompt[-1:]
        for i in range(5):
            state.recorder.enabled = True
            logits = model(tok[None], cache=cache)[0, -1]
            calls = state.recorder.pop()
            state.recorder.enabled = False
            out.append(np.array(logits, dtype=np.float64))
            dens.append(calls[-1].density)
            tok = mx.array([(11 * i + 5) % 256])
        return np.stack(out), np.stack(dens)

    ref, ref_d = _with_mlx_lm_attention(run)
    got, got_d = run()
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_d, ref_d, atol=1e-7)
    assert (got_d[:, :, 0] < 1).any() and (got_d[:, :, 3] < 1).any()  # q and o really thresholded
    step = next(iter(model.model.layers[1]._step.steps.values()))
    assert step is not None and step.q is not None and step.o is not None


def test_weights_loaded_later_reach_the_fused_product():
    """New weights loaded into a sparsified model are used after the next set_method."""
    from mlx.utils import tree_flatten

    model, _ = tiny_model("llama", seed=21)
    sparsify(model)
    prompt = mx.random.randint(0, 256, (5,), key=mx.random.key(3))
    _decode_logits(model, prompt, 2)  # stores the rows of the first weights
    other, _ = tiny_model("llama", seed=22)
    model.load_weights(tree_flatten(other.parameters()))
    set_method(model, "dense")
    ref = _with_mlx_lm_attention(lambda: _decode_logits(model, prompt, 3))
    np.testing.assert_allclose(_decode_logits(model, prompt, 3), ref, rtol=1e-5, atol=1e-5)
