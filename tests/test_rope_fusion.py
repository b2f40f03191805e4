"""RoPE of q and k inside CHESS+attention's split q/k/v launch (``sparse_gemv.Rope``,
``fused_attention.rope_spec``, ``block_step``): the reference rotation against float64 numpy and
against the model's own rope modules, the launch arguments and refusals, and a decode with the rope
fused against the op-by-op path. On the CPU the fused paths wrap the reference product; the
kernels' rope is checked on the GPU (``benchmarks/kernels.py``: sparse_input_split_rope)."""

from __future__ import annotations

import struct

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.models.rope_utils import Llama3RoPE, YarnRoPE

from chess_mlx import block_step, decode_paths, set_method, sparsify
from chess_mlx import fused_attention as FA
from chess_mlx import sparse_gemv as G
from test_qkv_launch import chess_attn_on_the_cpu, decode_matches, op_by_op_decode, traced_launches
from tiny import tiny_model

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 64}


def rotate64(y: np.ndarray, inv: np.ndarray, pos: int, d: int, n: int, trad: bool, scale: float = 1.0) -> np.ndarray:
    """The rotation in float64 from the float32 angles MLX defines ((scale * pos) * inv_freq)."""
    theta = (np.float32(scale) * np.float32(pos)) * inv.astype(np.float32)
    c, s = np.cos(theta.astype(np.float64)), np.sin(theta.astype(np.float64))
    r = y[..., :n].astype(np.float64).reshape(*y.shape[:-1], n // d, d)
    x1, x2 = (r[..., 0::2], r[..., 1::2]) if trad else (r[..., :d // 2], r[..., d // 2:])
    a, b = x1 * c - x2 * s, x1 * s + x2 * c
    out = np.stack([a, b], -1).reshape(r.shape) if trad else np.concatenate([a, b], -1)
    return np.concatenate([out.reshape(*y.shape[:-1], n), y[..., n:]], -1)


@pytest.mark.parametrize("trad", [False, True])
@pytest.mark.parametrize("pos", [0, 7, 3000])
def test_reference_rope_against_float64(trad, pos):
    rng = np.random.default_rng(pos + trad)
    d, n = 16, 48
    y = rng.standard_normal((2, 1, 64)).astype(np.float32)
    inv = rng.uniform(1e-4, 1.0, d // 2).astype(np.float32)
    got = G.reference_rope(mx.array(y), G.Rope(mx.array(inv), d, n, trad, 0.5, G.rope_position(pos)))
    np.testing.assert_allclose(np.array(got), rotate64(y, inv, pos, d, n, trad, 0.5), rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.array(got)[..., n:], y[..., n:])  # past n: as it was


def _attn(model_type="llama", **over):
    model, _ = tiny_model(model_type, 3, **over)
    sparsify(model)
    return model.model.layers[0].self_attn


@pytest.mark.parametrize("over", [{}, {"rope_traditional": True}, {"rope_theta": 500000.0},
                                  {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {"rope_scaling": LLAMA3}],
                         ids=["plain", "traditional", "theta", "linear", "llama3"])
def test_rope_spec_reproduces_the_models_rope(over):
    """The inverse frequencies, scale and layout read off the attention's rope module give what that
    module gives on the q and k heads at several positions."""
    attn = _attn(**over)
    spec = FA.rope_spec(attn)
    assert spec is not None and spec.dims == 16 and spec.n == (4 + 2) * 16
    assert spec.traditional == bool(over.get("rope_traditional", False))
    assert isinstance(attn.rope, Llama3RoPE) == ("rope_scaling" in over and over["rope_scaling"]["rope_type"] == "llama3")
    y = mx.random.normal((1, 1, (4 + 2 + 2) * 16), key=mx.random.key(1))
    for pos in (0, 5, 300):
        got = G.reference_rope(y, spec.at(G.rope_position(pos)))
        heads = y[..., :spec.n].reshape(1, 6, 1, 16)
        want = attn.rope(heads, offset=pos).reshape(1, 1, spec.n)
        np.testing.assert_allclose(np.array(got[..., :spec.n]), np.array(want), rtol=1e-5, atol=2e-5)
        assert np.array_equal(np.array(got[..., spec.n:]), np.array(y[..., spec.n:]))  # v as it is


def test_rope_spec_refuses_what_it_cannot_reproduce():
    assert FA.rope_spec(_attn("qwen3")) is None  # q and k are normalised per head before the rope
    attn = _attn()
    attn.rope = nn.RoPE(8)  # rotates half of each head
    assert FA.rope_spec(attn) is None
    attn.rope = YarnRoPE(16)  # scales the rotated values too
    assert FA.rope_spec(attn) is None


def test_rope_launch_arguments(monkeypatch):
    """The rope variants launch with the position and inverse frequencies as their last inputs and
    the head size, rotated count, layout and scale bits as templates; combinations no kernel has,
    and heads that would cross a tile, take the reference or are refused."""
    launched = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            launched.append((self.name, inputs, dict(template)))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(G, "_kernel", lambda kind, name: Fake(name))
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    x = mx.zeros((1, 1, 512), dtype=mx.float16)
    t = G.scalar_threshold(0.5, mx.float16)
    wt = mx.zeros((512, 768), dtype=mx.float16)
    g = mx.ones((512,), dtype=mx.float16)
    pos, inv = G.rope_position(9), mx.ones((64,), dtype=mx.float32)
    rope = G.Rope(inv, 128, 640, False, 0.25, pos)
    G.sparse_input(x, wt, t, G.workspace(768), nt=512, xnorm=(g, 1e-6), rope=rope)
    name, inputs, tmpl = launched[-1]
    assert name == "spin_f_xnorm_rope" and inputs[-3] is g and inputs[-2] is pos and inputs[-1] is inv
    assert (tmpl["ROPE_D"], tmpl["ROPE_N"], tmpl["ROPE_TRAD"]) == (128, 640, 0) and tmpl["NT"] == 512
    assert tmpl["ROPE_SB"] == struct.unpack("<i", struct.pack("<f", 0.25))[0]
    G.sparse_input(x, wt, t, G.workspace(768), rope=rope._replace(traditional=True))
    assert launched[-1][0] == "spin_f_rope" and launched[-1][2]["ROPE_TRAD"] == 1
    n = len(launched)
    G.sparse_input(x, wt, t, G.workspace(768), rope=rope._replace(dims=96, n=576, inv_freq=mx.ones((48,))))  # 96: heads cross tiles
    G.sparse_input(x, wt, t, G.workspace(768), residual=mx.zeros((1, 1, 768), dtype=mx.float16), rope=rope)
    assert len(launched) == n  # both took the reference
    with pytest.raises(ValueError, match="int32"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), rope=rope._replace(pos=mx.array(9, dtype=mx.int32)))
    with pytest.raises(ValueError, match="int32"):  # a spec: no position yet
        G._launch_spin("cuda", x, wt, t, G.workspace(768), rope=rope._replace(pos=None))
    with pytest.raises(ValueError, match="no position"):
        G.reference_rope(mx.zeros((1, 768)), rope._replace(pos=None))
    assert rope._replace(pos=None).at(pos) == rope
    with pytest.raises(ValueError, match="inverse frequencies"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), rope=rope._replace(inv_freq=mx.ones((64,), dtype=mx.float16)))
    with pytest.raises(ValueError, match="does not fit"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), rope=rope._replace(n=800))
    with pytest.raises(ValueError, match="no spin kernel"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), residual=mx.zeros((1, 1, 768), dtype=mx.float16),
                       rope=rope)
    with pytest.raises(ValueError, match="rope is fused"):
        decode_paths.bind_spin(t, wt, G.workspace(768), residual=True, rope=FA.G.Rope(inv, 128, 640))


@pytest.mark.parametrize("model_type,over", [("llama", {}), ("llama", {"rope_scaling": LLAMA3}),
                                             ("llama", {"rope_traditional": True}), ("qwen3", {})],
                         ids=["llama", "llama3-rope", "traditional", "qwen3"])
def test_decode_with_the_rope_fused(model_type, over, monkeypatch):
    """CHESS+attention through the compiled block with q's and k's RoPE inside the split launch gives
    the op-by-op path's logits and densities; Qwen3 (q/k norms first) and the switch off keep
    MLX's rope."""
    model, _, th, prompt = chess_attn_on_the_cpu(model_type, 11, monkeypatch, **over)
    calls = traced_launches(monkeypatch)
    want = op_by_op_decode(model, th, prompt, 5)
    try:
        for on in (True, False):
            block_step.enable_rope(on)
            # the launches with a rope inside, as traced
            roped = [k["rope"].n for k in decode_matches(model, th, prompt, want, calls) if k.get("rope") is not None]
            assert roped == ([(4 + 2) * 16] * 2 if on and model_type == "llama" else []), (on, roped)
    finally:
        block_step.enable_rope(True)
        set_method(model, "dense")
