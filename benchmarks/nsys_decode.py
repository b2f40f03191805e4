"""One method's decode under Nsight (Systems or Compute): GPU busy time per token vs wall time per token.

    nsys profile --capture-range=cudaProfilerApi -o OUT python benchmarks/nsys_decode.py --method chess
    nsys stats --report cuda_gpu_kern_sum,cuda_gpu_trace --format csv OUT.nsys-rep
    ncu --profile-from-start off --metrics gpu__time_duration.sum --csv python benchmarks/nsys_decode.py --tokens 2
    benchmarks/gpu_busy.sh  (ncu at free clocks, caches kept: GPU busy time per token of every method)

Only the timed decode loop (after warm-up) lies inside cudaProfilerStart/Stop.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx.sparse_layers import set_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_probe import calibrated_model  # noqa: E402


def cudart():
    import glob

    found = sorted(glob.glob("/usr/local/cuda*/lib64/libcudart.so*") + glob.glob("/usr/lib/x86_64-linux-gnu/libcudart.so*")
                   + glob.glob(f"{sys.prefix}/lib/python3*/site-packages/nvidia/*/lib/libcudart.so*")
                   + glob.glob("/tmp/site/nvidia/*/lib/libcudart.so*"))
    for name in ("libcudart.so", "libcudart.so.13", "libcudart.so.12", *found):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--method", default="chess")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--bits", type=int, default=0, help="quantize (4 or 8; the quantized kernels run unless CHESS_MLX_QUANT_KERNELS=0)")
    args = ap.parse_args()
    from mlx_lm.generate import generate_step

    from chess_mlx.kv_cache import make_cache

    model, th, _, prompt = calibrated_model(argparse.Namespace(preset="llama3-8b", layers=args.layers,
                                                              quantize=args.bits or None))
    set_method(model, args.method, th, 0.5)
    rt = cudart()
    for rep in range(2):
        gen = generate_step(prompt, model, max_tokens=args.tokens, sampler=lambda lp: mx.argmax(lp, axis=-1),
                            prompt_cache=make_cache(model))  # the caches the library decodes with
        next(gen)
        if rep == 1 and rt is not None:
            rt.cudaProfilerStart()
        t0 = time.perf_counter()
        n = sum(1 for _ in gen)
        dt = time.perf_counter() - t0
        if rep == 1 and rt is not None:
            rt.cudaProfilerStop()
    print(f"{args.method}: {n} tokens, {1e3 * dt / n:.2f} ms/token wall, {n / dt:.1f} tok/s (cudart: {rt is not None})")


if __name__ == "__main__":
    main()
