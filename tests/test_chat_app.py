"""The Textual app driven by Pilot: streaming, stats, stop, method switch, compare mode, dialogs,
saving, the command palette, bad input, and a clean quit in the middle of a reply."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

from test_chat import ROOT, _session, tiny_calibrated  # noqa: F401  (fixture)
from tiny import save_tiny

from chess_mlx.sampling import Sampling


async def _until(pilot, cond, seconds: float = 120.0, step: float = 0.05) -> None:
    """Wait for cond() without ever hanging the suite."""
    for _ in range(int(seconds / step)):
        if cond():
            return
        await pilot.pause(step)
    raise AssertionError("timed out waiting for the app")


def _notes(app) -> list[str]:
    return [n.message for n in app._notifications]


def _text(widget) -> str:
    return str(widget.render())


async def _shipped_flow(folder: Path) -> dict:
    from app.chat import ChatApp
    from textual.widgets import Markdown, Static

    app = ChatApp(_session(folder, "chess"), Sampling(max_tokens=40))
    seen: dict = {"painted": []}
    paint = app._paint

    def recording_paint(text, step, reply):  # what the reply widget showed, paint by paint
        seen["painted"].append((text, step.generation_tokens))
        return paint(text, step, reply)

    app._paint = recording_paint
    async with app.run_test(size=(120, 40)) as pilot:
        seen["prepared_at_start"] = "preparing chess @ 0.5" in " ".join(_notes(app))
        await _until(pilot, lambda: not app.preparing)
        seen["stats_before"] = _text(app.query_one("#stats", Static))
        await pilot.press("enter")  # empty prompt: ignored
        assert not app.generating and app.replies == 0
        inp = app.query_one("#prompt")
        inp.value = "Write a short story about a cat who learns to fly."
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 1)
        seen["reply"] = app.query(Markdown).last()._markdown
        seen["stats"] = _text(app.query_one("#stats", Static))
        seen["tokens"] = app.last_step.generation_tokens
        seen["painted"] = list(seen["painted"])  # this reply's paints only
        app._paint = paint
        # the new method runs once as soon as it is chosen (held open here so the test sees it);
        # a message sent meanwhile is shown at once and sent when the method is ready
        import app.chat as chat_mod

        release = threading.Event()
        warm = chat_mod.warm_up
        chat_mod.warm_up = lambda model: (release.wait(30), warm(model))[1]
        try:
            await pilot.press("f2")
            seen["method_after_f2"] = app.session.method
            seen["preparing"] = app.preparing and app.generating
            seen["notice"] = _notes(app)[-1]
            inp.value = "sent while preparing"
            await pilot.press("enter")
            await pilot.pause(0.2)
            seen["while_preparing"] = (inp.value, app._pending, app.replies, len(app.session.messages))
        finally:
            release.set()
            chat_mod.warm_up = warm
        await _until(pilot, lambda: app.replies >= 2)
        seen["pending_reply"] = app.last_reply
        seen["pending_stats"] = _text(app.query_one("#stats", Static))
        # Esc stops a long reply at once and keeps what was generated
        app.sampling = Sampling(max_tokens=100_000)
        inp.value = "tell me everything"
        await pilot.press("enter")
        await _until(pilot, lambda: app.generating and app.last_step is not None)
        await pilot.press("escape")
        await _until(pilot, lambda: not app.generating)
        seen["stopped_at"] = app.last_step.generation_tokens
        seen["stopped_text"] = app.query(Markdown).last()._markdown
        seen["stopped_stats"] = _text(app.query_one("#stats", Static))
        # compare mode: dense | chess-attn columns, a verdict line
        app.sampling = Sampling(max_tokens=24)
        await pilot.press("f4")
        await pilot.pause()
        seen["screen"] = type(app.screen).__name__
        app.screen.query_one("#cmp-prompt").value = "Name three colours."
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 4)  # first, pending, stopped, compare
        await pilot.pause()
        seen["verdict"] = _text(app.screen.query_one("#verdict"))
        seen["cmp_stats"] = [_text(app.screen.query_one(f"#stats-{s}")) for s in ("dense", "sparse")]
        seen["cmp"] = app.compare.last
        await pilot.press("f4")
        await pilot.pause()
        seen["back"] = type(app.screen).__name__
    return seen


def test_pilot_on_the_shipped_model(shipped_model_dir):
    seen = asyncio.run(_shipped_flow(shipped_model_dir))
    assert "(no reply yet)" in seen["stats_before"] and "tokens/s" not in seen["stats_before"]
    # streamed: several paints, each a growing prefix of the final reply
    partial = [(t, n) for t, n in seen["painted"] if n < seen["tokens"]]
    assert len(partial) >= 2, seen["painted"]
    assert all(seen["reply"].startswith(t) for t, _ in partial)
    assert partial[0][1] < partial[-1][1]
    assert len(seen["reply"].strip()) > 3 and seen["tokens"] > 0
    assert "tokens/s" in seen["stats"] and "FFN sparsity" in seen["stats"] and "chess @ 0.5" in seen["stats"]
    assert seen["method_after_f2"] == "chess-attn"
    assert seen["prepared_at_start"]
    assert seen["preparing"] and "preparing chess-attn @ 0.5" in seen["notice"]
    n_before = 2  # the first exchange's user message and reply
    assert seen["while_preparing"] == ("", "sent while preparing", 1, n_before)  # shown, not yet sent
    r = seen["pending_reply"]
    assert r.label == "chess-attn @ 0.5" and r.tokens and r.last.setup_s == 0.0
    assert "setup (once)" not in seen["pending_stats"] and "setup (once)" not in seen["stats"]
    assert 0 < seen["stopped_at"] < 100_000 and "(stopped)" in seen["stopped_text"]
    assert seen["screen"] == "CompareScreen" and seen["back"] == "Screen"
    c = seen["cmp"]
    assert c.dense.label == "dense" and c.sparse.label == "chess-attn @ 0.5"
    assert c.summary() in seen["verdict"] and "greedy outputs" in seen["verdict"]
    assert "FFN sparsity" in seen["cmp_stats"][1] and "chess-attn @ 0.5" in seen["cmp_stats"][1]
    assert c.sparse.mean.attn_sparsity > 0.2 and abs(c.dense.mean.attn_sparsity) < 1e-9


async def _dialogs_flow(folder: Path, save_dir: Path) -> dict:
    from app.chat import ChatApp
    from app.screens import HelpScreen, SettingsScreen, SystemPromptScreen

    app = ChatApp(_session(folder, "chess"), Sampling(max_tokens=6), save_dir=save_dir, model_name="tiny")
    seen: dict = {}
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: not app.preparing)
        await pilot.press("ctrl+s")  # nothing to save yet
        await pilot.pause()
        seen["empty_save"] = _notes(app)[-1]
        await pilot.press("f1")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        seen["help"] = app.screen.query_one("Markdown")._markdown
        await pilot.press("escape")
        await pilot.press("f6")
        await pilot.pause()
        assert isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#top_p").value = "2"
        app.screen.query_one("#top_p").focus()
        await pilot.press("enter")
        await pilot.pause()
        seen["settings_error"] = _text(app.screen.query_one("#error"))
        seen["still_open"] = isinstance(app.screen, SettingsScreen)
        app.screen.query_one("#top_p").value = "0.9"
        app.screen.query_one("#max_tokens").value = "5"
        await pilot.press("enter")
        await pilot.pause()
        seen["sampling"] = app.sampling
        await pilot.press("f5")
        await pilot.pause()
        assert isinstance(app.screen, SystemPromptScreen)
        app.screen.query_one("TextArea").text = "You are terse."
        await pilot.press("ctrl+s")
        await pilot.pause()
        seen["system"] = app.session.system_prompt
        app.query_one("#prompt").value = "hello"
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 1)
        seen["context_ids"] = app.session._template(app.session.messages[:1])
        await pilot.press("ctrl+s")
        await pilot.pause()
        seen["saved"] = app.last_saved
        # a fenced code block is rendered as a highlighted fence
        app._md.update("```python\ndef f(x):\n    return x + 1\n```")
        await pilot.pause()
        fences = app.query("MarkdownFence")
        seen["fence"] = len(fences)
        # the command palette runs our actions
        await pilot.press("ctrl+p")
        await pilot.pause()
        await pilot.press(*"Help")
        await pilot.pause(0.5)
        await pilot.press("enter")
        await pilot.pause(0.3)
        seen["palette_opened"] = type(app.screen).__name__
        seen["commands"] = [c.title for c in app.get_system_commands(app.screen)]
    return seen


def test_dialogs_save_and_palette(tiny_calibrated, tmp_path):  # noqa: F811
    seen = asyncio.run(_dialogs_flow(tiny_calibrated, tmp_path))
    assert "nothing to save" in seen["empty_save"]
    for key in ("escape", "f1", "f2", "f3", "f4", "f5", "f6", "ctrl+r", "ctrl+s", "ctrl+l", "ctrl+q", "ctrl+p"):
        assert f"`{key}`" in seen["help"], key
    assert "top-p must be in (0, 1]" in seen["settings_error"] and seen["still_open"]
    assert seen["sampling"] == Sampling(0.0, 0.9, 5)
    assert seen["system"] == "You are terse."
    from chess_mlx.model_io import load_model
    _, tok, _ = load_model(tiny_calibrated)
    assert "You are terse." in tok.decode(seen["context_ids"])  # the system prompt reached the model
    text = seen["saved"].read_text()
    assert "You are terse." in text and "### You\n\nhello" in text and "tok/s" in text
    assert "FFN sparsity" in text and "chess @ 0.5" in text
    assert seen["fence"] == 1
    assert seen["palette_opened"] == "HelpScreen"
    for title in ("Stop", "Help", "Method", "Sparsity", "Compare", "System prompt", "Settings", "Regenerate",
                  "Save", "Clear"):
        assert title in seen["commands"], title


async def _bad_input_flow(plain: Path, calibrated: Path) -> dict:
    from app.chat import ChatApp

    seen: dict = {}
    app = ChatApp(_session(plain), Sampling(max_tokens=4), startup_notice="no thresholds; starting dense")
    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: not app.preparing)
        await pilot.press("f2")
        await pilot.press("f4")
        await pilot.pause()
        seen["screen"] = type(app.screen).__name__
        app.query_one("#prompt").value = "still works?"
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 1)
        seen["dense_reply"] = app.last_reply
        seen["notes"] = _notes(app)
    session = _session(calibrated, "chess")
    session.context_limit = 120
    app = ChatApp(session, Sampling(max_tokens=8))
    async with app.run_test(size=(120, 40)) as pilot:
        app.query_one("#prompt").value = "y" * 4000
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 1)
        await pilot.pause()
        seen["long_notes"] = _notes(app)
        seen["long_stats"] = _text(app.query_one("#stats"))
        seen["long_reply"] = app.last_reply
    return seen


def test_bad_input_in_the_app(tiny_calibrated, tmp_path):  # noqa: F811
    seen = asyncio.run(_bad_input_flow(save_tiny(tmp_path / "plain"), tiny_calibrated))
    notes = " | ".join(seen["notes"])
    assert "no thresholds; starting dense" in notes
    assert "only dense is available" in notes and "compare mode needs calibrated thresholds" in notes
    assert seen["screen"] == "Screen"
    assert seen["dense_reply"].label == "dense" and seen["dense_reply"].tokens
    assert any("truncated" in n for n in seen["long_notes"]) and "truncated" in seen["long_stats"]
    assert seen["long_reply"].context_tokens <= 120 - 8


async def _out_of_memory_flow(calibrated: Path) -> dict:
    """A reply whose evaluation runs out of device memory after 2 tokens, then an ordinary one."""
    import chess_mlx.chat_session as CS
    from app.chat import ChatApp

    real, seen = CS.stream, {}

    def failing(*a, **k):
        for i, step in enumerate(real(*a, **k)):
            if i == 2:
                raise RuntimeError("cudaMallocAsync(&data, size, stream) failed: out of memory")
            yield step

    app = ChatApp(_session(calibrated, "chess"), Sampling(max_tokens=6))
    async with app.run_test(size=(120, 40)) as pilot:
        CS.stream = failing
        try:
            app.query_one("#prompt").value = "fill the GPU"
            await pilot.press("enter")
            await _until(pilot, lambda: app.replies >= 1)
        finally:
            CS.stream = real
        seen["notes"] = _notes(app)
        seen["failed_tokens"] = len(app.session.turns[-1].answers[0].tokens)
        app.query_one("#prompt").value = "and now?"
        await pilot.press("enter")
        await _until(pilot, lambda: app.replies >= 2)
        seen["next"] = app.last_reply
        seen["running"] = app.is_running
    return seen


def test_out_of_memory_in_a_reply_is_a_notice_not_a_crash(tiny_calibrated):  # noqa: F811
    seen = asyncio.run(_out_of_memory_flow(tiny_calibrated))
    assert any(n.startswith("out of device memory") for n in seen["notes"]), seen["notes"]
    assert seen["failed_tokens"] == 2
    assert seen["running"] and seen["next"].tokens and not seen["next"].stopped


def test_unknown_model_path_is_one_line_before_the_ui_starts(tmp_path):
    r = subprocess.run([sys.executable, "-m", "chess_mlx", "chat", str(tmp_path / "nope")], capture_output=True,
                       text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "does not exist" in r.stderr


_QUIT_SCRIPT = textwrap.dedent("""
    import asyncio, sys
    sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
    from app.chat import ChatApp
    from chess_mlx.sampling import Sampling
    from test_chat import _session
    from pathlib import Path

    async def go():
        app = ChatApp(_session(Path({folder!r}), "chess"), Sampling(max_tokens=100_000))
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


def test_quit_in_the_middle_of_a_reply_exits_cleanly(shipped_model_dir):
    script = _QUIT_SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests"), folder=str(shipped_model_dir))
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "quit cleanly False" in r.stdout


def test_compare_flag_starts_in_compare_mode(tiny_calibrated):  # noqa: F811
    from app.chat import ChatApp

    import app.chat as chat_mod

    async def go():
        app = ChatApp(_session(tiny_calibrated, "cats"), Sampling(max_tokens=4), compare=True)
        release, warm = threading.Event(), chat_mod.warm_up
        chat_mod.warm_up = lambda model: (release.wait(30), warm(model))[1]  # the start's preparation, held
        try:
            async with app.run_test(size=(120, 40)) as pilot:
                await pilot.pause()
                screen = type(app.screen).__name__, app.compare.sparse.label
                inp = app.screen.query_one("#cmp-prompt")
                inp.value = "too early"
                await pilot.press("enter")
                early = inp.value, _notes(app)[-1]
                release.set()
                await _until(pilot, lambda: not app.preparing)
                await pilot.press("enter")
                await _until(pilot, lambda: app.replies >= 1)
                return screen, early, inp.value, app.compare.last is not None
        finally:
            release.set()
            chat_mod.warm_up = warm

    screen, early, after, compared = asyncio.run(go())
    assert screen == ("CompareScreen", "cats @ 0.5")
    assert early[0] == "too early" and "still being prepared" in early[1]  # kept, with a reason
    assert after == "" and compared


async def _slow_ui_flow(calibrated: Path, compare: bool) -> dict:
    """A reply (or a comparison) with a paint that holds the UI for 0.15 s, asked for at every
    token: the generation thread must run at its own speed, and the screen end on the whole reply."""
    import time

    import app.chat as chat_mod
    from app.chat import ChatApp
    from textual.widgets import Markdown

    app = ChatApp(_session(calibrated, "chess"), Sampling(max_tokens=40))
    seen: dict = {"paints": 0}
    session_cls = type(app.session)
    real_reply = session_cls.reply

    def timed_reply(self, *a, **k):  # when the generation thread got its first and last step
        for i, item in enumerate(real_reply(self, *a, **k)):
            seen.setdefault("first", time.perf_counter())
            seen["last"] = time.perf_counter()
            yield item

    async with app.run_test(size=(120, 40)) as pilot:
        await _until(pilot, lambda: not app.preparing)
        slow_target = app if not compare else None
        if compare:
            await pilot.press("f4")
            await pilot.pause()
            slow_target = app._compare_screen
        real_paint = slow_target._paint if not compare else slow_target.paint

        def slow_paint(*a):
            seen["paints"] += 1
            time.sleep(0.15)  # a slow terminal, or a long reply re-rendered
            return real_paint(*a)

        interval, chat_mod.PAINT_INTERVAL_S = chat_mod.PAINT_INTERVAL_S, 0.0
        session_cls.reply = timed_reply
        try:
            if compare:
                slow_target.paint = slow_paint
                app.screen.query_one("#cmp-prompt").value = "count to twenty"
            else:
                app._paint = slow_paint
                app.query_one("#prompt").value = "count to twenty"
            await pilot.press("enter")
            await _until(pilot, lambda: app.replies >= 1)
            await pilot.pause()
        finally:
            chat_mod.PAINT_INTERVAL_S = interval
            session_cls.reply = real_reply
        if compare:
            seen["shown"] = {s: app._compare_screen._md[s].source for s in ("dense", "sparse")}
            seen["replies"] = {s: r.text for s, r in (("dense", app.compare.last.dense), ("sparse", app.compare.last.sparse))}
        else:
            seen["shown"] = {"chat": app.query(Markdown).last().source}
            seen["replies"] = {"chat": app.last_reply.text}
        seen["tokens"] = app.last_step.generation_tokens
    return seen


def test_a_slow_screen_does_not_slow_the_reply(tiny_calibrated):  # noqa: F811
    """Paints are handed to the UI without the generation thread waiting for them: the newest
    is painted, the ones the UI had no time for are skipped. (With the UI waited on at every
    paint, 40 tokens took 40 x 0.15 s.)"""
    for compare in (False, True):
        seen = asyncio.run(_slow_ui_flow(tiny_calibrated, compare))
        steps = seen["tokens"] * (2 if compare else 1)
        took = seen["last"] - seen["first"]
        assert seen["tokens"] == 40 and took < 0.15 * steps / 4, (compare, took, seen["paints"])
        assert seen["paints"] < steps / 2, (compare, seen["paints"])  # coalesced
        assert seen["shown"] == seen["replies"], compare  # the final paint is the whole reply


def test_app_probe_drives_the_app_and_the_library_on_the_cpu(tiny_calibrated):  # noqa: F811
    """benchmarks/app_probe.py (run on a GPU to set the app's replies beside the library's) runs
    through: the start's preparation, two turns, F2, one compare turn, the library's replies."""
    from test_kernels_cpu import bench_module

    probe = bench_module("app_probe")
    out = asyncio.run(probe._drive(tiny_calibrated, "chess", 6))
    assert [r["method"] for r in out["replies"]] == ["chess @ 0.5", "chess @ 0.5", "chess-attn @ 0.5"]
    assert all(r["tokens"] == 6 and r["tok_s"] > 0 for r in out["replies"])
    assert out["replies"][2]["attn_sparsity"] > 0 and "chess-attn" in out["panel_last"]
    assert "x dense tokens/s" in out["compare"]["summary"]
    assert set(out["direct"]) == {"chess", "chess-attn"} and all(d["tokens"] == 6 for d in out["direct"].values())


def test_replies_before_the_newest_three_are_frozen_into_one_widget_each(tiny_calibrated):  # noqa: F811
    """A long chat stays cheap to repaint: each finished reply older than the newest three
    becomes one Static of the same text (a Textual Markdown is a widget per block, and a
    streaming reply lays out the whole log at every repaint), in its place in the log."""
    from app.live import KEEP_LIVE
    from textual.widgets import Markdown, Static

    async def go():
        app = ChatApp(_session(tiny_calibrated, "chess"), Sampling(max_tokens=5))
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: not app.preparing)
            for i in range(KEEP_LIVE + 2):
                app.query_one("#prompt").value = f"question {i}"
                await pilot.press("enter")
                await _until(pilot, lambda: app.replies > i)
            await pilot.pause()
            log = list(app.query_one("#log").children)
            kinds = ["md" if isinstance(w, Markdown) else "frozen" if w.has_class("frozen") else
                     "user" if w.has_class("user") else type(w).__name__ for w in log]
            frozen = [w.content.markup for w in log if isinstance(w, Static) and w.has_class("frozen")]
            live = [w.source for w in log if isinstance(w, Markdown)]
            return kinds, frozen, live, [t.answers[0].text for t in app.session.turns]

    from app.chat import ChatApp

    kinds, frozen, live, texts = asyncio.run(go())
    assert kinds == ["user", "frozen"] * 2 + ["user", "md"] * KEEP_LIVE, kinds
    assert frozen + live == texts and all(texts)

    async def go_compare():  # each side's log the same way
        app = ChatApp(_session(tiny_calibrated, "chess"), Sampling(max_tokens=4), compare=True)
        async with app.run_test(size=(120, 40)) as pilot:
            await _until(pilot, lambda: not app.preparing)
            for i in range(KEEP_LIVE + 1):
                app.screen.query_one("#cmp-prompt").value = f"question {i}"
                await pilot.press("enter")
                await _until(pilot, lambda: app.replies > i)
            await pilot.pause()
            out = {}
            for side, log in zip(("dense", "sparse"), app.screen.logs()):
                out[side] = ([w.content.markup for w in log.children if w.has_class("frozen")],
                             [w.source for w in log.children if isinstance(w, Markdown)])
            answers = {s: [t.answers[k].text for t in app.compare.turns] for k, s in enumerate(("dense", "sparse"))}
            return out, answers

    out, answers = asyncio.run(go_compare())
    for side in ("dense", "sparse"):
        frozen, live = out[side]
        assert len(frozen) == 1 and len(live) == KEEP_LIVE and frozen + live == answers[side], side
