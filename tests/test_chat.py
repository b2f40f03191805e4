"""Chat: the session (KV reuse, stop, truncation) and the Textual app driven by Pilot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from chess_mlx import thresholds as T
from chess_mlx.chat_session import ChatSession
from chess_mlx.cli import main
from chess_mlx.model_io import fingerprint, load_model
from tiny import save_tiny

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_calibrated(tmp_path_factory) -> Path:
    d = save_tiny(tmp_path_factory.mktemp("chat") / "m")
    text = d.parent / "calib.txt"
    text.write_text("Some words to calibrate the tiny model with. " * 40)
    assert main(["calibrate", str(d), "--text", str(text), "--tokens", "256", "--seq-len", "64",
                 "--sparsity", "0.3,0.5"]) == 0
    return d


def _session(folder: Path, method: str = "dense") -> ChatSession:
    model, tok, _ = load_model(folder)
    th = T.load(folder, fingerprint(model)) if T.exists(folder) else None
    return ChatSession(model, tok, th, method)


def _run(session: ChatSession, text, n: int):
    return [r for _s, r in session.reply(text, max_tokens=n)][-1]


def test_second_turn_reuses_the_kv_cache_and_matches_a_fresh_session(tiny_calibrated):
    s = _session(tiny_calibrated, "chess")
    _run(s, "hello there", 10)
    second = _run(s, "and again", 10)
    full_len = second.context_tokens
    assert 0 < s.last_fed < full_len  # only the new tokens were fed
    fresh = _session(tiny_calibrated, "chess")
    fresh.messages = [dict(m) for m in s.messages[:2]]
    again = _run(fresh, "and again", 10)
    assert fresh.last_fed == full_len and again.tokens == second.tokens


def test_a_reply_that_runs_out_of_memory_keeps_the_history_and_rereads_it(tiny_calibrated, monkeypatch):
    """The device running out of memory in the middle of a reply (MLX raises from its allocator)
    ends that reply with the error; the text so far stays in the history, and the next reply
    starts from an empty cache (a failed evaluation leaves the cache's arrays lazy and its offset
    past what was computed), re-reads the whole history and answers as a fresh session would."""
    import chess_mlx.chat_session as CS

    real = CS.stream

    def failing(*a, **k):
        for i, step in enumerate(real(*a, **k)):
            if i == 3:
                raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")
            yield step

    s = _session(tiny_calibrated, "chess")
    _run(s, "hello there", 6)
    monkeypatch.setattr(CS, "stream", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        _run(s, "and again", 10)
    monkeypatch.setattr(CS, "stream", real)
    assert [m["role"] for m in s.messages] == ["user", "assistant"] * 2
    assert len(s.turns[-1].answers[0].tokens) == 3  # what was generated before the failure
    third = _run(s, "once more", 8)
    assert s.last_fed == third.context_tokens  # the whole history, not only the new turn
    fresh = _session(tiny_calibrated, "chess")
    fresh.messages = [dict(m) for m in s.messages[:4]]
    assert _run(fresh, "once more", 8).tokens == third.tokens


def test_stop_regenerate_and_switch(tiny_calibrated):
    s = _session(tiny_calibrated, "chess")
    gen = s.reply("count to a thousand", max_tokens=100_000)
    for k, (_step, reply) in enumerate(gen):
        if k == 5:
            s.stop()
    assert reply.stopped and len(reply.tokens) <= 7
    again = _run(s, None, 5)  # regenerate replaces the last reply
    assert [m["role"] for m in s.messages] == ["user", "assistant"] and len(again.tokens) <= 5
    s.set_method("teal", 0.3)
    assert (s.method, s.sparsity) == ("teal", 0.3)
    assert _run(s, "more", 4).last.stats.attn_sparsity > 0


def test_overlong_prompt_is_truncated_with_a_notice(tiny_calibrated):
    s = _session(tiny_calibrated)
    s.context_limit = 200
    reply = _run(s, "x" * 5000, 8)
    assert reply.notice and "truncated" in reply.notice and reply.context_tokens <= 200 - 8


def test_no_thresholds_means_dense_only(tmp_path):
    d = save_tiny(tmp_path / "plain")
    s = _session(d)
    assert s.methods() == ["dense"]
    with pytest.raises(Exception, match="needs calibrated thresholds"):
        s.set_method("chess", 0.5)


def test_chat_prompt_cli(tiny_calibrated, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "chess_mlx", "chat", *args], capture_output=True, text=True,
                              timeout=120)

    r = run(str(tiny_calibrated), "--prompt", "hi", "--method", "chess", "--sparsity", "0.5", "--max-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1].startswith("[chess@0.5]")
    plain = save_tiny(tmp_path / "plain")
    for args, msg in (([str(plain), "--prompt", "hi", "--method", "chess"], "no calibrated thresholds"),
                      ([str(tmp_path / "nope"), "--prompt", "hi"], "does not exist"),
                      ([str(plain), "--prompt", "  "], "the prompt is empty"),
                      ([str(plain), "--compare"], "--compare needs calibrated thresholds"),
                      ([str(plain), "--prompt", "hi", "--compare"], "--compare is for the app"),
                      ([str(plain), "--prompt", "hi", "--top-p", "0"], "top-p must be in"),
                      ([str(plain), "--save-dir", str(tmp_path / "nowhere")], "is not a folder")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr


# -- compare mode, sampling settings, transcripts ----------------------------------------------

def test_compare_sides_equal_separate_generations_and_report_divergence(tiny_calibrated):
    from chess_mlx.compare import CompareSession
    from chess_mlx.generate import generate
    from chess_mlx.sparse_layers import set_method

    base = _session(tiny_calibrated, "chess")
    cmp = CompareSession(base)
    events = list(cmp.reply("compare me", max_tokens=12))
    sides = [e[0] for e in events]
    assert sides == sorted(sides) and set(sides) == {"dense", "sparse"}  # dense streams first, then sparse
    c = cmp.last
    # Each side must equal an independent greedy generation of the same prompt under that method.
    prompt = cmp.dense._template([{"role": "user", "content": "compare me"}])
    for method, reply in (("dense", c.dense), ("chess", c.sparse)):
        set_method(base.model, method, base.thresholds, 0.5)
        ref = generate(base.model, base.tokenizer, prompt, max_tokens=12)
        assert reply.tokens == ref.tokens, method
    first_diff = next((i for i, (a, b) in enumerate(zip(c.dense.tokens, c.sparse.tokens)) if a != b), None)
    assert c.divergence == first_diff
    assert c.speed_ratio == c.sparse.last.generation_tps / c.dense.last.generation_tps
    assert c.sparse.mean.ffn_sparsity > 0.2 and abs(c.dense.mean.ffn_sparsity) < 1e-9
    assert "x dense tokens/s" in c.summary() and len(cmp.turns) == 1 and len(cmp.turns[0].answers) == 2
    # The base session still answers with its own method afterwards (sessions share the weights).
    again = _run(base, "compare me", 12)
    assert again.tokens == c.sparse.tokens


def test_divergence_rules():
    from chess_mlx.chat_session import Reply
    from chess_mlx.compare import Comparison

    def cmp(a, b, stopped=False):
        return Comparison(Reply(tokens=a), Reply(tokens=b, stopped=stopped)).divergence

    assert cmp([1, 2, 3], [1, 2, 3]) is None
    assert cmp([1, 2, 3], [1, 5, 3]) == 1
    assert cmp([1, 2], [1, 2, 3]) == 2  # one side ended (EOS) where the other went on
    assert cmp([1, 2], [1, 2, 3], stopped=True) is None  # a stopped side proves nothing


def test_compare_needs_thresholds(tmp_path):
    from chess_mlx.compare import CompareSession
    from chess_mlx.errors import ChessError

    with pytest.raises(ChessError, match="needs calibrated thresholds"):
        CompareSession(_session(save_tiny(tmp_path / "plain")))


def test_sampling_settings_are_checked():
    from chess_mlx.errors import ChessError
    from chess_mlx.sampling import Sampling

    s = Sampling.parse("0.7", " 0.9 ", "64")
    assert (s.temperature, s.top_p, s.max_tokens, s.greedy) == (0.7, 0.9, 64, False)
    assert Sampling().sampler() is None and s.sampler() is not None
    for args, msg in ((("-1", "1", "5"), "temperature must be a finite number >= 0"),
                      (("inf", "1", "5"), "temperature must be a finite number >= 0"), (("0", "0", "5"), "top-p must be in"),
                      (("0", "1.5", "5"), "top-p must be in"), (("0", "1", "0"), "max tokens must be positive"),
                      (("hot", "1", "5"), "temperature 'hot' is not a number"),
                      (("0", "1", "2.5"), "max tokens '2.5' is not an integer")):
        with pytest.raises(ChessError, match=msg):
            Sampling.parse(*args)


def test_transcript_has_every_turn_with_its_stats(tiny_calibrated, tmp_path):
    from chess_mlx import transcript
    from chess_mlx.errors import ChessError

    s = _session(tiny_calibrated, "chess")
    s.system_prompt = "Be brief."
    first = _run(s, "first question", 6)
    _run(s, "second question", 6)
    _run(s, None, 6)  # regenerate replaces the second answer, it does not add a turn
    md = transcript.to_markdown(s.turns, s.system_prompt, "tiny", "greedy")
    assert [t.user for t in s.turns] == ["first question", "second question"]
    assert md.count("### Assistant (chess @ 0.5)") == 2 and "Be brief." in md
    assert f"FFN sparsity {first.mean.ffn_sparsity:.1%}" in md and f"{first.last.generation_tps:.1f} tok/s" in md
    p1 = transcript.save(md, tmp_path)
    p2 = transcript.save(md, tmp_path)
    assert p1 != p2 and p1.read_text() == md == p2.read_text()
    with pytest.raises(ChessError, match="not a folder"):
        transcript.save(md, tmp_path / "missing")


def test_max_tokens_past_the_context_keeps_the_conversation(tiny_calibrated):
    """A max-tokens setting at or past the context length used to leave the prompt 16 tokens, so
    every message dropped the whole conversation. Now the reply gets at most half the context,
    older turns stay, and the reply stops where the context ends, with a notice."""
    s = _session(tiny_calibrated)
    s.context_limit = 200
    _run(s, "first question here", 4)
    reply = _run(s, "second question", 1000)
    assert [m["role"] for m in s.messages][:2] == ["user", "assistant"] and len(s.messages) == 4
    assert "the reply can use" in (reply.notice or "") and "context of 200" in reply.notice
    assert reply.context_tokens + len(reply.tokens) <= 200


def test_seed_makes_sampled_replies_repeatable_in_chat_and_generate(tiny_calibrated):
    """``--seed`` was a generate option only: a sampled ``chat --prompt`` reply could not be
    repeated. Both commands now take it from one place; the same seed gives the same text, another
    seed (at temperature 1 on a random model, near-uniform over 257 tokens) another text."""
    def run(cmd, seed):
        r = subprocess.run([sys.executable, "-m", "chess_mlx", cmd, str(tiny_calibrated), "--prompt", "hi",
                            "--method", "chess", "--max-tokens", "12", "--temp", "1", "--seed", str(seed)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stdout.rsplit("\n[", 1)[0]  # the reply, without the stats line

    for cmd in ("chat", "generate"):
        first = run(cmd, 7)
        assert run(cmd, 7) == first, cmd
        assert run(cmd, 8) != first, cmd


def test_generate_system_prompt_goes_through_the_chat_template(tmp_path, capsys):
    """``generate --system`` puts a system message before the user's in the model's template, so the
    prompt is exactly the template's tokens for both messages; a tokenizer without a template is
    refused in one line (the prompt would be sent as raw text and the system prompt lost)."""
    import json

    from mlx_lm import load

    d = save_tiny(tmp_path / "templated")
    cfg_path = d / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["chat_template"] = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\\n{% endfor %}"
                            "{% if add_generation_prompt %}<assistant>{% endif %}")
    cfg_path.write_text(json.dumps(cfg))
    _, tok = load(str(d))
    msgs = [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "hello"}]
    want = len(tok.apply_chat_template(msgs, add_generation_prompt=True))
    assert want > len(tok.apply_chat_template(msgs[1:], add_generation_prompt=True))
    assert main(["generate", str(d), "--prompt", "hello", "--system", "Answer in French.", "--max-tokens", "2"]) == 0
    assert f"prompt {want} tok" in capsys.readouterr().out.splitlines()[-1]
    plain = save_tiny(tmp_path / "plain")
    assert main(["generate", str(plain), "--prompt", "hello", "--system", "x", "--max-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--system needs a chat template" in err, err


def test_prompt_dash_reads_standard_input(tiny_calibrated):
    """``--prompt -`` (mlx-lm's convention) reads the prompt from a pipe: the reply and the prompt's
    token count equal those of the same text given inline; an empty pipe is refused in one line."""
    text = "a prompt long enough\nto span two lines"

    def run(cmd, prompt, stdin=""):
        return subprocess.run([sys.executable, "-m", "chess_mlx", cmd, str(tiny_calibrated), "--prompt", prompt,
                               "--method", "chess", "--max-tokens", "6"], input=stdin, capture_output=True,
                              text=True, timeout=120)

    for cmd in ("generate", "chat"):
        inline, piped = run(cmd, text), run(cmd, "-", text + "\n")
        assert inline.returncode == 0 and piped.returncode == 0, piped.stderr
        strip_speed = lambda out: re.sub(r"[\d.]+ tok/s|TTFT [\d.]+ s|\(after [\d.]+ s one-time setup\)|peak mem [\d.]+ GB", "", out)  # noqa: E731
        assert strip_speed(piped.stdout) == strip_speed(inline.stdout), cmd
        empty = run(cmd, "-", "\n")
        assert empty.returncode == 2 and empty.stderr.strip() == "chess-mlx: error: the prompt is empty", empty.stderr


def test_one_time_setup_runs_once_per_method_outside_ttft_and_leaves_the_reply_alone(tiny_calibrated):
    # A fresh process compiles the kernels at their first launch (seconds on CUDA); stream() runs the
    # method once on a throwaway cache first and reports that as setup_s, apart from TTFT.
    from app.stats_view import stats_text
    from chess_mlx.generate import format_stats, from_steps, stream, warm_up
    from chess_mlx.sparse_layers import set_method, sparsify

    s = _session(tiny_calibrated, "chess")
    model, tok, wb = s.model, s.tokenizer, sparsify(s.model).weight_bytes
    first = list(stream(model, tok, "Hello there, tiny model", max_tokens=6))
    second = list(stream(model, tok, "Hello there, tiny model", max_tokens=6))
    assert first[0].setup_s > 0 and {st.setup_s for st in first} == {first[0].setup_s}
    assert {st.setup_s for st in second} == {0.0}
    # the throwaway run left neither state nor recorded densities behind: the same tokens and the
    # same per-token sparsity as the warm model's
    assert [st.token for st in first] == [st.token for st in second]
    assert [st.stats.ffn_sparsity for st in first] == [st.stats.ffn_sparsity for st in second]
    assert 0 < first[0].stats.ffn_sparsity < 1
    assert "one-time setup" in format_stats(from_steps(iter(first), wb), "chess", 0.5)
    assert "one-time setup" not in format_stats(from_steps(iter(second), wb), "chess", 0.5)
    assert "setup (once)" in stats_text("x", first[0], None, 512)
    assert "setup (once)" not in stats_text("x", second[0], None, 512)
    # another level of the same method compiles nothing new; another method does
    set_method(model, "chess", s.thresholds, 0.3)
    assert warm_up(model) == 0.0
    set_method(model, "chess-attn", s.thresholds, 0.5)
    assert warm_up(model) > 0 and warm_up(model) == 0.0
    assert sparsify(model).recorder.pop() == []


def test_a_reply_keeps_the_traces_of_a_method_already_in_place(tiny_calibrated):
    """A session puts its method in place at every reply (compare mode shares the weights), but
    only where the model runs another: ``set_method`` drops the compiled one-token traces, and
    every reply then traced each block again."""
    from chess_mlx.sparse_layers import sparsify

    s = _session(tiny_calibrated, "chess")
    first = _run(s, "hello", 4)
    block = s.model.model.layers[0]
    traced = block._step.steps
    assert traced  # the one-token step of the block was made
    _run(s, "and again", 4)
    assert block._step.steps is traced
    other = ChatSession(s.model, s.tokenizer, s.thresholds, "dense")  # another session on the same weights
    _run(other, "hello", 4)
    assert sparsify(s.model).method == "dense" and block._step.steps is not traced
    s.clear()  # back to CHESS on the shared weights: the first reply again
    assert _run(s, "hello", 4).tokens == first.tokens and sparsify(s.model).method == "chess"
