"""Streamed text onto the screen without slowing the stream: what the generation thread hands the
UI, and how a growing reply is shown.

Why: the app used to paint with ``call_from_thread``, which makes the generation thread wait until
the UI has painted, and each paint re-parsed the whole reply as Markdown. On a GPU the decode is
bound by the host, so those waits were the app's speed: 130-172 tok/s in the app where the library
decoded the same replies at 214-246 (4-bit Llama-3-8B shape on an H100, RESULTS.md session 34).
"""

from __future__ import annotations

import inspect
import threading
from typing import Any, Awaitable, Callable, Hashable, Optional

from rich.markdown import Markdown as RichMarkdown
from textual.app import App
from textual.widget import Widget
from textual.widgets import Markdown, Static


class Latest:
    """The newest painting per key (the chat, or a compare side), handed from a worker thread to
    the UI thread without the worker ever waiting: ``put`` replaces what the UI has not painted
    yet and wakes the UI (a message on the app's queue) only when no wake-up is queued; the UI
    paints the newest and skips the rest. Post the reply's end on the same queue
    (``App.call_later``), so it is handled after every paint before it. ``drop`` discards what
    is not painted yet."""

    def __init__(self, app: App, paint: Callable[..., Any]):
        self._app, self._paint = app, paint
        self._lock = threading.Lock()
        self._slots: dict[Hashable, tuple] = {}
        self._queued = False

    def put(self, key: Hashable, *args: Any) -> None:
        with self._lock:
            self._slots[key] = args
            wake, self._queued = not self._queued, True
        if wake:
            self._app.call_later(self._flush)

    async def _flush(self) -> None:
        with self._lock:
            slots, self._slots, self._queued = self._slots, {}, False
        for key, args in slots.items():
            await settled(self._paint(key, *args))

    def drop(self) -> None:
        with self._lock:
            self._slots = {}


async def settled(result: Any) -> None:
    """Await a painter's result where it is awaitable (a Markdown change in progress)."""
    if inspect.isawaitable(result):
        await result


def show_markdown(md: Markdown, text: str) -> Optional[Awaitable]:
    """Show ``text`` in ``md``: a reply only grows while it streams, so append what is new
    (Textual re-parses from the last block only, where ``update`` re-parses the whole reply);
    replace it when it changed otherwise. Returns the change in progress: the caller awaits it
    before the next, as two of Textual's appends must not overlap (the second would parse from
    a line the first has moved)."""
    shown = md.source
    if text.startswith(shown):
        return md.append(text[len(shown):]) if len(text) > len(shown) else None
    return md.update(text)


KEEP_LIVE = 3  # the newest replies of a chat log that stay Textual Markdown widgets


async def freeze_old_replies(log: Widget, keep: int = KEEP_LIVE) -> None:
    """Turn all but the newest ``keep`` replies in ``log`` into one widget each: the same text as
    a rich Markdown in a ``Static``. Why: Textual's Markdown is a widget per block, and every
    repaint of a streaming reply lays out the whole log again. With 30 earlier replies of six
    paragraphs, a reply streaming at 250 tok/s held the UI thread 45-53% of the time on this
    project's CPU box, 32-33% with them frozen and 21-23% with none (RESULTS.md session 34)."""
    live = [w for w in log.children if isinstance(w, Markdown)]
    for md in live[:max(0, len(live) - keep)]:
        await log.mount(Static(RichMarkdown(md.source), classes="frozen"), after=md)
        await md.remove()
