"""A/B of gpu_timer's stamp kernel: the serial copy used until session 9 against the parallel one.

    python benchmarks/timer_ab.py

Times MLX's dense GEMV and the sparse-input kernel (50%) on the three Llama-3-8B shapes with both
stamp kernels, interleaved. Session 10 found that the old stamp (one block of 256 threads copying
the op's activation in a loop: 56 dependent rounds for 14336 inputs) added 11 us to a dense GEMV
and to the sparse-input kernel on 14336-wide inputs (results/timer_ab_session10.txt): its copy
waits longer after an op that pushed x out of L2 than after another stamp, so it did not cancel.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import mlx.core as mx  # noqa: E402

import gpu_timer  # noqa: E402
import kernels as K  # noqa: E402

_SERIAL = r"""
if (blockIdx.x == 0 && threadIdx.x == 0) {
  unsigned long long now;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
  stamp[0] = now;
  stamp[1] = 0;
}
for (int i = threadIdx.x; i < SIZE; i += blockDim.x) y[i] = x[i];
"""
_SERIAL_KERNELS: dict = {}
_parallel_stamp = gpu_timer._stamp


def _serial_stamp(x: mx.array, after: list):
    n = len(after)
    if n not in _SERIAL_KERNELS:
        _SERIAL_KERNELS[n] = mx.fast.cuda_kernel(name=f"chess_gpu_stamp_serial{n}",
                                                 input_names=["x"] + [f"after{i}" for i in range(n)],
                                                 output_names=["y", "stamp"], source=_SERIAL)
    return tuple(_SERIAL_KERNELS[n](inputs=[x, *after], template=[("SIZE", x.size)], grid=(256, 1, 1),
                                    threadgroup=(256, 1, 1), output_shapes=[x.shape, (2,)],
                                    output_dtypes=[x.dtype, mx.uint64]))


def main() -> None:
    mx.random.seed(0)
    kind = "cuda"
    for out_dim, in_dim in K.SHAPES:
        ws = K.weight_copies(out_dim, in_dim, "float16")
        wts = K.weight_copies(out_dim, in_dim, "float16", transposed=True)
        x = mx.random.normal((1, in_dim)).astype(mx.float16)
        xs = K.sparse_vec(1, in_dim, 0.5, mx.float16)
        mx.eval(x, xs)
        for rep in range(2):
            for name, stamp in (("serial", _serial_stamp), ("parallel", _parallel_stamp)):
                gpu_timer._stamp = stamp
                td = gpu_timer.chain_time(K.dense_op(ws), x)
                ts = gpu_timer.chain_time(K.spin_op(kind, wts), xs)
                print(f"{out_dim}x{in_dim} rep {rep} stamp {name:8s} dense {td * 1e6:6.1f} us  "
                      f"sparse-input 50% {ts * 1e6:6.1f} us", flush=True)
    gpu_timer._stamp = _parallel_stamp


if __name__ == "__main__":
    main()
