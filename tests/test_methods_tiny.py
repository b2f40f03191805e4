"""Every method against the float64 numpy reference on tiny random Llama/Qwen models."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from chess_mlx import calibrate, set_method, sparsify
from chess_mlx.methods import PROJS, SPARSE_METHODS, level_key
from reference import RefModel, keep_mask, rms_norm
from tiny import tiny_model

LEVELS = [0.0, 0.3, 0.5, 0.7, 0.9]


def _setup(model_type="llama", seed=0, S=4, T=48):
    model, cfg = tiny_model(model_type, seed)
    ref = RefModel({k: np.array(v) for k, v in tree_flatten(model.parameters())}, cfg)
    rng = np.random.default_rng(seed + 100)
    seqs = rng.integers(0, cfg["vocab_size"], size=(S, T))
    return model, cfg, ref, seqs


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2", "qwen3"])
def calibrated(request):
    model, cfg, ref, seqs = _setup(request.param)
    th = calibrate(model, mx.array(seqs), LEVELS, batch_size=3)
    ref_th, ref_m = ref.calibrate(list(seqs), LEVELS)
    return model, cfg, ref, seqs, th, ref_th, ref_m


def test_reference_matches_dense_mlx(calibrated):
    model, cfg, ref, seqs, *_ = calibrated
    got = np.array(model(mx.array(seqs[:1]))[0], dtype=np.float64)
    want = ref.logits(seqs[0])
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-4


def test_thresholds_match_reference(calibrated):
    model, cfg, ref, seqs, th, ref_th, ref_m = calibrated
    np.testing.assert_allclose(th.up_mean, ref_m, rtol=1e-4)
    for s in LEVELS:
        got, want = th.levels[level_key(s)], ref_th[s]
        for name in ("cats", "chess", "attn_in", "attn_out", "mlp_in", "down_in"):
            # float32 vs float64: tolerance relative to the activations' scale (the 0.9 quantile), since
            # the level-0 threshold is the tiny minimum, where float32 SiLU has few exact digits
            scale = np.abs(ref_th[0.9][name]).max()
            np.testing.assert_allclose(got[name], want[name], rtol=2e-4, atol=1e-5 * scale, err_msg=f"{name} @ {s}")


def test_chess_threshold_is_tau_over_channel_mean(calibrated):
    *_, th, _ref_th, _ = calibrated
    lv = th.levels[level_key(0.5)]
    tau = lv["chess"] * th.up_mean  # t_i * m_i must be one constant per layer
    assert np.allclose(tau, tau[:, :1], rtol=1e-5)


def test_calibration_hits_target_on_calibration_tokens(calibrated):
    model, cfg, ref, seqs, th, *_ = calibrated
    for s in (0.3, 0.5, 0.7, 0.9):
        for method in ("cats", "chess"):
            set_method(model, method, th, s)
            rec = sparsify(model).recorder
            rec.enabled = True
            model(mx.array(seqs[:1]))  # first layer sees the same inputs as in calibration
            d = rec.pop()[0].density
            rec.enabled = False
            assert abs((1 - d[0, PROJS.index("down")]) - s) < 0.06, (method, s)


@pytest.mark.parametrize("method", SPARSE_METHODS)
@pytest.mark.parametrize("level", [0.0, 0.5, 0.9])
def test_sparse_forward_matches_reference(calibrated, method, level):
    model, cfg, ref, seqs, th, *_ = calibrated
    set_method(model, method, th, level)
    got = np.array(model(mx.array(seqs[1:2]))[0], dtype=np.float64)
    want = ref.logits(seqs[1], method, th.levels[level_key(level)])
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err < 1e-3, err
    if level > 0:
        dense = ref.logits(seqs[1])
        assert np.linalg.norm(got - dense) / np.linalg.norm(dense) > 1e-4  # sparsity did something
    set_method(model, "dense")


def test_sparsity_zero_is_dense(calibrated):
    model, cfg, ref, seqs, th, *_ = calibrated
    set_method(model, "dense")
    dense = np.array(model(mx.array(seqs[2:3])))
    for method in SPARSE_METHODS:
        set_method(model, method, th, 0.0)
        np.testing.assert_allclose(np.array(model(mx.array(seqs[2:3]))), dense, rtol=1e-5, atol=1e-5)
    set_method(model, "dense")


def test_masks_and_densities_match_reference(calibrated):
    """Recorded per-layer densities equal the reference masks' densities (layer 0 inputs are exact)."""
    model, cfg, ref, seqs, th, *_ = calibrated
    lv = th.levels[level_key(0.5)]
    x = ref.embed(seqs[3])
    rec_ref = {}
    ref.block(0, x, record=rec_ref)
    m = rms_norm(x + 0, ref.W(0, "input_layernorm"), ref.eps)
    expect = {
        "chess": keep_mask(rec_ref["act"], lv["chess"][0]).mean(),
        "cats": keep_mask(rec_ref["act"], lv["cats"][0]).mean(),
    }
    for method in ("cats", "chess"):
        set_method(model, method, th, 0.5)
        rec = sparsify(model).recorder
        rec.enabled = True
        model(mx.array(seqs[3:4]))
        d = rec.pop()[0].density
        rec.enabled = False
        assert abs(d[0, PROJS.index("up")] - expect[method]) < 1e-6
        assert abs(d[0, PROJS.index("down")] - expect[method]) < 1e-6
    set_method(model, "chess-attn", th, 0.5)
    rec = sparsify(model).recorder
    rec.enabled = True
    model(mx.array(seqs[3:4]))
    d = rec.pop()[0].density
    rec.enabled = False
    assert abs(d[0, PROJS.index("q")] - keep_mask(m, lv["attn_in"][0]).mean()) < 1e-6
    assert d[0, PROJS.index("k")] == 1.0 and d[0, PROJS.index("v")] == 1.0  # K/V stay dense
    set_method(model, "dense")


@pytest.mark.parametrize("method", ["chess", "chess-attn", "teal"])
def test_kv_cache_decode_equals_full_forward(calibrated, method):
    """Token-by-token decoding through mlx-lm's KV cache gives the full-sequence logits."""
    from mlx_lm.models.cache import make_prompt_cache

    model, cfg, ref, seqs, th, *_ = calibrated
    set_method(model, method, th, 0.5)
    toks = mx.array(seqs[0, :24])[None]
    full = np.array(model(toks)[0])
    cache = make_prompt_cache(model)
    prefix = model(toks[:, :8], cache=cache)
    steps = [np.array(prefix[0])]
    for i in range(8, 24):
        steps.append(np.array(model(toks[:, i : i + 1], cache=cache)[0]))
    np.testing.assert_allclose(np.concatenate(steps), full, rtol=2e-4, atol=2e-4)
    set_method(model, "dense")


def test_weight_names_unchanged_by_sparsify():
    model, cfg = tiny_model("llama", 3)
    before = sorted(k for k, _ in tree_flatten(model.parameters()))
    sparsify(model)
    after = sorted(k for k, _ in tree_flatten(model.parameters()))
    assert before == after


def test_non_finite_activations_stop_calibration_with_the_block_named():
    # An inf weight in block 1's up_proj makes that block's activations inf/NaN: every quantile of
    # it would be NaN, and saved NaN thresholds switch a layer silently fully on or off.
    from chess_mlx.errors import ChessError

    model, _ = tiny_model("llama", seed=3)
    w = np.array(model.model.layers[1].mlp.up_proj.weight)
    w[0, 0] = np.inf
    model.model.layers[1].mlp.up_proj.weight = mx.array(w)
    tokens = mx.array(np.random.default_rng(0).integers(0, 256, (2, 16)))
    with pytest.raises(ChessError, match=r"block 1's activations are not finite"):
        calibrate(model, tokens, [0.5])
