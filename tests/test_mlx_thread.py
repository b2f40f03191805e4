"""The chat app's one MLX thread (chess_mlx/mlx_thread.py): jobs run in order on a thread that lasts, so
mx.compile's per-thread cache is built once, and no MLX thread ends while the interpreter shuts
down (which aborts Python: the docstring of chess_mlx/mlx_thread.py)."""

from __future__ import annotations

import asyncio
import threading
from functools import partial

import mlx.core as mx
import numpy as np
import pytest

from chess_mlx.mlx_thread import MLXThread, shared


def test_jobs_run_in_order_on_one_lasting_daemon_thread():
    t = MLXThread()
    idents = [t.submit(threading.get_ident).result(timeout=30) for _ in range(3)]
    assert len(set(idents)) == 1 and idents[0] != threading.get_ident()
    assert any(th.ident == idents[0] and th.daemon and th.is_alive() for th in threading.enumerate())
    order: list[int] = []
    futs = [t.submit(partial(order.append, i)) for i in range(50)]
    for f in futs:
        f.result(timeout=30)
    assert order == list(range(50))


def test_a_failing_job_reaches_its_caller_and_the_thread_goes_on():
    t = MLXThread()
    with pytest.raises(ZeroDivisionError):
        t.submit(lambda: 1 / 0).result(timeout=30)
    assert asyncio.run(t.run(lambda: 7)) == 7
    assert shared() is shared()


def _traced_once_per_thread():
    traces: list[int] = []

    @mx.compile
    def f(a):
        traces.append(1)
        return a * 2 + 1

    def job():
        return np.array(f(mx.ones((4,))))

    return traces, job


def test_compiled_functions_are_traced_once_across_jobs():
    """Each reply used to run on a fresh thread, whose empty compile cache traced every compiled
    decode path again; on the lasting thread the first job's traces serve the next ones."""
    traces, job = _traced_once_per_thread()
    t = MLXThread()
    for _ in range(3):
        np.testing.assert_array_equal(t.submit(job).result(timeout=30), np.full(4, 3.0))
    assert len(traces) == 1
    # The contrast that makes the point: a thread per job traces per job (MLX's cache is per thread).
    traces2, job2 = _traced_once_per_thread()
    for _ in range(2):
        th = threading.Thread(target=job2)
        th.start()
        th.join()
    assert len(traces2) == 2
