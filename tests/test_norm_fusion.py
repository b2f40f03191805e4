"""The block's RMSNorms inside the sparse-input launches (``sparse_gemv.sparse_input``'s ``xnorm`` /
``ynorm``, ``block_step``): the reference against float64 numpy, the launches' arguments, and a
decode with the norms fused against the op-by-op path. On the CPU the fused paths wrap the
reference product; the kernels' fused norms are checked on the GPU (``benchmarks/kernels.py``:
sparse_input_split_xnorm, sparse_input_residual_ynorm)."""

from __future__ import annotations

import struct

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx import block_step, set_method
from chess_mlx import sparse_gemv as G
from test_qkv_launch import chess_attn_on_the_cpu, decode_matches, op_by_op_decode, traced_launches


def rms64(x: np.ndarray, g: np.ndarray, eps: float) -> np.ndarray:
    x = x.astype(np.float64)
    return g.astype(np.float64) * x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)


@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_fused_norms_against_float64(s):
    """``xnorm``: the threshold and the product take RMSNorm(x); ``ynorm``: a third result,
    RMSNorm of the residual sum; the density is that of the normalized, thresholded input."""
    rng = np.random.default_rng(int(10 * s))
    k, n, eps = 128, 96, 1e-5
    x = (3 * rng.standard_normal((2, k))).astype(np.float32)
    gx, gy = rng.uniform(0.5, 1.5, k).astype(np.float32), rng.uniform(0.5, 1.5, n).astype(np.float32)
    wt = rng.standard_normal((k, n)).astype(np.float32)
    r = rng.standard_normal((2, n)).astype(np.float32)
    xn = rms64(x, gx, eps)
    t = float(np.quantile(np.abs(xn), s)) if s else 0.0
    y, dens = G.sparse_input(mx.array(x), mx.array(wt), mx.array([t]), xnorm=(mx.array(gx), eps))
    keep = np.abs(xn) >= t
    want = np.where(keep, xn, 0) @ wt
    np.testing.assert_allclose(np.array(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert dens.item() == pytest.approx(keep.mean(), abs=1 / keep.size)
    y2, d2, yn = G.sparse_input(mx.array(x), mx.array(wt), mx.array([t]), residual=mx.array(r), ynorm=(mx.array(gy), eps))
    keep2 = np.abs(x) >= t
    want2 = r + np.where(keep2, x, 0).astype(np.float64) @ wt
    np.testing.assert_allclose(np.array(y2), want2, rtol=1e-4, atol=1e-4 * np.abs(want2).max())
    np.testing.assert_allclose(np.array(yn), rms64(want2, gy, eps), rtol=1e-4, atol=1e-4)
    assert d2.item() == pytest.approx(keep2.mean())


def test_fused_norm_launch_arguments(monkeypatch):
    """The norm variants launch with the weight as their last input and eps as the bits of its
    float32 (EPSB); an output norm needs the residual and the counter past the tiles; shapes that
    do not fit are refused at launch."""
    launched = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            launched.append((self.name, inputs, dict(template), output_shapes))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(G, "_kernel", lambda kind, name: Fake(name))
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    x = mx.zeros((1, 1, 512), dtype=mx.float16)
    t = G.scalar_threshold(0.5, mx.float16)
    wt = mx.zeros((512, 768), dtype=mx.float16)
    g = mx.ones((512,), dtype=mx.float16)
    G.sparse_input(x, wt, t, G.workspace(768), nt=512, xnorm=(g, 1e-6))
    name, inputs, tmpl, shapes = launched[-1]
    assert name == "spin_f_xnorm" and inputs[-1] is g and tmpl["NT"] == 512 and len(shapes) == 2
    assert tmpl["EPSB"] == struct.unpack("<i", struct.pack("<f", 1e-6))[0]
    r, gy = mx.zeros((1, 1, 768), dtype=mx.float16), mx.ones((768,), dtype=mx.float16)
    out = G.sparse_input(x, wt, t, G.workspace(768), residual=r, ynorm=(gy, 1e-5))
    name, inputs, tmpl, shapes = launched[-1]
    assert name == "spin_f_res_ynorm" and inputs[-2:] == [r, gy] and len(out) == 3 and shapes[2] == (1, 1, 768)
    n = len(launched)
    y, _, yn = G.sparse_input(x, wt, t, ynorm=(gy, 1e-5))  # no kernel fuses an output norm without the residual
    assert len(launched) == n and yn.shape == (1, 1, 768)
    with pytest.raises(ValueError, match="norm weight"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), xnorm=(mx.ones((256,), dtype=mx.float16), 1e-5))
    with pytest.raises(ValueError, match="norm weight"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), xnorm=(mx.ones((512,), dtype=mx.float32), 1e-5))
    small = G.Workspace(mx.zeros((4,), dtype=mx.int32), mx.zeros(()), mx.zeros((1,)))  # 3 tiles + 1: no room
    with pytest.raises(ValueError, match="workspace too small"):
        G._launch_spin("cuda", x, wt, t, small, residual=r, ynorm=(gy, 1e-5))


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decode_with_the_norms_fused(model_type, monkeypatch):
    """CHESS+attention through the compiled block with both norms inside the q and o launches gives
    the op-by-op path's logits and densities; switched off, the norms are launches of their own."""
    model, _, th, prompt = chess_attn_on_the_cpu(model_type, 9, monkeypatch)
    calls = traced_launches(monkeypatch)
    want = op_by_op_decode(model, th, prompt, 4)
    try:
        for on in (True, False):
            block_step.enable_norms(on)
            # the launches with a norm inside, as traced
            fused = {n for k in decode_matches(model, th, prompt, want, calls) for n in ("xnorm", "ynorm")
                     if k.get(n) is not None}
            assert fused == ({"xnorm", "ynorm"} if on else set()), on
    finally:
        block_step.enable_norms(True)
        set_method(model, "dense")
