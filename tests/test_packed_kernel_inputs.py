"""The kernels' packed inputs and the fused residual (session 16): fewer inputs and graph nodes
per decode token, the same numbers.

- Quantized weights reach every kernel with scales and biases in one array ``sb``; the CATS/CHESS
  FFN front reads the gate and up rows stacked as one matrix (``stack_gate_up``).
- The sparse-input kernel may add the block's residual in its epilogue (``residual=``).
- The layers store the stacked gate/up rows once and keep views of them (no extra memory).
Checked against float64 numpy; the kernels themselves are checked on the GPU by
benchmarks/kernels.py, here a fake kernel records what the launchers pass.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from chess_mlx import calibrate, decode_paths, set_method
from chess_mlx import sparse_gemv as G
from chess_mlx import sparse_layers as SL
from test_kernels_cpu import unpack_np
from tiny import memory_growth_of_first_step, tiny_model


def _silu(v):
    return v / (1.0 + np.exp(-v))


@pytest.mark.parametrize("bits,gs", [(4, 64), (8, 32)])
def test_packed_and_stacked_weights_keep_the_documented_layout(bits, gs):
    rng = np.random.default_rng(bits)
    n, k = 48, 128
    wg = G.QWeight.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float16)), bits, gs)
    wu = G.QWeight.quantize(mx.array(rng.standard_normal((n, k)).astype(np.float16)), bits, gs)
    p = wg.packed()
    assert p.sb.shape == (2 * n, k // gs) and p.packed() is p
    np.testing.assert_array_equal(unpack_np(p), unpack_np(wg))
    w2 = G.stack_gate_up(wg, wu)
    assert w2.rows == 2 * n and w2.sb.shape == (4 * n, k // gs)
    sb = np.array(w2.sb.astype(mx.float32))
    for i, part in enumerate((wg.scales, wu.scales, wg.biases, wu.biases)):  # [sg; su; bg; bu]
        np.testing.assert_array_equal(sb[i * n:(i + 1) * n], np.array(part.astype(mx.float32)))
    g2, u2 = G.split_gate_up(w2)
    np.testing.assert_array_equal(unpack_np(g2), unpack_np(wg))
    np.testing.assert_array_equal(unpack_np(u2), unpack_np(wu))
    # the reference FFN front on the stacked rows, against float64 numpy on the dequantized weights
    x = rng.standard_normal((1, k))
    g = x @ unpack_np(wg).T
    t = np.quantile(np.abs(_silu(g)), 0.5)
    want = np.where(np.abs(_silu(g)) >= t, _silu(g), 0.0) * (x @ unpack_np(wu).T)
    got = G.gate_up_stacked(mx.array(x.astype(np.float32)), w2, mx.array(np.float32(t)))
    keep = np.abs(np.abs(_silu(g)) - t) > 1e-3  # away from the threshold: same decision
    np.testing.assert_allclose(np.array(got)[keep], want[keep], rtol=2e-3, atol=2e-3)


def test_float_gate_up_rows_stack_and_split():
    rng = np.random.default_rng(1)
    wg, wu = (mx.array(rng.standard_normal((16, 32)).astype(np.float32)) for _ in range(2))
    w2 = G.stack_gate_up(wg, wu)
    assert w2.shape == (32, 32)
    g2, u2 = G.split_gate_up(w2)
    np.testing.assert_array_equal(np.array(g2), np.array(wg))
    np.testing.assert_array_equal(np.array(u2), np.array(wu))
    x, t = mx.array(rng.standard_normal((1, 32)).astype(np.float32)), mx.array(0.3)
    np.testing.assert_allclose(np.array(G.gate_up_stacked(x, w2, t)), np.array(G.reference_gate_up(x, wg, wu, t)))


@pytest.mark.parametrize("per_channel", [False, True])
def test_sparse_input_residual_against_float64(per_channel):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((1, 64))
    wt = rng.standard_normal((64, 24))
    r = rng.standard_normal((1, 24))
    t = np.abs(rng.standard_normal(64)) if per_channel else np.array(0.7)
    y, d = G.sparse_input(mx.array(x.astype(np.float32)), mx.array(wt.astype(np.float32)),
                          mx.array(t.astype(np.float32)), residual=mx.array(r.astype(np.float32)))
    xs = np.where(np.abs(x) >= t, x, 0.0)
    np.testing.assert_allclose(np.array(y), r + xs @ wt, rtol=1e-5, atol=1e-5)
    assert d.item() == pytest.approx(np.mean(xs != 0))


class _Recorder:
    """A fake kernel factory: logs (name, inputs) and returns outputs of the asked shapes."""

    def __init__(self):
        self.calls = []

    def __call__(self, kind, name):
        def launch(inputs, output_shapes, output_dtypes, **_):
            self.calls.append((name, inputs))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]
        return launch


def test_launchers_pass_packed_weights_and_the_residual(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(G, "_kernel", rec)
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    rng = np.random.default_rng(3)
    q = lambda a: G.QWeight.quantize(mx.array(a.astype(np.float16)), 4, 64)  # noqa: E731
    wg, wu, wt = q(rng.standard_normal((256, 128))), q(rng.standard_normal((256, 128))), q(rng.standard_normal((256, 128)))
    x = mx.array(rng.standard_normal((1, 1, 128)).astype(np.float16))
    G.gate_up(x, wg, wu, mx.array([0.1] * 8, dtype=mx.float16))
    name, inputs = rec.calls[-1]
    assert name == "gateup_q" and len(inputs) == len(G._INPUTS[name]) == 4
    np.testing.assert_array_equal(np.array(inputs[1]), np.concatenate([np.array(wg.w), np.array(wu.w)]))
    np.testing.assert_array_equal(np.array(inputs[2]), np.concatenate([np.array(a) for a in
                                                                       (wg.scales, wu.scales, wg.biases, wu.biases)]))
    h = mx.array(rng.standard_normal((1, 1, 256)).astype(np.float16))
    r = mx.array(rng.standard_normal((1, 1, 128)).astype(np.float16))
    G.sparse_input(h, wt, ws=G.workspace(128), residual=r)
    name, inputs = rec.calls[-1]
    assert name == "spin_q_res" and len(inputs) == len(G._INPUTS[name]) == 8 and inputs[-1] is r
    np.testing.assert_array_equal(np.array(inputs[3]), np.concatenate([np.array(wt.scales), np.array(wt.biases)]))
    G.sparse_input(h, wt, ws=G.workspace(128))
    assert rec.calls[-1][0] == "spin_q" and len(rec.calls[-1][1]) == len(G._INPUTS["spin_q"]) == 7
    with pytest.raises(ValueError, match="residual"):
        G.sparse_input(h, wt, ws=G.workspace(128), residual=r.astype(mx.float32))
    with pytest.raises(ValueError, match="residual"):
        G.sparse_input(h, wt, ws=G.workspace(128), residual=r[..., :64])


def _plan_on_cpu(monkeypatch):
    """Let the compiled one-token paths (wrapping the reference products) run on the CPU."""
    monkeypatch.setattr(SL, "compiled_path_ok", lambda x, *p: x.size == x.shape[-1] and decode_paths.enabled())


@pytest.mark.parametrize("quantized", [False, True])
def test_gate_up_rows_are_views_of_one_block(quantized, monkeypatch):
    """After the first CHESS one-token step the gate and up projections hold no memory of their
    own: their weights (and scales/biases) are views of the stacked block the kernel reads."""

    model, cfg = tiny_model("llama", seed=5, hidden_size=256, intermediate_size=1024)
    if quantized:
        nn.quantize(model, group_size=64, bits=4)
    rng = np.random.default_rng(5)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(2, 32))), [0.5])
    _plan_on_cpu(monkeypatch)
    set_method(model, "chess", th, 0.5)
    mlp = model.model.layers[0].mlp
    keys = ("weight", "scales", "biases") if quantized else ("weight",)
    before = {(p, k): np.array(getattr(mlp, f"{p}_proj")[k]) for p in ("gate", "up") for k in keys}
    grown = memory_growth_of_first_step(model)  # the first one-token step stores the rows
    gu_bytes = sum(getattr(l.mlp, f"{p}_proj")[k].nbytes for l in model.model.layers for p in ("gate", "up") for k in keys)
    # what may grow: down's W^T for the sparse-input kernel (its own layout), nothing for gate/up
    down_t = sum(l.mlp.down_proj._kernel_wt.nbytes for l in model.model.layers)
    assert grown < down_t + gu_bytes / 4, (grown, down_t, gu_bytes)
    assert mlp.ctl.store.rows is not None and ("sb" in mlp.ctl.store.rows) == quantized
    for (p, k), a in before.items():
        np.testing.assert_array_equal(np.array(getattr(mlp, f"{p}_proj")[k]), a)
    set_method(model, "dense")


def test_block_adds_the_residual_inside_the_mlp_path(monkeypatch):
    """Under CHESS the compiled block hands its last residual to the MLP's fused path (one Add node
    fewer per layer); logits equal the op-by-op decode, and dense keeps the plain add."""
    from mlx_lm.models.cache import make_prompt_cache

    model, cfg = tiny_model("llama", seed=7)
    rng = np.random.default_rng(7)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(2, 32))), [0.5])
    _plan_on_cpu(monkeypatch)
    prompt = mx.array(rng.integers(0, cfg["vocab_size"], size=(6,)))
    calls = []
    orig = SL.SparseMLP._run

    def run(self, bound, recorded, *xs):
        calls.append(len(xs))
        return orig(self, bound, recorded, *xs)

    monkeypatch.setattr(SL.SparseMLP, "_run", run)

    def decode():
        cache = make_prompt_cache(model)
        logits = model(prompt[None], cache=cache)[:, -1]
        out = []
        for _ in range(4):
            logits = model(mx.argmax(logits, axis=-1)[None], cache=cache)[:, -1]
            out.append(np.array(logits))
        return np.stack(out)

    set_method(model, "chess", th, 0.5)
    decode_paths.enable(False)
    want = decode()
    assert not calls
    decode_paths.enable(True)
    got = decode()
    assert calls and all(c == 2 for c in calls)  # (x, residual) every time: the fused path
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    calls.clear()
    set_method(model, "dense")
    decode()
    assert not calls
