from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from chess_mlx import ChessError, calibrate, fingerprint, set_method
from chess_mlx import thresholds as T
from chess_mlx.model_io import cast_floats
from tiny import tiny_model


def test_roundtrip_and_fingerprint(tmp_path):
    model, _ = tiny_model("llama", 5)
    toks = mx.array(np.random.default_rng(0).integers(0, 256, size=(2, 32)))
    th = calibrate(model, toks, [0.3, 0.5], meta={"method": "chess"})
    th.save(tmp_path)
    back = T.load(tmp_path, fingerprint(model))
    assert back.sparsities == [0.3, 0.5]
    assert back.meta["calibration_tokens"] == 64 and back.meta["method"] == "chess"
    for k, lv in th.levels.items():
        for name, arr in lv.items():
            np.testing.assert_array_equal(back.levels[k][name], arr)
    other, _ = tiny_model("llama", 6)
    with pytest.raises(ChessError, match="another model"):
        T.load(tmp_path, fingerprint(other))
    assert not list(tmp_path.glob(".chess_thresholds*")), "temporary files left behind"


def test_fingerprint_ignores_float_dtype_but_not_weights():
    model, _ = tiny_model("llama", 7)
    cast_floats(model, mx.float16)
    fp16 = fingerprint(model)
    cast_floats(model, mx.float32)
    assert fingerprint(model) == fp16
    model.model.layers[0].mlp.up_proj.weight = model.model.layers[0].mlp.up_proj.weight * 1.5
    assert fingerprint(model) != fp16


def test_level_selection_errors():
    model, _ = tiny_model("llama", 8)
    toks = mx.array(np.random.default_rng(1).integers(0, 256, size=(1, 32)))
    th = calibrate(model, toks, [0.3, 0.5])
    with pytest.raises(ChessError, match="pick one"):
        th.match(None)
    with pytest.raises(ChessError, match="not calibrated"):
        set_method(model, "chess", th, 0.7)
    with pytest.raises(ChessError, match="needs calibrated thresholds"):
        set_method(model, "cats", None, 0.5)
    assert th.match(0.5) == 0.5


def test_thresholds_follow_the_model_into_every_float_dtype(tmp_path):
    """Calibrated on a float16-stored model (as the shipped one is) or a float32-stored one,
    thresholds load for the same weights in float32, float16 and bfloat16 (bfloat16 used to be
    refused as "another model": a float16 sample of bfloat16 weights differs), and files written
    before the bfloat16 fingerprint existed still load in the dtypes they did; other weights are
    refused in every dtype."""
    import json

    for stored in (mx.float16, mx.float32):
        model, _ = tiny_model("llama", 9)
        cast_floats(model, stored)
        toks = mx.array(np.random.default_rng(2).integers(0, 256, size=(1, 32)))
        th = calibrate(model, toks, [0.5])
        th.save(tmp_path)
        weights = dict(tree_flatten(model.parameters()))
        for dtype in (mx.float32, mx.float16, mx.bfloat16):
            copy, _ = tiny_model("llama", 9)
            copy.load_weights(list(weights.items()))
            cast_floats(copy, dtype)
            T.load(tmp_path, fingerprint(copy))
            other, _ = tiny_model("llama", 10)
            cast_floats(other, dtype)
            with pytest.raises(ChessError, match="another model"):
                T.load(tmp_path, fingerprint(other))
    js = tmp_path / "chess_thresholds.json"  # an older file: no bfloat16 fingerprint
    meta = json.loads(js.read_text())
    del meta["fingerprint_bf16"]
    js.write_text(json.dumps(meta))
    T.load(tmp_path, fingerprint(model))  # the float32-stored model, as it was calibrated
