"""The compiled one-token decode paths (chess_mlx/decode_paths.py) give the same logits and the same
recorded densities as the layers' op-by-op path, for every method.

On a GPU they wrap the kernels; here (CPU) they wrap the reference products, which checks what the
compiled paths add: threshold semantics (scalar thresholds in the activation dtype, per-channel
vectors as calibrated), the density the stats report, and tracing through mx.compile."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import calibrate, decode_paths, set_method, sparsify
from chess_mlx import sparse_layers as SL
from chess_mlx.methods import METHODS
from tiny import tiny_model


def _decode(model, prompt, steps):
    from mlx_lm.models.cache import make_prompt_cache

    state = sparsify(model)
    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[:, -1]
    out, dens = [], []
    for _ in range(steps):
        tok = mx.argmax(logits, axis=-1)
        state.recorder.enabled = True
        logits = model(tok[None], cache=cache)[:, -1]
        calls = state.recorder.pop()
        state.recorder.enabled = False
        out.append(np.array(logits.astype(mx.float32)))
        dens.append(calls[-1].density if calls else None)
    return np.stack(out), dens


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_compiled_paths_match_the_op_by_op_path(model_type, monkeypatch):
    model, cfg = tiny_model(model_type, 3)
    rng = np.random.default_rng(5)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(3, 40))), [0.5])
    prompt = mx.array(rng.integers(0, cfg["vocab_size"], size=(8,)))
    used = []

    def ok(x, *projs):  # the CPU has no kernels: let the compiled paths wrap the reference products
        good = x.size == x.shape[-1] and all("bias" not in p and "scales" not in p for p in projs)
        used.append(good)
        return good and decode_paths.enabled()

    monkeypatch.setattr(SL, "compiled_path_ok", ok)
    for method in METHODS:
        set_method(model, method, th, 0.5)
        decode_paths.enable(False)
        want, want_d = _decode(model, prompt, 4)
        decode_paths.enable(True)
        got, got_d = _decode(model, prompt, 4)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=method)
        for a, b in zip(got_d, want_d):
            assert (a is None) == (b is None)
            if a is not None:
                np.testing.assert_allclose(a, b, atol=1e-7, err_msg=method)
                if method != "dense":
                    assert (a < 1).any()  # something really was sparsified
    decode_paths.enable(True)
    assert any(used)
    assert any(k[0] == "_act_mlp" for k in decode_paths._COMPILED) and any(k[0] == "_spin" for k in decode_paths._COMPILED)


def test_decode_plans_are_built_once_and_dropped_on_method_switch(monkeypatch):
    """The one-token plan (checks, thresholds, weights, workspaces) is made once per module and
    dtype, reused on later tokens, and rebuilt after set_method: a stale CHESS plan under CATS
    would apply per-channel thresholds where one per layer is due."""
    model, cfg = tiny_model("llama", 2)
    rng = np.random.default_rng(9)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(2, 32))), [0.5])
    calls = []

    def ok(x, *projs):
        calls.append(len(projs))
        return decode_paths.enabled()

    monkeypatch.setattr(SL, "compiled_path_ok", ok)
    tok = mx.array([[3]])
    set_method(model, "chess", th, 0.5)
    mx.eval(model(tok), model(tok), model(tok))
    assert calls.count(3) == 2  # one MLP plan per layer, not one per token
    mlp = model.model.layers[0].mlp
    (plan,) = mlp.ctl.plans.values()
    assert plan[1][2].size == cfg["intermediate_size"]  # per-channel CHESS thresholds
    set_method(model, "cats", th, 0.5)
    assert not mlp.ctl.plans
    mx.eval(model(tok))
    (plan,) = mlp.ctl.plans.values()
    assert plan[1][2].size == 1 and calls.count(3) == 4  # rebuilt: one threshold for the layer
    decode_paths.enable(False)
    mx.eval(model(tok))
    assert len(mlp.ctl.plans) == 2  # the compile switch is part of the key
    decode_paths.enable(True)
