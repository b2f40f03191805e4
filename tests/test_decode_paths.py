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
from chess_mlx import sparse_gemv as G
from chess_mlx import sparse_layers as SL
from chess_mlx.methods import METHODS
from tiny import tiny_model


def _decode(model, prompt, steps, make_cache=None):
    """Greedy (logits, recorded densities) of ``steps`` tokens after ``prompt``, with mlx-lm's
    caches unless ``make_cache(model)`` gives others."""
    from mlx_lm.models.cache import make_prompt_cache

    state = sparsify(model)
    cache = (make_cache or make_prompt_cache)(model)
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


def _paths_agree(model, th, prompt, method: str, steps: int) -> list:
    """Decode with the compiled paths off, then on: same logits, same recorded densities.
    Returns the densities (None where nothing was recorded, as under dense)."""
    set_method(model, method, th, 0.5)
    decode_paths.enable(False)
    want, want_d = _decode(model, prompt, steps)
    decode_paths.enable(True)
    got, got_d = _decode(model, prompt, steps)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=method)
    for a, b in zip(got_d, want_d):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_allclose(a, b, atol=1e-7, err_msg=method)
    return got_d


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
        for a in _paths_agree(model, th, prompt, method, 4):
            if a is not None and method != "dense":
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
    assert plan.bound.static[1].size == cfg["intermediate_size"]  # per-channel CHESS thresholds
    set_method(model, "cats", th, 0.5)
    assert not mlp.ctl.plans
    mx.eval(model(tok))
    (plan,) = mlp.ctl.plans.values()
    t = plan.bound.static[1]  # rebuilt: one threshold for the layer, padded out of MLX's small-buffer pool
    assert t.size == G.SCALAR_SLOTS and t.nbytes >= 16 and calls.count(3) == 4
    assert np.all(np.array(t) == np.array(t)[0]) and float(t[0]) == float(mx.array(th.level(0.5)["cats"][0], dtype=t.dtype))
    decode_paths.enable(False)
    mx.eval(model(tok))
    assert len(mlp.ctl.plans) == 2  # the compile switch is part of the key
    decode_paths.enable(True)


def test_quantized_compiled_paths_match_the_op_by_op_kernel_path(monkeypatch):
    """4-bit weights (quantized kernels on, the default): the compiled paths pass each QWeight as arrays and
    rebuild it with its bits/group size; against the op-by-op path on the same kernel layouts
    (row-major W for up, W^T re-quantized along the outputs for sparse inputs)."""
    import mlx.nn as nn

    from chess_mlx import linear_ops as L

    model, cfg = tiny_model("llama", 4)
    nn.quantize(model, group_size=32, bits=4)  # before sparsify (calibrate), which copies the projections
    rng = np.random.default_rng(6)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(3, 40))), [0.5])
    prompt = mx.array(rng.integers(0, cfg["vocab_size"], size=(8,)))
    quantized = []

    def ok(x, *projs):
        quantized.append(all("scales" in p for p in projs))
        return x.size == x.shape[-1] and decode_paths.enabled()

    monkeypatch.setattr(SL, "compiled_path_ok", ok)
    monkeypatch.setattr(L, "_use_kernels", lambda x, p: x.size == x.shape[-1])  # kernel layouts, op by op
    for method in ("chess", "chess-attn", "teal"):
        for a in _paths_agree(model, th, prompt, method, 3):
            assert a is not None and (a < 1).any()
    assert quantized and all(quantized)
    assert any(k[0] == "_act_mlp" and k[1][0] == (4, 32) for k in decode_paths._COMPILED)
    assert any(k[0] == "_spin" and k[1][1] == (4, 32) for k in decode_paths._COMPILED)
    set_method(model, "dense")


def test_compiled_path_gate(monkeypatch):
    """Which projections may take the compiled kernel paths on a GPU backend: float weights in the
    activation dtype; affine-quantized ones only with the quantized kernels switched on; no bias;
    one token only."""
    import mlx.nn as nn

    from chess_mlx import linear_ops as L
    from chess_mlx import sparse_gemv as G

    monkeypatch.setattr(G, "backend", lambda: "cuda")
    x = mx.zeros((1, 1, 64), dtype=mx.float16)
    lin, biased = nn.Linear(64, 32, bias=False), nn.Linear(64, 32)
    lin.set_dtype(mx.float16)
    biased.set_dtype(mx.float16)
    q = nn.QuantizedLinear.from_linear(lin, group_size=32, bits=4)
    assert L.compiled_path_ok(x, lin)
    assert not L.compiled_path_ok(mx.zeros((1, 2, 64), dtype=mx.float16), lin)  # prefill
    assert not L.compiled_path_ok(x.astype(mx.bfloat16), lin)  # dtype mismatch
    assert not L.compiled_path_ok(x, biased)
    monkeypatch.setattr(L, "QUANTIZED_KERNELS", False)
    assert not L.compiled_path_ok(x, lin, q)
    monkeypatch.setattr(L, "QUANTIZED_KERNELS", True)
    assert L.compiled_path_ok(x, lin, q)
    assert not L.compiled_path_ok(x.astype(mx.bfloat16), q)  # scales are float16


class _FakeSpin:
    """Stands in for the compiled spin kernel on the CPU: the reference product and density, and
    a log of the ordering token (``after``) each launch was given."""

    def __init__(self):
        self.after, self.x, self.shapes, self.partial = [], [], [], []

    def __call__(self, inputs, output_shapes, output_dtypes, grid, **_):
        x, wt, partial, after = inputs[0], inputs[2], inputs[-2], inputs[-1]
        self.after.append(after)
        self.x.append(x)
        self.shapes.append(output_shapes)
        self.partial.append(partial)
        # the split-K scratch the kernel writes: chunks (grid's y) x tokens x outputs, float32
        assert partial.dtype == mx.float32 and partial.size >= grid[1] * x.size // x.shape[-1] * wt.shape[1]
        y = (x.reshape(-1, x.shape[-1]) @ wt).astype(output_dtypes[0]).reshape(output_shapes[0])
        dens = mx.mean((x != 0).astype(mx.float32)).reshape(output_shapes[1])
        return [y, dens]


def test_launches_on_one_workspace_are_chained(monkeypatch):
    """Every sparse-input launch takes the previous launch's output y at the same call site as an
    input, so MLX's graph can never run two launches on one set of counters at once (the race seen
    on the H100 when teacher-forced decode steps had no data path between them). The token is y,
    never the density output, which the stats recorder reads on the thread that builds the next
    step (``pipelined``: an array a later step takes as input must not be read there)."""
    from chess_mlx import sparse_gemv as G

    fake = _FakeSpin()
    monkeypatch.setattr(G, "_kernel", lambda kind, name: fake)
    rng = np.random.default_rng(0)
    wt = mx.array(rng.standard_normal((64, 32)).astype(np.float32))
    ws, other = G.workspace(32), G.workspace(32)
    first_token = ws.last
    x = mx.array(rng.standard_normal((1, 64)).astype(np.float32))
    y1, d1 = G._launch_spin("cuda", x, wt, G.zero_threshold(x.dtype), ws)
    y2, d2 = G._launch_spin("cuda", x, wt, G.zero_threshold(x.dtype), ws)
    G._launch_spin("cuda", x, wt, G.zero_threshold(x.dtype), other)
    assert fake.after[0] is first_token and fake.after[1] is not first_token
    assert fake.after[2] is not fake.after[1]  # another call site keeps its own chain
    assert fake.after[1] is y1 and fake.after[1] is not d1  # the first launch's y, not its density
    assert ws.last is y2 and ws.last is not d2
    # the scratch is the site's own, kept between launches (sized at the first launch here, the
    # workspace having been made without the site's input), never another site's
    assert fake.partial[0] is fake.partial[1] is ws.partial and fake.partial[2] is other.partial

    # through the compiled path: the tokens come back as outputs and land on the caller's workspace
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    monkeypatch.setattr(G, "kernel_supports", lambda *a, **k: True)
    decode_paths._COMPILED.clear()
    xs = mx.where(mx.array(rng.random((1, 64)) < 0.5), 0.0, x)
    before = ws.last
    y, d = decode_paths.spin(xs, G.zero_threshold(x.dtype), wt, ws)
    mid = ws.last
    decode_paths.spin(xs, G.zero_threshold(x.dtype), wt, ws)
    assert before is not mid and mid is not ws.last and ws.last.dtype == y.dtype and ws.last.shape == y.shape
    np.testing.assert_allclose(np.array(mid), np.array(y))  # the compiled path hands back y as the token
    np.testing.assert_allclose(np.array(y), np.array(xs) @ np.array(wt), rtol=1e-5, atol=1e-5)
    assert d.item() == pytest.approx(float(np.mean(np.array(xs) != 0)))
    assert sum(k[0] == "_spin" for k in decode_paths._COMPILED) == 1  # one trace for both calls
    decode_paths._COMPILED.clear()


def test_sparse_input_takes_decode_activations_without_reshapes(monkeypatch):
    """A decode step's (1, 1, K) activation goes to the kernel as it is and y comes back as
    (1, 1, N), the density as a 0-d array: no reshape nodes around the launch, since every graph
    node costs host time at every token (RESULTS.md, session 8)."""
    from chess_mlx import sparse_gemv as G

    fake = _FakeSpin()
    monkeypatch.setattr(G, "_kernel", lambda kind, name: fake)
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    rng = np.random.default_rng(1)
    wt = mx.array(rng.standard_normal((64, 32)).astype(np.float16))
    x = mx.array(rng.standard_normal((1, 1, 64)).astype(np.float16))
    assert G.kernel_supports("cuda", x, wt, transposed=True)
    y, d = decode_paths._spin(x, G.zero_threshold(x.dtype), wt, G.workspace(32))
    assert fake.x[-1] is x
    assert fake.shapes[-1] == [(1, 1, 32), ()] and y.shape == (1, 1, 32) and d.shape == ()
    ref = np.array(x, dtype=np.float64).reshape(1, 64) @ np.array(wt, dtype=np.float64)
    np.testing.assert_allclose(np.array(y.astype(mx.float32)).reshape(1, 32), ref, rtol=1e-2, atol=1e-2)
    # more tokens than the kernels take, or a lone vector: the reference path
    assert not G.kernel_supports("cuda", mx.zeros((1, 9, 64), dtype=mx.float16), wt, transposed=True)
    assert not G.kernel_supports("cuda", mx.zeros((64,), dtype=mx.float16), wt, transposed=True)
    assert not G.kernel_supports("cuda", mx.zeros((1, 0, 64), dtype=mx.float16), wt, transposed=True)


@pytest.mark.parametrize("method", ["chess", "chess-attn", "teal"])
def test_compiled_paths_trace_once(method, monkeypatch):
    """A one-token path is traced at the first token after set_method and replayed from then on:
    a workspace's placeholder ordering token has the shape and dtype of the launches' y (a kernel
    launch makes its y the site's next token; here the reference product does the same), so the
    second token does not trace again (each trace is Python work per layer and path)."""
    from mlx_lm.models.cache import make_prompt_cache

    model, cfg = tiny_model("llama", 4)
    rng = np.random.default_rng(4)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(2, 32))), [0.5])
    monkeypatch.setattr(SL, "compiled_path_ok", lambda x, *p: x.size == x.shape[-1] and decode_paths.enabled())
    traced = []
    real = G.sparse_input

    def as_a_launch(x, wt, t=None, ws=None, **kw):  # runs only while a path is traced
        traced.append(1)
        out = real(x, wt, t, ws, **kw)
        if ws is not None:
            ws.last = out[0]  # what _launch_spin does: the launch's y orders the next launch
        return out

    monkeypatch.setattr(G, "sparse_input", as_a_launch)
    set_method(model, method, th, 0.5)
    cache = make_prompt_cache(model)
    mx.eval(model(mx.array([[1, 2, 3]]), cache=cache))
    per_token = []
    for i in range(4):
        n = len(traced)
        mx.eval(model(mx.array([[4 + i]]), cache=cache))
        per_token.append(len(traced) - n)
    assert per_token[0] > 0 and per_token[1:] == [0, 0, 0], per_token


def test_bound_paths_size_the_split_k_scratch_once():
    """A bound one-token path gets a workspace whose scratch fits a one-token launch on its
    weight (a scratch grown inside the trace would be a fill node at every token); a sized one is
    kept as it is."""
    from chess_mlx import sparse_gemv as G

    wt = mx.zeros((1024, 256), dtype=mx.float16)
    ws = G.workspace(256)
    assert ws.partial.size == 1
    decode_paths.bind_spin(G.zero_threshold(mx.float16), wt, ws)
    assert ws.partial.size == G.spin_partials(1, 256) > 1
    sized = ws.partial
    decode_paths.bind_spin(G.zero_threshold(mx.float16), wt, ws, residual=True)
    assert ws.partial is sized
    qt = G.QWeight.quantize(mx.zeros((1024, 256), dtype=mx.float16), 4, 64)
    ws_q = G.workspace(256)
    decode_paths.bind_teal_mlp(*(G.zero_threshold(mx.float16), qt, qt, G.zero_threshold(mx.float16), qt),
                               ws_q, G.workspace(256), G.workspace(256))
    assert ws_q.partial.size == G.spin_partials(1, 256)
