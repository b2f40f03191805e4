"""`chess-mlx bench`'s runner on the tiny preset: interleaved runs, measured sparsity, dense after."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from chess_mlx import bench
from chess_mlx.bench import random_model, run_bench
from chess_mlx.sparse_layers import sparsify


def test_run_bench_interleaves_methods_and_restores_dense(monkeypatch):
    model = random_model("tiny", dtype=mx.float32)
    prompt = mx.array([[1, 2, 3, 4, 5]])
    dense_before = np.array(model(prompt))
    order: list[tuple[str, bool]] = []
    real = bench.decode_speed

    def spy(m, *a, **k):
        order.append((sparsify(m).method, k.get("warmup", True)))
        return real(m, *a, **k)

    monkeypatch.setattr(bench, "decode_speed", spy)
    res = run_bench(model, ["dense", "chess"], 0.5, vocab=512, n_tokens=3, runs=2, calib_tokens=256)
    assert [r.method for r in res] == ["dense", "chess"]
    assert all(len(r.runs) == 2 and all(s > 0 for s in r.runs) for r in res)
    assert res[0].ffn_sparsity == 0.0 and 0.3 < res[1].ffn_sparsity < 0.7
    # one warm-up per method, then the timed runs alternate method by method
    assert order == [("dense", True), ("chess", True), ("dense", False), ("chess", False),
                     ("dense", False), ("chess", False)]
    assert sparsify(model).method == "dense"
    np.testing.assert_array_equal(np.array(model(prompt)), dense_before)


def test_paired_ratios_are_the_median_of_run_by_run_ratios():
    from chess_mlx.bench import DecodeResult, paired_ratios

    dense = DecodeResult("dense", 0.0, [100.0, 50.0, 120.0], 0.0)
    chess = DecodeResult("chess", 0.0, [130.0, 70.0, 100.0], 0.5)
    got = paired_ratios([dense, chess])
    assert got["dense"] == 1.0
    assert got["chess"] == np.median(np.array(chess.runs) / np.array(dense.runs))  # 1.3 (pairs 1.3, 1.4, 0.83)
    assert paired_ratios([chess]) == {}
