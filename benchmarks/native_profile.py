"""Where a decode token's host time goes, in native (C++) frames: py-spy samples of the real decode.

    python benchmarks/native_profile.py --quantize 4 --methods chess,chess-attn --out DIR [--seconds 20]

For each method the process decodes (``pipelined.generate_step``, as ``chess-mlx bench`` does)
for ``--seconds`` while ``py-spy record --native --threads`` samples it (py-spy from the
ignored ``.gpu_tools/``; the lent machine has no other profiler). Each method's collapsed stacks go
to ``DIR/<method>.txt``; ``--summary FILE...`` (plain or .gz) prints, per thread, the share of samples in each of a fixed
list of MLX/CUDA functions, so two methods' encoder threads can be compared.
"""

from __future__ import annotations

import argparse
import gzip
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from benchmarks.pipeline_probe import add_model_args, calibrated_model  # noqa: E402
from chess_mlx import pipelined  # noqa: E402
from chess_mlx.sparse_layers import set_method  # noqa: E402

# frames worth a line of the summary: (label, regex on one frame)
FRAMES = [
    ("CustomKernel::eval_gpu", r"CustomKernel::eval_gpu"),
    ("QuantizedMatmul::eval_gpu", r"QuantizedMatmul::eval_gpu"),
    ("Matmul::eval_gpu", r"\bMatmul::eval_gpu"),
    ("ScaledDotProductAttention::eval_gpu", r"ScaledDotProductAttention::eval_gpu"),
    ("RMSNorm::eval_gpu", r"RMSNorm::eval_gpu"),
    ("CommandEncoder::commit", r"CommandEncoder::commit"),
    ("cudaGraphInstantiate", r"[Ii]nstantiate"),
    ("cudaGraphExecUpdate", r"ExecUpdate"),
    ("cudaGraphLaunch", r"GraphLaunch"),
    ("add_kernel_node", r"add_kernel_node"),
    ("get_jit_module", r"get_jit_module"),
    ("allocator malloc", r"allocator.*malloc|CudaAllocator::malloc"),
    ("allocator free", r"allocator.*free|CudaAllocator::free"),
    ("eval_impl", r"eval_impl"),
    ("compile replay", r"compile_replace|compiled_function|CompiledFunction"),
]


def summarize(path: Path) -> str:
    """Per thread: samples, and the share of them whose stack holds each of ``FRAMES``."""
    per: dict[str, Counter] = {}
    deepest: dict[str, Counter] = {}
    totals: Counter = Counter()
    text = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        frames = stack.split(";")
        thread = frames[0]
        totals[thread] += int(n)
        c = per.setdefault(thread, Counter())
        for label, rx in FRAMES:
            if any(re.search(rx, f) for f in frames):
                c[label] += int(n)
        mlx = [f for f in frames if "mlx::core" in f]
        deepest.setdefault(thread, Counter())[re.sub(r"\(.*", "", mlx[-1])[:90] if mlx else "(no MLX frame)"] += int(n)
    out = []
    for thread, total in totals.most_common(4):
        out.append(f"  {thread}: {total} samples")
        for label, n in per[thread].most_common():
            out.append(f"    {100 * n / total:5.1f}%  {label}")
        out.append("    deepest MLX frame:")
        for label, n in deepest[thread].most_common(12):
            out.append(f"      {100 * n / total:5.1f}%  {label}")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "chess,chess-attn")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--py-spy", default=".gpu_tools/py-spy")
    ap.add_argument("--summary", type=Path, nargs="*", help="only summarise these collapsed-stack files")
    args = ap.parse_args()
    if args.summary:
        for p in args.summary:
            print(p.name)
            print(summarize(p))
        return

    args.out.mkdir(parents=True, exist_ok=True)
    model, th, _, prompt = calibrated_model(args)
    for method in args.methods.split(","):
        set_method(model, method, th, 0.5)

        def decode(seconds: float) -> float:
            n, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                for _ in pipelined.generate_step(prompt, model, max_tokens=256,
                                                 sampler=lambda lp: mx.argmax(lp, axis=-1)):
                    n += 1
            return n / (time.perf_counter() - t0)

        decode(3.0)  # warm-up: traces, kernels, allocator
        dest = args.out / f"{method}.txt"
        spy = subprocess.Popen([args.py_spy, "record", "--native", "--threads", "--rate", "200", "--format", "raw",
                                "--duration", str(int(args.seconds)), "--pid", str(os.getpid()), "-o", str(dest)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        time.sleep(1.0)
        tps = decode(args.seconds - 1.0)
        err = spy.communicate()[1].decode(errors="replace")
        print(f"{method}: {tps:.1f} tok/s while sampled (py-spy rc {spy.returncode}{': ' + err[-300:] if spy.returncode else ''})",
              flush=True)
        if dest.exists():
            print(summarize(dest), flush=True)


if __name__ == "__main__":
    main()
