"""Where a fresh process's first reply spends its time before the first token (TTFT): set_method,
the prompt's prefill, and the first and later one-token steps, each evaluated on its own, so a
one-time cost (the kernels' transposed weights, compiling a kernel or a compiled path) shows as the
gap between the first step and the second.

    python benchmarks/first_token_probe.py FOLDER --method chess [--sparsity 0.5]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import thresholds as T  # noqa: E402
from chess_mlx.kv_cache import make_cache  # noqa: E402
from chess_mlx.model_io import load_model  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def timed(label: str, fn):
    mx.synchronize()
    t0 = time.perf_counter()
    out = fn()
    mx.synchronize()
    print(f"{label:28s} {1e3 * (time.perf_counter() - t0):9.1f} ms", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", type=Path)
    ap.add_argument("--method", default="chess")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    model, tok, _ = timed("load", lambda: load_model(a.folder))
    th = T.load(a.folder) if a.method != "dense" else None
    sparsify(model)
    timed(f"set_method {a.method}", lambda: set_method(model, a.method, th, a.sparsity if th else None))
    cache = make_cache(model)
    prompt = mx.array(tok.encode("Explain why the sky is blue, in two sentences."))[None]
    logits = timed(f"prefill {prompt.shape[1]} tokens", lambda: mx.eval(model(prompt, cache=cache)) or None)
    y = mx.array([[1]])
    for i in range(a.steps):
        timed(f"one-token step {i + 1}", lambda: mx.eval(model(y, cache=cache)))
    del logits


if __name__ == "__main__":
    main()
