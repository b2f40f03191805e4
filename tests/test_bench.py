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


def test_greedy_ahead_decodes_the_same_tokens_as_mlx_lm():
    """The graph-built-ahead decode (one lazy graph of n steps) must be the same greedy decode as
    mlx-lm's generate_step, token for token, dense and sparse (its timing is the only difference)."""
    from mlx_lm.generate import generate_step

    from chess_mlx.calibrate import calibrate
    from chess_mlx.sparse_layers import set_method

    model = random_model("tiny", dtype=mx.float32)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, 512, (2, 64), key=mx.random.key(5)), [0.5])
    prompt = mx.random.randint(0, 512, (12,), key=mx.random.key(9))
    n = 10
    for method in ("dense", "chess", "teal"):
        set_method(model, method, th, 0.5)
        got, secs = bench.greedy_ahead(model, prompt, n)
        want = [int(t) for t, _ in generate_step(prompt, model, max_tokens=n + 1,
                                                 sampler=lambda lp: mx.argmax(lp, axis=-1))]
        assert np.array(got).tolist() == want, method
        assert secs > 0
    set_method(model, "dense")


def test_run_bench_ahead_speeds_and_their_paired_ratios():
    model = random_model("tiny", dtype=mx.float32)
    res = run_bench(model, ["dense", "chess"], 0.5, vocab=512, n_tokens=3, runs=2, calib_tokens=256, ahead=4)
    assert all(len(r.ahead_runs) == 2 and all(s > 0 for s in r.ahead_runs) for r in res)
    assert all(r.ahead_tokens_per_s == float(np.median(r.ahead_runs)) for r in res)
    got = bench.paired_ratios(res, ahead=True)
    assert got["dense"] == 1.0
    assert got["chess"] == np.median(np.array(res[1].ahead_runs) / np.array(res[0].ahead_runs))
    assert bench.paired_ratios(run_bench(model, ["dense"], 0.5, vocab=512, n_tokens=2, runs=1,
                                         calib_tokens=256), ahead=True) == {}


def test_mlx_lm_baseline_runs_with_chess_mlx_decode_paths_off(monkeypatch):
    """'mlx-lm' times dense through mlx-lm's own attention, block and generate_step; every other
    method through chess-mlx's paths; the switches are as before afterwards."""
    from chess_mlx import block_step, fused_attention, pipelined

    model = random_model("tiny", dtype=mx.float32)
    seen: list[tuple] = []
    real = bench.decode_speed

    def spy(m, *a, **k):
        seen.append((sparsify(m).method, pipelined.enabled(), fused_attention.enabled(), block_step.enabled()))
        return real(m, *a, **k)

    monkeypatch.setattr(bench, "decode_speed", spy)
    res = run_bench(model, ["mlx-lm", "dense"], 0.5, vocab=512, n_tokens=3, runs=1, calib_tokens=256)
    assert seen == [("dense", False, False, False), ("dense", True, True, True)] * 2
    assert pipelined.enabled() and fused_attention.enabled() and block_step.enabled()
    assert set(bench.paired_ratios(res, base="mlx-lm")) == {"mlx-lm", "dense"}


def test_bench_times_a_model_folder_with_its_own_thresholds_on_text(tmp_path, monkeypatch, capsys):
    """``chess-mlx bench FOLDER`` times a real model folder: its own calibrated level (no random
    calibration), a prompt of held-out text (a trained model's activations on random ids are not
    those of use), and the FFN and attention sparsity of that level on it, with the weight bytes a
    token reads checked against the parameters' sizes. The random-model options, sparse
    methods without thresholds and uncalibrated levels are refused in one line before any timing."""
    import json

    from chess_mlx.cli import main
    from chess_mlx.model_io import load_model
    from chess_mlx.paths import heldout_text_path
    from tiny import save_tiny

    d = save_tiny(tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(heldout_text_path().read_text(encoding="utf-8")[:6000])
    assert main(["calibrate", str(d), "--text", str(text), "--tokens", "512", "--seq-len", "64",
                 "--sparsity", "0.3,0.7"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(bench, "calibrate", lambda *a, **k: (_ for _ in ()).throw(AssertionError("calibrated")))
    prompts = []
    real = bench.decode_speed
    monkeypatch.setattr(bench, "decode_speed", lambda *a, **k: prompts.append(k["prompt"]) or real(*a, **k))
    model, tok, _ = load_model(d)
    # Weight bytes a token reads, from the parameters (every layer has the same shapes): the head
    # always, each projection in proportion to the inputs or outputs it keeps.
    layer = model.model.layers[0]
    nb = {p: getattr(layer.self_attn if p in "qkvo" else layer.mlp, f"{p}_proj").weight.nbytes
          for p in ("q", "k", "v", "o", "gate", "up", "down")}
    head = model.lm_head if hasattr(model, "lm_head") else model.model.embed_tokens
    n_layers = len(model.model.layers)
    total = n_layers * sum(nb.values()) + head.weight.nbytes
    sparsity = {}
    for level in ("0.3", "0.7"):
        out = tmp_path / f"bench{level}.json"
        assert main(["bench", str(d), "--methods", "dense,chess,chess-attn", "--sparsity", level, "--runs", "1",
                     "--tokens", "3", "--ahead", "0", "--json", str(out)]) == 0
        res = {r["method"]: r for r in json.loads(out.read_text())["results"]}
        assert json.loads(out.read_text())["model"] == "m float32" and list(res) == ["dense", "chess", "chess-attn"]
        assert res["dense"]["ffn_sparsity"] == res["dense"]["attn_sparsity"] == 0.0
        assert res["dense"]["bytes_fraction"] == 1.0 and res["chess"]["attn_sparsity"] == 0.0
        assert res["chess-attn"]["attn_sparsity"] > 0.1
        for r in (res["chess"], res["chess-attn"]):
            saved = n_layers * (r["ffn_sparsity"] * (nb["up"] + nb["down"]) + r["attn_sparsity"] * (nb["q"] + nb["o"]))
            assert abs(r["bytes_fraction"] - (1 - saved / total)) < 1e-6, (r, saved / total)
        sparsity[level] = res["chess"]["ffn_sparsity"]
    assert abs(sparsity["0.3"] - 0.3) < 0.1 and abs(sparsity["0.7"] - 0.7) < 0.1, sparsity
    want = tok.encode(heldout_text_path().read_text(encoding="utf-8")[:4000])[:32]
    assert prompts and all(p.tolist() == want for p in prompts)
    plain = save_tiny(tmp_path / "plain")
    for argv, msg in (([str(d), "--preset", "tiny", "--layers", "1"], "--preset, --layers shape the random model"),
                      ([str(d), "--quantize", "4"], "--quantize shapes the random model"),
                      ([str(plain), "--methods", "dense,chess"], "no calibrated thresholds in"),
                      ([str(d), "--methods", "chess", "--sparsity", "0.5"], "sparsity 0.5 is not calibrated; available: 0.3, 0.7")):
        assert main(["bench", *argv, "--runs", "1", "--tokens", "2", "--ahead", "0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err, err
    assert main(["bench", str(plain), "--methods", "dense", "--runs", "1", "--tokens", "2", "--ahead", "0"]) == 0
    header = capsys.readouterr().out.splitlines()[0]  # no level is named where no method uses one
    assert header.startswith("decode benchmark: plain float32, 2 tokens x 1 runs"), header


def test_each_method_reports_its_one_time_setup_once_per_process():
    # the first run of each method (and of dense with chess-mlx's paths off, the mlx-lm row, which
    # compiles other things) is its setup; a second bench on the same model has none left
    model = random_model("tiny", dtype=mx.float32)
    methods = ["mlx-lm", "dense", "chess", "chess-attn"]
    first = run_bench(model, methods, 0.5, vocab=512, n_tokens=2, runs=1, calib_tokens=256)
    again = run_bench(model, methods, 0.5, vocab=512, n_tokens=2, runs=1, calib_tokens=256)
    assert all(r.setup_s > 0 for r in first), [(r.method, r.setup_s) for r in first]
    assert [r.setup_s for r in again] == [0.0] * len(methods)


def test_context_puts_that_many_prompt_tokens_in_the_cache_before_the_timed_decode(tmp_path, monkeypatch, capsys):
    """``--context N``: every timed decode (and graph-ahead run) of every method starts after N
    prompt tokens: random ids for a preset, the held-out text's first N tokens for a folder. A
    context the text cannot fill, or one that with ``--tokens`` passes the model's trained
    context, is one line and exit 2 before any timing."""
    import json

    from chess_mlx import pipelined
    from chess_mlx.cli import main
    from chess_mlx.model_io import load_model
    from chess_mlx.paths import heldout_text_path
    from tiny import save_tiny

    lens = []
    real_step, real_ahead = pipelined.generate_step, bench.greedy_ahead
    monkeypatch.setattr(pipelined, "generate_step", lambda prompt, *a, **k: lens.append(prompt.size) or real_step(prompt, *a, **k))
    monkeypatch.setattr(bench, "greedy_ahead", lambda m, prompt, n: lens.append(prompt.size) or real_ahead(m, prompt, n))
    out = tmp_path / "b.json"
    assert main(["bench", "--preset", "tiny", "--methods", "dense,chess", "--runs", "2", "--tokens", "2",
                 "--ahead", "2", "--context", "40", "--json", str(out)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "after a 40-token prompt" in header, header
    # per method: warm_up's own short prompt, one untimed and two timed decodes, one untimed and two graph-ahead runs
    timed = [n for n in lens if n != 8]
    assert timed == [40] * 12, lens
    assert json.loads(out.read_text())["context"] == 40
    lens.clear()
    d = save_tiny(tmp_path / "m")
    model, tok, _ = load_model(d)
    limit = model.args.max_position_embeddings
    seen = []
    monkeypatch.setattr(pipelined, "generate_step", lambda prompt, *a, **k: seen.append(prompt.tolist()) or real_step(prompt, *a, **k))
    assert main(["bench", str(d), "--methods", "dense", "--runs", "1", "--tokens", "2", "--ahead", "0",
                 "--context", "100"]) == 0
    want = tok.encode(heldout_text_path().read_text(encoding="utf-8")[:2000])[:100]
    assert len(want) == 100 and [p for p in seen if len(p) != 8] == [want, want]
    capsys.readouterr()
    long = save_tiny(tmp_path / "long", max_position_embeddings=10**6)  # a byte per token: ~178k of text
    for folder, argv, msg in ((long, ["--context", "200000"], "--context 200000 needs that many tokens of"),
                              (d, ["--context", str(limit - 1)],
                               f"--context plus --tokens {limit + 1} passes the model's context of {limit}")):
        seen.clear()
        assert main(["bench", str(folder), "--methods", "dense", "--runs", "1", "--tokens", "2", "--ahead", "0", *argv]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and msg in err and not seen, err  # before any timing


def test_context_sweep_times_each_context_with_the_in_place_cache_off_then_on(monkeypatch):
    """benchmarks/context_sweep.py (a GPU question: what the in-place KV cache gains as the
    context grows) runs on the tiny preset: a row per context, setting and method, the decodes
    after that many prompt tokens with mlx-lm's caches and then the in-place ones, and the switch
    left as it was."""
    from chess_mlx import kv_cache, pipelined
    from chess_mlx.kv_cache import InPlaceKVCache
    from test_kernels_cpu import bench_module

    sweep = bench_module("context_sweep")
    seen = []
    real_step = pipelined.generate_step

    def spy(prompt, model, *a, **k):
        cache = kv_cache.make_cache(model)
        seen.append((prompt.size, type(cache[0]) is InPlaceKVCache))
        return real_step(prompt, model, *a, prompt_cache=cache, **{n: v for n, v in k.items() if n != "prompt_cache"})

    monkeypatch.setattr(pipelined, "generate_step", spy)
    model = random_model("tiny", dtype=mx.float32)
    assert kv_cache.inplace_enabled()
    rows = sweep.sweep(model, 512, [12, 20], ["chess-attn"], runs=1, tokens=2, calib_tokens=256)
    assert [(r["context"], r["inplace"], r["method"]) for r in rows] == [
        (c, j, m) for c in (12, 20) for j in (False, True) for m in ("dense", "chess-attn")]
    assert all(r["tok_s"] > 0 for r in rows) and kv_cache.inplace_enabled()
    timed = [s for s in seen if s[0] != 8]  # warm_up's own 8-token prompt left out
    assert sorted(set(timed)) == [(12, False), (12, True), (20, False), (20, True)], seen


def test_first_token_probe_names_the_slow_steps_by_cache_position(monkeypatch, capsys):
    """benchmarks/first_token_probe.py on a preset (no folder): a run of 12 steps prints the first
    four and sums up the rest; slow_steps names a planted slow step at its cache position and no
    other."""
    import sys
    from test_kernels_cpu import bench_module

    probe = bench_module("first_token_probe")
    med, slow = probe.slow_steps([1.0, 1.1, 0.9, 5.0, 1.0], first_pos=300)
    assert med == 1.0 and slow == [(303, 5.0)]
    monkeypatch.setattr(sys, "argv", ["first_token_probe.py", "tiny", "--method", "chess", "--steps", "12"])
    probe.main()
    out = capsys.readouterr().out
    assert out.count("one-token step") == 4 and "steps 5-12: median" in out, out
