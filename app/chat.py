"""The chess-mlx chat app (Textual): streaming replies and the library's live statistics.

Generation (``ChatSession.reply`` / ``CompareSession.reply``) runs on the process's one MLX thread
(``mlx_thread``), awaited by a Textual worker; the UI only formats what each ``Step`` reports.
Quitting during a reply stops it and waits for it before the interpreter exits.
"""

from __future__ import annotations

import time
from functools import partial
from pathlib import Path
from typing import Iterable, Optional

from textual.app import App, ComposeResult, SystemCommand
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import Screen
from textual.widgets import Footer, Header, Input, Markdown, Sparkline, Static

from chess_mlx import methods as M
from chess_mlx import transcript
from chess_mlx.chat_session import ChatSession, Reply
from chess_mlx.compare import CompareSession
from chess_mlx.errors import ChessError, out_of_memory
from chess_mlx import mlx_thread
from chess_mlx.generate import Step, needs_warm_up, warm_up
from chess_mlx.sampling import Sampling

from .live import Latest, freeze_old_replies, settled, show_markdown
from .screens import CompareScreen, HelpScreen, SettingsScreen, SystemPromptScreen
from .stats_view import stats_text

# The reply stops, the app and the history stay: a long history is what usually fills the device.
_NO_MEMORY = ("out of device memory: the reply stopped. Clear the conversation (ctrl+l), shorten the "
              "prompt, or close other programs using the GPU")

# Repaint at most 10 times a second; tokens come faster. Each paint re-lays out and renders the
# screen in Python (~20-40 ms on a slow CPU), which the host-bound decode threads wait for at the
# GIL: a streamed reply held the UI thread 36% of the time at 20 paints a second, 27% at 10.
PAINT_INTERVAL_S = 0.1


def _final_text(reply: Reply) -> str:
    return reply.text + ("\n\n*(stopped)*" if reply.stopped else "")


class ChatApp(App):
    TITLE = "chess-mlx chat"
    CSS = """
    #log { width: 3fr; padding: 0 1; }
    #side { width: 36; border-left: solid $accent; padding: 0 1; }
    .user { margin: 1 0 0 0; color: $text-muted; }
    .frozen { padding: 0 2 1 2; }
    #layers, #attn-layers { height: 3; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("f1", "help", "Help"),
        Binding("f2", "next_method", "Method"),
        Binding("f3", "next_level", "Sparsity"),
        Binding("f4", "compare", "Compare"),
        Binding("f5", "system_prompt", "System prompt", show=False),
        Binding("f6", "settings", "Settings", show=False),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+s", "save", "Save"),
        Binding("ctrl+l", "clear", "Clear", show=False),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]
    HELP = {  # longer descriptions for the help screen and the command palette
        "stop": "Stop the reply now (what was generated is kept)",
        "help": "Show every key",
        "next_method": "Next method: dense, CATS, CHESS, CHESS+attn, TEAL (no weight reload)",
        "next_level": "Next calibrated sparsity level",
        "compare": "Compare mode: dense and sparse answer side by side (F4 again to return)",
        "system_prompt": "Edit the system prompt",
        "settings": "Sampling settings: temperature, top-p, max tokens",
        "regenerate": "Regenerate the last reply",
        "save": "Save the conversation with its stats to Markdown",
        "clear": "Clear the conversation",
        "quit": "Quit (stops a running reply first)",
    }

    def __init__(self, session: ChatSession, sampling: Optional[Sampling] = None, startup_notice: str = "",
                 compare: bool = False, save_dir: Optional[Path] = None, model_name: str = ""):
        super().__init__()
        self.session = session
        self.sampling = sampling or Sampling()
        self.startup_notice = startup_notice
        self.start_in_compare = compare
        self.save_dir = Path(save_dir) if save_dir is not None else Path.cwd()
        self.model_name = model_name
        self.compare: Optional[CompareSession] = None
        self._compare_screen: Optional[CompareScreen] = None
        self.generating = False  # a reply, or a method's one-time preparation, is running
        self.preparing = False
        self._pending: Optional[str] = None  # a message sent while preparing, sent when it is done
        self.last_step: Optional[Step] = None
        self.last_reply: Optional[Reply] = None
        self.replies = 0  # finished replies (chat) and finished comparisons
        self.last_saved: Optional[Path] = None
        self._stop = session.stop
        self._md: Optional[Markdown] = None
        self._last_paint = 0.0
        # paints from the generation thread, which never waits for them (app/live.py)
        self._live = Latest(self, lambda key, *a: self._paint(*a) if key == "chat" else self._compare_screen.paint(key, *a))

    # -- layout -------------------------------------------------------------------------------
    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield VerticalScroll(id="log")
            with Vertical(id="side"):
                yield Static(self._stats(None, None), id="stats")
                yield Static("FFN sparsity per layer", classes="user")
                yield Sparkline([], id="layers")
                yield Static("attention sparsity per layer", classes="user")
                yield Sparkline([], id="attn-layers")
        yield Input(placeholder="Message (Enter to send, F1 help)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self._show_sampling()
        self.query_one("#prompt", Input).focus()
        if self.startup_notice:
            self.notify(self.startup_notice, severity="warning", timeout=10)
        if self.start_in_compare:
            self.action_compare()
        self._prepare(self.session)

    def _show_sampling(self) -> None:
        self.sub_title = f"{self.model_name}  ·  {self.sampling.describe()}".strip(" ·")

    def _stats(self, step: Optional[Step], reply: Optional[Reply]) -> str:
        return stats_text(self.session.label, step, reply, self.session.context_limit)

    def _in_compare(self) -> bool:
        return self._compare_screen is not None and self._compare_screen in self.screen_stack

    def _target(self) -> ChatSession:
        """The session F2/F3 act on: the sparse side in compare mode, else the chat."""
        return self.compare.sparse if self._in_compare() else self.session

    def _main(self) -> Screen:
        """The chat screen, wherever the app is (dialogs and compare mode sit on top of it)."""
        return self.screen_stack[0]

    # -- chat ---------------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.input.id != "prompt":
            return
        text = event.value
        if self.preparing and self._pending is None and text.strip() and not self._in_compare():
            event.input.value = ""
            self._main().query_one("#log").mount(Static(f"> {text}", classes="user"))
            self._pending = text  # sent as soon as the method is ready (_warmed)
            return
        if not text.strip() or self.generating:
            return  # empty prompts are ignored; one reply at a time
        event.input.value = ""
        self._main().query_one("#log").mount(Static(f"> {text}", classes="user"))
        self._start(text)

    def _start(self, text: Optional[str]) -> None:
        self._md = Markdown("")
        self._main().query_one("#log").mount(self._md)
        self.generating, self._stop = True, self.session.stop
        self.run_worker(mlx_thread.shared().run(partial(self._generate, text)), exclusive=True, group="gen")

    def _throttled(self, final: bool) -> bool:
        now = time.monotonic()
        if final or now - self._last_paint > PAINT_INTERVAL_S:
            self._last_paint = now
            return True
        return False

    def _generate(self, text: Optional[str]) -> None:
        reply = None
        try:
            for step, reply in self.session.reply(text, max_tokens=self.sampling.max_tokens,
                                                   sampler=self.sampling.sampler()):
                if self._throttled(step.finish_reason is not None):
                    self._live.put("chat", reply.text, step, reply)
        except ChessError as e:
            self.call_from_thread(self.notify, str(e), severity="error")
        except (RuntimeError, MemoryError) as e:
            self._out_of_memory(e)
        finally:
            self.call_later(self._done, reply)  # behind the paints queued before it

    def _out_of_memory(self, e: BaseException) -> None:
        """From the generation thread: an out-of-memory error becomes a notice (the reply stops,
        the app and the history stay); anything else is a bug and is raised again."""
        if not out_of_memory(e):
            raise e
        self.call_from_thread(self.notify, _NO_MEMORY, severity="error", timeout=15)

    def _paint(self, text: str, step: Step, reply: Reply):
        """Show a step of the reply; returns the Markdown change in progress (to be awaited)."""
        self.last_step, self.last_reply = step, reply
        shown = show_markdown(self._md, text) if self._md is not None else None
        screen = self._main()
        screen.query_one("#stats", Static).update(self._stats(step, reply))
        per_layer = reply.mean if reply.mean is not None else step.stats
        screen.query_one("#layers", Sparkline).data = list(per_layer.ffn_per_layer)
        screen.query_one("#attn-layers", Sparkline).data = list(per_layer.attn_per_layer)
        screen.query_one("#log", VerticalScroll).scroll_end(animate=False)
        return shown

    async def _done(self, reply: Optional[Reply]) -> None:
        self._live.drop()
        try:
            if reply is not None and reply.last is not None:
                await settled(self._paint(_final_text(reply), reply.last, reply))
                if reply.notice:
                    self.notify(reply.notice, severity="warning")
            await freeze_old_replies(self._main().query_one("#log"))  # a long chat stays cheap to repaint
        finally:
            self.generating = False
            self.replies += 1

    # -- compare ------------------------------------------------------------------------------
    def start_compare(self, text: str) -> bool:
        """Called by the compare screen's input; False when the prompt was not taken."""
        if self.preparing:
            self.notify("the method is still being prepared; send again in a moment", severity="warning")
            return False
        if self.generating or self.compare is None or not text.strip():
            return False
        self._compare_screen.begin(text)
        self.generating, self._stop = True, self.compare.stop
        self.run_worker(mlx_thread.shared().run(partial(self._generate_compare, text)), exclusive=True, group="gen")
        return True

    def _generate_compare(self, text: str) -> None:
        last: dict = {}
        try:
            for side, step, reply in self.compare.reply(text, max_tokens=self.sampling.max_tokens):
                final = step.finish_reason is not None or side not in last
                last[side] = (step, reply)
                if self._throttled(final):
                    self._live.put(side, reply.text, step, reply)
        except ChessError as e:
            self.call_from_thread(self.notify, str(e), severity="error")
        except (RuntimeError, MemoryError) as e:
            self._out_of_memory(e)
        finally:
            self.call_later(self._done_compare, last)

    async def _done_compare(self, last: dict) -> None:
        self._live.drop()
        screen = self._compare_screen
        try:
            for side, (step, reply) in last.items():
                await settled(screen.paint(side, _final_text(reply), step, reply))
                self.last_step, self.last_reply = step, reply
            done = self.compare.last
            screen.finish(done.summary() if done is not None else "stopped before both sides answered")
            for log in screen.logs():
                await freeze_old_replies(log)
        finally:
            self.generating = False
            self.replies += 1

    def action_compare(self) -> None:
        """Toggle compare mode (the sparse side uses the chat's method, or CHESS when that is dense)."""
        if self.generating:
            self.notify("wait for the reply to finish (Esc stops it)", severity="warning")
            return
        if self._in_compare():
            if self.screen is self._compare_screen:
                self.pop_screen()
            return
        if self.compare is None:
            try:
                self.compare = CompareSession(self.session)
            except ChessError as e:
                self.notify(str(e), severity="error")
                return
            self._compare_screen = CompareScreen(self.compare)
        self.push_screen(self._compare_screen)

    # -- actions ------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.generating:
            self._stop()

    def _switch(self, method: str, level: Optional[float]) -> None:
        target = self._target()
        try:
            target.set_method(method, level)
        except ChessError as e:
            self.notify(str(e), severity="error")
        else:
            self._prepare(target)
        if self._in_compare():
            self._compare_screen.refresh_titles()
        else:
            self._main().query_one("#stats", Static).update(self._stats(self.last_step, self.last_reply))

    def _prepare(self, target: ChatSession) -> None:
        """Run a method the process has not run yet once, on the generation thread, when the app
        starts and as soon as a method is chosen (``generate.warm_up``: its kernels compile,
        seconds on CUDA), so its first reply's TTFT is the prompt's. A message sent meanwhile is
        shown and sent when it is done."""
        if not needs_warm_up(target.model):
            return
        self.generating = self.preparing = True
        self.notify(f"preparing {target.label}: its kernels compile once per process...", timeout=4)
        self.run_worker(mlx_thread.shared().run(partial(self._warm, target.model)), exclusive=True, group="gen")

    def _warm(self, model) -> None:
        try:
            warm_up(model)
        except (RuntimeError, MemoryError) as e:
            self._out_of_memory(e)
        finally:
            self.call_from_thread(self._warmed)

    def _warmed(self) -> None:
        self.generating = self.preparing = False
        text, self._pending = self._pending, None
        if text is not None:
            self._start(text)

    def action_next_method(self) -> None:
        if self.generating:
            return
        target = self._target()
        methods = target.methods() if not self._in_compare() else list(M.SPARSE_METHODS)
        if len(methods) == 1:
            self.notify("this model folder has no calibrated thresholds: only dense is available",
                        severity="warning")
            return
        i = methods.index(target.method) if target.method in methods else -1
        self._switch(methods[(i + 1) % len(methods)], target.sparsity)

    def action_next_level(self) -> None:
        target = self._target()
        levels = target.levels()
        if self.generating or target.method == M.DENSE or len(levels) < 2:
            return
        self._switch(target.method, levels[(levels.index(target.sparsity) + 1) % len(levels)])

    def action_regenerate(self) -> None:
        if self._in_compare():
            self.notify("regenerate works in the chat view; in compare mode send the prompt again")
        elif not self.generating and self.session.messages:
            self._start(None)

    def action_clear(self) -> None:
        if self.generating:
            return
        if self._in_compare():
            self.compare.clear()
            self._compare_screen.clear()
        else:
            self.session.clear()
            self._main().query_one("#log").remove_children()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            rows = [(b.key, self.HELP.get(b.action, b.description)) for b in self.BINDINGS]
            rows.append(("ctrl+p", "Command palette (every action above, searchable)"))
            self.push_screen(HelpScreen(rows))

    def action_settings(self) -> None:
        def apply(value: Optional[Sampling]) -> None:
            if value is not None:
                self.sampling = value
                self._show_sampling()
                self.notify(f"sampling: {value.describe()}")

        self.push_screen(SettingsScreen(self.sampling), apply)

    def action_system_prompt(self) -> None:
        def apply(value: Optional[str]) -> None:
            if value is not None:
                self.session.system_prompt = value
                if self.compare is not None:
                    self.compare.system_prompt = value
                self.notify("system prompt " + ("cleared" if not value else "set; it applies from the next reply"))

        self.push_screen(SystemPromptScreen(self.session.system_prompt), apply)

    def action_save(self) -> None:
        if self.generating:
            self.notify("wait for the reply to finish (Esc stops it), then save", severity="warning")
            return
        turns = self.compare.turns if self._in_compare() else self.session.turns
        if not turns:
            self.notify("nothing to save yet", severity="warning")
            return
        text = transcript.to_markdown(turns, self.session.system_prompt, self.model_name, self.sampling.describe())
        try:
            self.last_saved = transcript.save(text, self.save_dir)
        except ChessError as e:
            self.notify(str(e), severity="error")
            return
        self.notify(f"saved to {self.last_saved}")

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        for b in self.BINDINGS:
            if b.action != "quit":  # Textual already lists Quit
                yield SystemCommand(b.description, f"{self.HELP.get(b.action, '')} [{b.key}]",
                                    partial(self.run_action, b.action))

    async def action_quit(self) -> None:
        if self.generating:
            self._stop()
            await self.workers.wait_for_complete()
        self.exit()
