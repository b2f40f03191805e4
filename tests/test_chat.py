"""Chat: the session (KV reuse, stop, truncation) and the Textual app driven by Pilot."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
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


async def _until(pilot, cond, seconds: float = 120.0, step: float = 0.05) -> None:
    """Wait for cond() without ever hanging the suite."""
    for _ in range(int(seconds / step)):
        if cond():
            return
        await pilot.pause(step)
    raise AssertionError("timed out waiting for the app")


async def _pilot_flow(folder: Path, prompt: str, max_tokens: int) -> dict:
    from app.chat import ChatApp
    from textual.widgets import Markdown, Static

    app = ChatApp(_session(folder, "chess"), max_tokens=max_tokens)
    seen = {}
    app.max_tokens = max_tokens
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("enter")  # empty prompt: ignored
        assert not app.generating and app.replies == 0
        inp = app.query_one("#prompt")
        inp.value = prompt
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 1)
        seen["reply"] = app.query(Markdown).last()._markdown
        seen["stats"] = str(app.query_one("#stats", Static).render())
        seen["tokens"] = app.last_step.generation_tokens
        await pilot.press("f2")
        seen["method_after_f2"] = app.session.method
        # Esc stops a long reply at once
        app.max_tokens = 100_000
        inp.value = "tell me everything"
        await pilot.press("enter")
        await _until(pilot, lambda: app.generating)
        await pilot.pause(0.3)
        await pilot.press("escape")
        await _until(pilot, lambda: not app.generating)
        seen["stopped_at"] = app.last_step.generation_tokens
        seen["stopped_text"] = app.query(Markdown).last()._markdown
    return seen


def test_pilot_on_the_shipped_model(shipped_model_dir):
    seen = asyncio.run(_pilot_flow(shipped_model_dir, "What is the capital of France?", 16))
    assert len(seen["reply"].strip()) > 3 and seen["tokens"] > 0
    assert "tokens/s" in seen["stats"] and "FFN sparsity" in seen["stats"] and "chess @ 0.5" in seen["stats"]
    assert seen["method_after_f2"] == "chess-attn"
    assert 0 < seen["stopped_at"] < 100_000 and "(stopped)" in seen["stopped_text"]


_QUIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from app.chat import ChatApp
    from test_chat import _session
    from pathlib import Path

    async def go():
        app = ChatApp(_session(Path({folder!r})), max_tokens=100_000)
        async with app.run_test() as pilot:
            app.query_one("#prompt").value = "go on forever"
            await pilot.press("enter")
            while not app.generating or app.last_step is None:
                await pilot.pause(0.02)
            await pilot.press("ctrl+q")
            for _ in range(200):
                if not app.is_running:
                    break
                await pilot.pause(0.05)
        print("quit cleanly", app.generating)

    asyncio.run(go())
""")


def test_quit_in_the_middle_of_a_reply_exits_cleanly(tiny_calibrated):
    script = _QUIT_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), folder=str(tiny_calibrated))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quit cleanly False" in r.stdout


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
                      ([str(plain), "--prompt", "  "], "the prompt is empty")):
        r = run(*args)
        assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and msg in r.stderr, r.stderr
