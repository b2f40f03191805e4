"""q, k and v as one sparse-input launch under CHESS+attention (``sparse_gemv.sparse_input``'s ``nt``,
``SparseInputLinear.split_plan``): the split product against float64 numpy, the stacked
layout against each projection's own, the launch's arguments, and a decode through the split
path against the op-by-op path. On the CPU the split path wraps the reference product; the
kernels' split launches are checked on the GPU (``benchmarks/kernels.py``, sparse_input_split)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from chess_mlx import calibrate, decode_paths, set_method
from chess_mlx import linear_ops as L
from chess_mlx import sparse_gemv as G
from chess_mlx import sparse_layers as SL
from test_decode_paths import _decode
from test_kernels_cpu import unpack_np
from tiny import tiny_model


def columns(wt, start: int, stop: int):
    """Outputs ``[start, stop)`` of a transposed weight (K, N); of a QWeight quantized along N,
    the words, scales and biases of those outputs (on group boundaries)."""
    if not isinstance(wt, G.QWeight):
        return wt[:, start:stop]
    per, g = 32 // wt.bits, wt.group_size
    assert start % g == 0 and stop % g == 0
    return G.QWeight(wt.w[:, start // per:stop // per], wt.scales[:, start // g:stop // g],
                     wt.biases[:, start // g:stop // g], wt.bits, wt.group_size)


@pytest.mark.parametrize("wtype", ["f32", "q4", "q8"])
@pytest.mark.parametrize("s", [0.0, 0.5, 0.9])
def test_split_product_against_float64(wtype, s):
    """``[threshold(x) @ Wq^T | x @ Wkv^T]``: the threshold reaches q's outputs only, and the
    density is that of q's thresholded input."""
    rng = np.random.default_rng(int(10 * s) + len(wtype))
    k, nq, nkv = 128, 64, 32
    x = rng.standard_normal((1, k)).astype(np.float32)
    wt_np = rng.standard_normal((k, nq + 2 * nkv)).astype(np.float32)
    t = float(np.quantile(np.abs(x), s)) if s else 0.0
    if wtype == "f32":
        wt, wt64 = mx.array(wt_np), wt_np.astype(np.float64)
    else:
        wt = G.QWeight.quantize(mx.array(wt_np), int(wtype[1]), 32)
        wt64 = unpack_np(wt)
    y, dens = G.sparse_input(mx.array(x), wt, mx.array([t]), nt=nq)
    keep = np.abs(x) >= t
    want = np.concatenate([np.where(keep, x, 0).astype(np.float64) @ wt64[:, :nq], x.astype(np.float64) @ wt64[:, nq:]],
                          axis=-1)
    np.testing.assert_allclose(np.array(y), want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    assert dens.item() == pytest.approx(keep.mean())
    if s >= 0.5:  # the threshold really dropped inputs, and only q's outputs felt it
        dense_q = x.astype(np.float64) @ wt64[:, :nq]
        assert np.abs(np.array(y)[:, :nq] - dense_q).max() > 1e-3


def test_split_launch_arguments_and_tile_bound(monkeypatch):
    """A split launch is spin with NT = q's outputs, on the stacked W^T; an NT that does not end a
    tile is refused (a block compacts one input for its whole tile), and where q's outputs do not
    end a tile ``sparse_input`` takes the reference instead of a kernel."""
    launched = []

    class Fake:
        def __call__(self, inputs, template, grid, threadgroup, output_shapes, output_dtypes, init_value=None):
            launched.append(dict(template))
            return [mx.zeros(s, dtype=d) for s, d in zip(output_shapes, output_dtypes)]

    monkeypatch.setattr(G, "_kernel", lambda kind, name: Fake())
    monkeypatch.setattr(G, "backend", lambda: "cuda")
    x = mx.zeros((1, 1, 512), dtype=mx.float16)
    t = G.scalar_threshold(0.5, mx.float16)
    wt = mx.zeros((512, 768), dtype=mx.float16)
    G.sparse_input(x, wt, t, G.workspace(768), nt=512)
    assert launched[-1]["NT"] == 512 and launched[-1]["N"] == 768
    with pytest.raises(ValueError, match="tile"):
        G._launch_spin("cuda", x, wt, t, G.workspace(768), nt=384)
    n = len(launched)
    y, _ = G.sparse_input(x, wt, t, nt=384)  # 384 outputs end no 256-wide tile: the reference
    assert len(launched) == n and y.shape == (1, 1, 768)
    assert G.split_fits(1, 4096) and not G.split_fits(1, 896) and G.split_fits(1, 4096, 4) and not G.split_fits(1, 768, 4)
    q4 = G.QWeight.quantize(mx.zeros((512, 1536), dtype=mx.float16), 4, 64).packed()
    G.sparse_input(x, q4, t, G.workspace(1536), nt=1024)
    assert launched[-1]["NT"] == 1024 and launched[-1]["BITS"] == 4


@pytest.mark.parametrize("bits", [None, 4])
def test_stacked_transposed_weight_is_each_projections_own(bits):
    """``[Wq^T | Wk^T | Wv^T]`` holds exactly what each projection's own W^T would (quantized: the
    same re-quantization along the outputs), is built once per set of weights, and leaves no
    per-projection copy behind."""
    model, _ = tiny_model("llama", 2)
    if bits:
        nn.quantize(model, group_size=32, bits=bits)
    attn = model.model.layers[0].self_attn
    projs = [attn.q_proj, attn.k_proj, attn.v_proj]
    wt = L.stacked_transposed_weight(projs)
    assert L.stacked_transposed_weight(projs) is wt
    assert not any(hasattr(p, "_kernel_wt") for p in projs)
    start = 0
    for p in projs:
        n = p["weight"].shape[0]
        own = L.transposed_weight(p)
        part = columns(wt, start, start + n)
        if bits:
            for key in ("w", "scales", "biases"):
                assert mx.array_equal(getattr(part, key), getattr(own, key)), key
        else:
            assert mx.array_equal(part, own)
        start += n
    attn.k_proj.weight = attn.k_proj.weight + 0  # new weights: a new stacked copy
    assert L.stacked_transposed_weight(projs) is not wt


def chess_attn_on_the_cpu(model_type: str, seed: int, monkeypatch, **over):
    """(model, cfg, thresholds, prompt) of a tiny calibrated model (config ``over``rides) whose
    CHESS+attention decode takes the compiled one-token paths on the CPU (over the reference
    products), q, k and v as one split launch (the tiny model's q let through the tile bound), with
    fresh traces."""
    model, cfg = tiny_model(model_type, 7, **over)
    rng = np.random.default_rng(seed)
    th = calibrate(model, mx.array(rng.integers(0, cfg["vocab_size"], size=(3, 40))), [0.5])
    prompt = mx.array(rng.integers(0, cfg["vocab_size"], size=(8,)))
    monkeypatch.setattr(SL, "compiled_path_ok", lambda x, *p: x.size == x.shape[-1] and decode_paths.enabled())
    monkeypatch.setattr(G, "split_fits", lambda m, nt, bits=None, kind="cuda": True)
    monkeypatch.setattr(decode_paths, "_COMPILED", {})
    return model, cfg, th, prompt


def traced_launches(monkeypatch) -> list[dict]:
    """The keyword arguments of every ``sparse_gemv.sparse_input`` call from now on (inside the
    compiled paths: as traced), in order."""
    calls = []
    real = G.sparse_input

    def counted(*a, **k):
        calls.append(k)
        return real(*a, **k)

    monkeypatch.setattr(G, "sparse_input", counted)
    return calls


def op_by_op_decode(model, th, prompt, steps: int) -> tuple:
    """CHESS+attention's (logits, densities) of ``steps`` tokens with the compiled paths off."""
    set_method(model, "chess-attn", th, 0.5)
    decode_paths.enable(False)
    try:
        return _decode(model, prompt, steps)
    finally:
        decode_paths.enable(True)


def decode_matches(model, th, prompt, want: tuple, calls: list[dict]) -> list[dict]:
    """Decode CHESS+attention afresh (method set again, no shared traces) as the switches now
    stand; its logits and densities must be ``want``'s (``op_by_op_decode``). Returns the
    ``traced_launches`` of this decode."""
    set_method(model, "chess-attn", th, 0.5)
    decode_paths._COMPILED.clear()  # traces are shared by shape: count this variant's own
    n = len(calls)
    got, got_d = _decode(model, prompt, len(want[0]))
    np.testing.assert_allclose(got, want[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got_d, want[1], atol=1e-7)
    return calls[n:]


@pytest.mark.parametrize("model_type", ["llama", "qwen3"])
def test_decode_through_the_split_launch(model_type, monkeypatch):
    """CHESS+attention with q, k and v as one split launch (the tiny model's q is let through the
    tile bound) gives the op-by-op path's logits and q densities, through the compiled block and
    through the fused attention alone; switched off, q's own launch comes back."""
    from chess_mlx import block_step

    model, cfg, th, prompt = chess_attn_on_the_cpu(model_type, 8, monkeypatch)
    calls = traced_launches(monkeypatch)
    want = op_by_op_decode(model, th, prompt, 4)
    split = []  # nt of every split launch (nt given) so far, as traced
    try:
        for stepped in (True, False):
            block_step.enable(stepped)
            mine = [k["nt"] for k in decode_matches(model, th, prompt, want, calls) if k.get("nt") is not None]
            split += mine
            assert len(mine) > 0 and set(split) == {cfg["num_attention_heads"] * cfg["head_dim"]}
        q = model.model.layers[0].self_attn.q_proj
        assert not hasattr(q, "_kernel_wt")  # the stacked copy serves q: no second one
        SL.enable_split(False)
        mine = [k["nt"] for k in decode_matches(model, th, prompt, (want[0][:2], want[1][:2]), calls)
                if k.get("nt") is not None]
        assert len(mine) == 0 and hasattr(q, "_kernel_wt")
    finally:
        block_step.enable(True)
        SL.enable_split(True)
        set_method(model, "dense")
