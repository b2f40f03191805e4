"""Threads that last for the life of the process and run MLX work in order: the chat app's
generation thread (``shared``, off the UI thread) and the two-thread decode's encoder
(``pipelined``).

Why not a thread per job (e.g. Textual's thread workers per reply): MLX 0.32 keeps ``mx.compile``'s cache per
thread, and a thread that ends destroys that cache in a C++ thread-exit handler that needs the
GIL. When the handler runs while the interpreter is shutting down, Python aborts with "terminate
called without an active exception" (seen about once in 40 quits in the middle of a reply under
load; the backtrace is the worker thread's ``__call_tls_dtors`` -> ``CompileCache`` ->
``PyGILState_Ensure``; ml-explore/mlx#3619). A thread that never ends never runs the handler: at
exit it is a daemon blocked on its queue, and the process ends around it.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Optional

_Job = tuple[Future, Callable[[], Any]]


class MLXThread:
    """A daemon thread running submitted jobs one at a time, in order (started by the first job)."""

    def __init__(self, name: str = "chess-mlx-worker") -> None:
        self._jobs: "queue.SimpleQueue[_Job]" = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._lock = threading.Lock()
        self._started = False

    def submit(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn()`` on the thread; its result or exception lands in the returned future."""
        with self._lock:
            if not self._started:
                self.thread.start()
                self._started = True
        fut: Future = Future()
        self._jobs.put((fut, fn))
        return fut

    async def run(self, fn: Callable[[], Any]) -> Any:
        """``submit`` and await the result from an asyncio loop (a Textual worker)."""
        return await asyncio.wrap_future(self.submit(fn))

    def _loop(self) -> None:
        while True:
            fut, fn = self._jobs.get()
            if not fut.set_running_or_notify_cancel():
                continue
            try:
                fut.set_result(fn())
            except BaseException as e:  # the future carries it to whoever awaits the job
                fut.set_exception(e)


_SHARED: Optional[MLXThread] = None
_SHARED_LOCK = threading.Lock()


def shared() -> MLXThread:
    """The process's one generation thread for the app (every app instance shares it: a second
    thread would be a second cache to tear down)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None:
            _SHARED = MLXThread()
        return _SHARED
