"""The chess-mlx chat app (Textual): streaming replies and the library's live statistics.

Generation runs in a worker thread (``ChatSession.reply``); the UI only formats what each
``Step`` reports. Quitting during a reply stops the worker and waits for it before the
interpreter exits (a live MLX generation thread at exit can abort Python).
"""

from __future__ import annotations

import time
from typing import Optional

from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Footer, Header, Input, Markdown, Sparkline, Static

from chess_mlx.chat_session import ChatSession, Reply
from chess_mlx.errors import ChessError
from chess_mlx.generate import Step


def stats_text(session: ChatSession, step: Optional[Step], reply: Optional[Reply]) -> str:
    level = "" if session.sparsity is None else f" @ {session.sparsity:g}"
    lines = [f"[b]{session.method}{level}[/b]"]
    if step is None:
        return "\n".join(lines + ["", "(no reply yet)"])
    s = step.stats
    lines += [
        "",
        f"tokens/s        {step.generation_tps:8.1f}",
        f"TTFT            {step.ttft:8.2f} s",
        f"prompt tok/s    {step.prompt_tps:8.1f}",
        f"generated       {step.generation_tokens:8d}",
        f"context         {(reply.context_tokens if reply else 0) + step.generation_tokens:8d} / {session.context_limit}",
        "",
        f"FFN sparsity    {s.ffn_sparsity:8.1%}",
        f"attn sparsity   {s.attn_sparsity:8.1%}",
        f"weights/token   {s.bytes_fraction:8.1%} of dense",
        f"  ({s.bytes_read / 1e6:.1f} / {s.bytes_dense / 1e6:.1f} MB)",
        "",
        f"MLX active mem  {step.active_memory_gb:8.2f} GB",
        f"MLX peak mem    {step.peak_memory_gb:8.2f} GB",
    ]
    if reply is not None and reply.notice:
        lines += ["", f"[yellow]{reply.notice}[/yellow]"]
    return "\n".join(lines)


class ChatApp(App):
    TITLE = "chess-mlx chat"
    CSS = """
    #log { width: 3fr; padding: 0 1; }
    #side { width: 36; border-left: solid $accent; padding: 0 1; }
    .user { margin: 1 0 0 0; color: $text-muted; }
    #layers { height: 3; }
    """
    BINDINGS = [
        Binding("escape", "stop", "Stop"),
        Binding("f2", "next_method", "Method"),
        Binding("f3", "next_level", "Sparsity"),
        Binding("ctrl+r", "regenerate", "Regenerate"),
        Binding("ctrl+l", "clear", "Clear"),
        Binding("ctrl+q", "quit", "Quit", priority=True),
    ]

    def __init__(self, session: ChatSession, max_tokens: int = 256, sampler=None, startup_notice: str = ""):
        super().__init__()
        self.session, self.max_tokens, self.sampler = session, max_tokens, sampler
        self.startup_notice = startup_notice
        self.generating = False
        self.last_step: Optional[Step] = None
        self.last_reply: Optional[Reply] = None
        self.replies = 0
        self._md: Optional[Markdown] = None
        self._last_paint = 0.0

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal():
            yield VerticalScroll(id="log")
            with Vertical(id="side"):
                yield Static(stats_text(self.session, None, None), id="stats")
                yield Static("FFN sparsity per layer", classes="user")
                yield Sparkline([], id="layers")
        yield Input(placeholder="Message (Enter to send)", id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#prompt", Input).focus()
        if self.startup_notice:
            self.notify(self.startup_notice, severity="warning", timeout=10)

    # -- sending ------------------------------------------------------------------------------
    def on_input_submitted(self, event: Input.Submitted) -> None:
        text = event.value
        if not text.strip() or self.generating:
            return  # empty prompts are ignored; one reply at a time
        event.input.value = ""
        self.query_one("#log").mount(Static(f"> {text}", classes="user"))
        self._start(text)

    def _start(self, text: Optional[str]) -> None:
        self._md = Markdown("")
        self.query_one("#log").mount(self._md)
        self.generating = True
        self.run_worker(lambda: self._generate(text), thread=True, exclusive=True, group="gen")

    def _generate(self, text: Optional[str]) -> None:
        reply = None
        try:
            for step, reply in self.session.reply(text, max_tokens=self.max_tokens, sampler=self.sampler):
                now = time.monotonic()
                if now - self._last_paint > 0.05 or step.finish_reason:
                    self._last_paint = now
                    self.call_from_thread(self._paint, reply.text, step, reply)
        except ChessError as e:
            self.call_from_thread(self.notify, str(e), severity="error")
        finally:
            self.call_from_thread(self._done, reply)

    def _paint(self, text: str, step: Step, reply: Reply) -> None:
        self.last_step, self.last_reply = step, reply
        if self._md is not None:
            self._md.update(text)
        self.query_one("#stats", Static).update(stats_text(self.session, step, reply))
        self.query_one("#layers", Sparkline).data = list(step.stats.ffn_per_layer)
        self.query_one("#log", VerticalScroll).scroll_end(animate=False)

    def _done(self, reply: Optional[Reply]) -> None:
        if reply is not None and reply.last is not None:
            self._paint(reply.text + ("\n\n*(stopped)*" if reply.stopped else ""), reply.last, reply)
        self.generating = False
        self.replies += 1

    # -- actions ------------------------------------------------------------------------------
    def action_stop(self) -> None:
        if self.generating:
            self.session.stop()

    def _switch(self, method: str, level: Optional[float]) -> None:
        try:
            self.session.set_method(method, level)
        except ChessError as e:
            self.notify(str(e), severity="error")
        self.query_one("#stats", Static).update(stats_text(self.session, self.last_step, self.last_reply))

    def action_next_method(self) -> None:
        if self.generating:
            return
        methods = self.session.methods()
        if len(methods) == 1:
            self.notify("this model folder has no calibrated thresholds: only dense is available",
                        severity="warning")
            return
        self._switch(methods[(methods.index(self.session.method) + 1) % len(methods)], self.session.sparsity)

    def action_next_level(self) -> None:
        levels = self.session.levels()
        if self.generating or self.session.method == "dense" or len(levels) < 2:
            return
        self._switch(self.session.method, levels[(levels.index(self.session.sparsity) + 1) % len(levels)])

    def action_regenerate(self) -> None:
        if not self.generating and self.session.messages:
            self._start(None)

    def action_clear(self) -> None:
        if not self.generating:
            self.session.clear()
            self.query_one("#log").remove_children()

    async def action_quit(self) -> None:
        if self.generating:
            self.session.stop()
            await self.workers.wait_for_complete()
        self.exit()
