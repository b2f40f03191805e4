"""GPU-clock time of an MLX op in a chain, as a model's layers run it (CUDA backend).

Host-timed batches measure the host when a kernel is shorter than MLX's ~10-30 us of host work
per custom-kernel node, and Nsight Compute serializes every kernel, flushes the caches and locks
base clocks. Session 9 (benchmarks/RESULTS.md) found both misleading for the sparse-input kernel:
chained launches that took 32-58 us per launch on the host clock took 27 us on the GPU.

So: a chain  stamp -> op -> stamp -> op -> ...  where each tiny ``stamp`` kernel copies the op's
activation (so the next op waits for it), waits for the previous op's output (an unread input),
and writes the GPU's %globaltimer. MLX encodes the whole chain before the GPU runs it, so the
intervals between stamps are GPU time, not host time. The op's time is the (trimmed) mean interval
minus that of a chain of stamps alone, i.e. the op's kernel(s) plus one launch gap, which
is what each layer pays in a decode step.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
import numpy as np

_SOURCE = r"""
const int i = blockIdx.x * blockDim.x + threadIdx.x;
if (i == 0) {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  stamp[0] = now;
  stamp[1] = 0;
}
if (i < SIZE) y[i] = x[i];
"""
# One element per thread. Until session 10 one block of 256 threads copied x in a loop: for a
# 14336-wide activation 56 dependent load/store rounds, whose latency grew when the op between two
# stamps had pushed x out of L2. That time did not cancel against the stamps-only chain and
# inflated ops on 14336-wide inputs by ~11 us, dense GEMVs too, and some on 4096-wide inputs by up
# to 3.5 us (benchmarks/RESULTS.md, session 10, benchmarks/timer_ab.py).

_KERNELS: dict = {}


def _stamp(x: mx.array, after: list) -> tuple[mx.array, mx.array]:
    """(copy of x, [GPU ns, 0]); runs after every array of ``after`` is computed. The stamp has 2
    elements: MLX serves buffers of <= 8 bytes from a small managed pool advised read-mostly."""
    n = len(after)
    if n not in _KERNELS:
        _KERNELS[n] = mx.fast.cuda_kernel(name=f"chess_gpu_stamp{n}", input_names=["x"] + [f"after{i}" for i in range(n)],
                                          output_names=["y", "stamp"], source=_SOURCE)
    return tuple(_KERNELS[n](inputs=[x, *after], template=[("SIZE", x.size)], grid=(-(-x.size // 256) * 256, 1, 1), threadgroup=(256, 1, 1),
                             output_shapes=[x.shape, (2,)], output_dtypes=[x.dtype, mx.uint64]))


def _intervals(op: Callable[[mx.array, int], object] | None, x: mx.array, calls: int) -> np.ndarray:
    stamps, after = [], [x]
    for i in range(calls + 1):
        xi, s = _stamp(x, after)
        stamps.append(s)
        if op is None:
            after = [xi]
        else:
            out = op(xi, i)
            after = list(out) if isinstance(out, (tuple, list)) else [out]
    mx.eval(stamps)
    t = np.array([int(s[0].item()) for s in stamps], dtype=np.int64)
    return np.diff(t) * 1e-9


def chain_time(op: Callable[[mx.array, int], object], x: mx.array, calls: int = 48, reps: int = 3) -> float:
    """GPU seconds per ``op(x_i, i)`` in a chain of ``calls`` (call i should rotate its
    weight copy by i so L2 does not keep it). ``op`` must read x_i (that is what orders it after
    the stamp) and return an array or a tuple of arrays; the next stamp waits for all of them."""
    base, timed = [], []
    _intervals(op, x, 4)  # JIT and warm-up
    for _ in range(reps):  # interleaved, so drift of the clocks hits both
        base.append(_intervals(None, x, calls))
        timed.append(_intervals(op, x, calls))
    return _trimmed_mean(np.concatenate(timed)) - _trimmed_mean(np.concatenate(base))


def _trimmed_mean(v: np.ndarray) -> float:
    """Mean of the middle 80%: robust to the few long gaps where MLX starts a new CUDA graph, and
    finer than a median of intervals of a clock that may tick only every microsecond."""
    lo, hi = np.percentile(v, [10, 90])
    return float(v[(v >= lo) & (v <= hi)].mean())

