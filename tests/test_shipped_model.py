"""The methods on the real shipped model (SmolLM2-135M-Instruct), offline, on the CPU."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file

from chess_mlx import calibrate, set_method
from chess_mlx.evaluate import perplexity
from chess_mlx.methods import level_key
from chess_mlx.model_io import load_model
from chess_mlx.paths import calibration_text_path, heldout_text_path
from chess_mlx.text import encode, token_sequences
from reference import RefModel

CALIB_TOKENS = 2048
HELDOUT_TOKENS = 2048


@pytest.fixture(scope="module")
def shipped(shipped_model_dir):
    model, tok, cfg = load_model(shipped_model_dir, "float32")
    seqs = token_sequences(tok, calibration_text_path().read_text(), CALIB_TOKENS, 512)
    th = calibrate(model, seqs, [0.5], meta={"method": "chess"})
    return model, tok, cfg, seqs, th


def test_layer0_thresholds_match_float64_reference(shipped, shipped_model_dir):
    model, tok, cfg, seqs, th = shipped
    w = load_file(str(shipped_model_dir / "model.safetensors"))
    keep = {k: v for k, v in w.items() if k.startswith("model.layers.0.") or k == "model.embed_tokens.weight"}
    ref = RefModel(keep, dict(cfg, num_hidden_layers=1))
    ref_th, ref_m = ref.calibrate([np.array(s) for s in seqs[:2]], [0.5])
    # the library calibrated on all sequences; recalibrate layer 0 on the same two for an exact match
    th2 = calibrate(model, seqs[:2], [0.5])
    got, want = th2.levels[level_key(0.5)], ref_th[0.5]
    np.testing.assert_allclose(th2.up_mean[0], ref_m[0], rtol=1e-3)
    for name in ("cats", "attn_in", "attn_out", "mlp_in", "down_in"):
        np.testing.assert_allclose(got[name][0], want[name][0], rtol=1e-3, err_msg=name)
    np.testing.assert_allclose(got["chess"][0], want["chess"][0], rtol=1e-3)


@pytest.fixture(scope="module")
def heldout_results(shipped):
    model, tok, cfg, seqs, th = shipped
    ids = encode(tok, heldout_text_path().read_text())[:HELDOUT_TOKENS]
    out = {}
    for method in ("dense", "cats", "chess", "chess-attn"):
        set_method(model, method, th, 0.5)
        out[method] = perplexity(model, ids, context=512, stride=512)
    set_method(model, "dense")
    return out


@pytest.mark.parametrize("method", ["cats", "chess", "chess-attn"])
def test_heldout_ffn_sparsity_within_003_of_target(heldout_results, method):
    assert abs(heldout_results[method].stats.ffn_sparsity - 0.5) < 0.03


def test_heldout_attention_sparsity_within_003(heldout_results):
    assert abs(heldout_results["chess-attn"].stats.attn_sparsity - 0.5) < 0.03
    assert heldout_results["chess"].stats.attn_sparsity == 0.0


def test_chess_beats_cats_perplexity(heldout_results):
    r = heldout_results
    assert r["dense"].ppl < r["chess"].ppl < r["cats"].ppl, {k: v.ppl for k, v in r.items()}
    # CHESS reads fewer bytes than dense: gate, attention and the LM head stay dense
    assert r["chess"].stats.bytes_fraction < 0.9


@pytest.fixture(scope="module")
def calibrated_copy(shipped, shipped_model_dir, tmp_path_factory):
    """The shipped model's files linked into a fresh folder, with this test's thresholds."""
    d = tmp_path_factory.mktemp("shipped")
    for f in shipped_model_dir.iterdir():
        if not f.name.startswith("chess_thresholds"):
            (d / f.name).symlink_to(f)
    shipped[4].save(d)
    return d


@pytest.mark.parametrize("method", ["dense", "chess"])
def test_generate_cli_offline(calibrated_copy, method):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-m", "chess_mlx", "generate", str(calibrated_copy),
                        "--prompt", "What is the capital of France?", "--method", method,
                        "--max-tokens", "24"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    text, stats = r.stdout.rstrip("\n").rsplit("\n", 1)
    assert len(text.strip()) > 5
    assert stats.startswith(f"[{method}") and "tok/s" in stats and "peak mem" in stats
    if method == "chess":
        ffn = float(stats.split("FFN sparsity ")[1].split("%")[0])
        assert 30.0 < ffn < 70.0, stats
    if method == "dense":
        assert "Paris" in text
