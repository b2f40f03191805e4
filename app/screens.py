"""The app's other screens: compare (dense | sparse columns), help, settings, system prompt.

Screens only lay out and forward input; generation and all state live in ``ChatApp`` and the
library's sessions.
"""

from __future__ import annotations

from typing import Optional

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Footer, Header, Input, Label, Markdown, Static, TextArea

from chess_mlx.chat_session import Reply
from chess_mlx.compare import SIDES, CompareSession
from chess_mlx.errors import ChessError
from chess_mlx.generate import Step
from chess_mlx.sampling import Sampling

from .live import show_markdown
from .stats_view import stats_text


class CompareScreen(Screen):
    """Dense and sparse answers to the same prompt, side by side, with each side's stats."""

    DEFAULT_CSS = """
    CompareScreen #cols { height: 1fr; }
    CompareScreen .col { width: 1fr; border: round $accent; padding: 0 1; }
    CompareScreen .title { text-style: bold; }
    CompareScreen .clog { height: 1fr; }
    CompareScreen .cstats { height: auto; border-top: solid $accent; }
    CompareScreen .user { margin: 1 0 0 0; color: $text-muted; }
    CompareScreen #verdict { height: auto; padding: 0 1; text-style: bold; }
    """
    BINDINGS = [Binding("f4", "app.compare", "Back to chat")]

    def __init__(self, cmp: CompareSession):
        super().__init__()
        self.cmp = cmp
        self._md: dict[str, Markdown] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        with Horizontal(id="cols"):
            for side in SIDES:
                with Vertical(classes="col", id=f"col-{side}"):
                    yield Static(self._title(side), classes="title", id=f"title-{side}")
                    yield VerticalScroll(id=f"log-{side}", classes="clog")
                    yield Static(self._stats(side, None, None), classes="cstats", id=f"stats-{side}")
        yield Static("Compare mode: each prompt is answered greedily by dense, then by the sparse method.",
                     id="verdict")
        yield Input(placeholder="Prompt for both models (Enter to send, F4 back to chat)", id="cmp-prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#cmp-prompt", Input).focus()

    def _title(self, side: str) -> str:
        return self.cmp.sessions[side].label

    def _stats(self, side: str, step: Optional[Step], reply: Optional[Reply]) -> str:
        s = self.cmp.sessions[side]
        return stats_text(s.label, step, reply, s.context_limit, compact=True)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        if event.value.strip() and self.app.start_compare(event.value):
            event.input.value = ""

    def begin(self, text: str) -> None:
        for side in SIDES:
            log = self.query_one(f"#log-{side}", VerticalScroll)
            log.mount(Static(f"> {text}", classes="user"))
            self._md[side] = Markdown("")
            log.mount(self._md[side])
        self.query_one("#verdict", Static).update("dense is answering…")

    def paint(self, side: str, text: str, step: Step, reply: Reply):
        """Show a step of one side; returns the Markdown change in progress (to be awaited)."""
        shown = show_markdown(self._md[side], text) if side in self._md else None
        self.query_one(f"#stats-{side}", Static).update(self._stats(side, step, reply))
        self.query_one(f"#log-{side}", VerticalScroll).scroll_end(animate=False)
        if side == "sparse":
            self.query_one("#verdict", Static).update(f"{self.cmp.sparse.label} is answering…")
        return shown

    def logs(self) -> list[VerticalScroll]:
        """Each side's log, dense first."""
        return [self.query_one(f"#log-{side}", VerticalScroll) for side in SIDES]

    def finish(self, verdict: str) -> None:
        self.query_one("#verdict", Static).update(verdict)

    def refresh_titles(self) -> None:
        for side in SIDES:
            self.query_one(f"#title-{side}", Static).update(self._title(side))

    def clear(self) -> None:
        for side in SIDES:
            self.query_one(f"#log-{side}").remove_children()
            self.query_one(f"#stats-{side}", Static).update(self._stats(side, None, None))
        self._md = {}
        self.query_one("#verdict", Static).update("")


class HelpScreen(ModalScreen[None]):
    """Every key, generated from the app's bindings so it cannot go stale."""

    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 72; height: auto; max-height: 90%; border: thick $accent; padding: 1 2;
                            background: $surface; }
    """
    BINDINGS = [Binding("escape,f1,q", "dismiss", "Close")]

    def __init__(self, rows: list[tuple[str, str]]):
        super().__init__()
        self.rows = rows

    def compose(self) -> ComposeResult:
        table = "\n".join(f"| `{k}` | {d} |" for k, d in self.rows)
        with Vertical():
            yield Markdown(
                "# chess-mlx chat: keys\n\n| key | action |\n|---|---|\n" + table
                + "\n\nEvery action is also in the command palette (`ctrl+p`). Methods: dense, CATS (one "
                "threshold per layer), CHESS (one per FFN channel), CHESS+attn (also q/o inputs), TEAL "
                "(inputs of every projection). Sparsity levels are those the model folder was calibrated "
                "for.\n\n*Esc or F1 closes this screen.*")


class SettingsScreen(ModalScreen[Optional[Sampling]]):
    """Temperature, top-p and max tokens; checked by ``Sampling`` before they are taken."""

    DEFAULT_CSS = """
    SettingsScreen { align: center middle; }
    SettingsScreen > Vertical { width: 60; height: auto; border: thick $accent; padding: 1 2; background: $surface; }
    SettingsScreen #error { color: $error; height: auto; }
    SettingsScreen Horizontal { height: auto; }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel")]

    def __init__(self, current: Sampling):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        c = self.current
        with Vertical():
            yield Label("[b]Sampling settings[/b]  (temperature 0 = greedy)")
            yield Label("temperature")
            yield Input(f"{c.temperature:g}", id="temperature")
            yield Label("top-p")
            yield Input(f"{c.top_p:g}", id="top_p")
            yield Label("max tokens per reply")
            yield Input(str(c.max_tokens), id="max_tokens")
            yield Static("", id="error")
            with Horizontal():
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def _apply(self) -> None:
        try:
            value = Sampling.parse(*(self.query_one(f"#{k}", Input).value
                                     for k in ("temperature", "top_p", "max_tokens")))
        except ChessError as e:
            self.query_one("#error", Static).update(str(e))
            return
        self.dismiss(value)

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self._apply()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self._apply()
        else:
            self.dismiss(None)


class SystemPromptScreen(ModalScreen[Optional[str]]):
    """Edit the system prompt; it applies from the next reply (the KV cache keeps what still matches)."""

    DEFAULT_CSS = """
    SystemPromptScreen { align: center middle; }
    SystemPromptScreen > Vertical { width: 80; height: 20; border: thick $accent; padding: 1 2; background: $surface; }
    SystemPromptScreen TextArea { height: 1fr; }
    SystemPromptScreen Horizontal { height: auto; }
    """
    BINDINGS = [Binding("escape", "dismiss(None)", "Cancel"), Binding("ctrl+s", "apply", "Apply", priority=True)]

    def __init__(self, current: str):
        super().__init__()
        self.current = current

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Label("[b]System prompt[/b]  (ctrl+s apply, esc cancel; empty = none)")
            yield TextArea(self.current, id="system")
            with Horizontal():
                yield Button("Apply", variant="primary", id="apply")
                yield Button("Cancel", id="cancel")

    def on_mount(self) -> None:
        self.query_one(TextArea).focus()

    def action_apply(self) -> None:
        self.dismiss(self.query_one(TextArea).text.strip())

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "apply":
            self.action_apply()
        else:
            self.dismiss(None)
