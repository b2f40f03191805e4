"""Where a fresh process's first reply spends its time before the first token (TTFT): set_method,
the prompt's prefill, and the first and later one-token steps, each evaluated on its own, so a
one-time cost (the kernels' transposed weights, compiling a kernel or a compiled path) shows as the
gap between the first step and the second. With ``--steps`` past 8, the later steps are summed up
instead: their median, and each step over twice it with its cache position (a fresh machine's first
process decoded at 0.7x a later one's in session 34: which positions pay a one-time cost?).

    python benchmarks/first_token_probe.py FOLDER|PRESET --method chess [--sparsity 0.5] [--steps 300]

PRESET (e.g. llama3-8b): a random model of ``chess-mlx bench``'s presets, thresholds calibrated on
random ids, and a prompt of random ids; no folder to make first.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import thresholds as T  # noqa: E402
from chess_mlx.bench import PRESETS, random_model, random_thresholds  # noqa: E402
from chess_mlx.kv_cache import make_cache  # noqa: E402
from chess_mlx.model_io import default_dtype, load_model  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def timed(label: str, fn, quiet: bool = False):
    mx.synchronize()
    t0 = time.perf_counter()
    out = fn()
    mx.synchronize()
    ms = 1e3 * (time.perf_counter() - t0)
    if not quiet:
        print(f"{label:28s} {ms:9.1f} ms", flush=True)
    return out, ms


def slow_steps(times_ms: list[float], first_pos: int, factor: float = 2.0) -> tuple[float, list[tuple[int, float]]]:
    """The median step time, and (cache position, ms) of each step over ``factor`` times it."""
    med = sorted(times_ms)[len(times_ms) // 2]
    return med, [(first_pos + i, t) for i, t in enumerate(times_ms) if t > factor * med]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("folder", help="a model folder, or a preset of chess-mlx bench")
    ap.add_argument("--method", default="chess")
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=4)
    a = ap.parse_args()
    if a.folder in PRESETS:
        model, _ = timed("random model", lambda: random_model(a.folder, dtype=default_dtype()))
        th, _ = timed("calibrate", lambda: random_thresholds(model, PRESETS[a.folder]["vocab_size"], a.sparsity)) \
            if a.method != "dense" else (None, 0)
        prompt = mx.random.randint(0, PRESETS[a.folder]["vocab_size"], (1, 12), key=mx.random.key(3))
    else:
        (model, tok, _), _ = timed("load", lambda: load_model(Path(a.folder)))
        th = T.load(Path(a.folder)) if a.method != "dense" else None
        prompt = mx.array(tok.encode("Explain why the sky is blue, in two sentences."))[None]
    sparsify(model)
    timed(f"set_method {a.method}", lambda: set_method(model, a.method, th, a.sparsity if th else None))
    cache = make_cache(model)
    timed(f"prefill {prompt.shape[1]} tokens", lambda: mx.eval(model(prompt, cache=cache)))
    y = mx.array([[1]])
    later = []
    for i in range(a.steps):
        quiet = a.steps > 8 and i >= 4
        _, ms = timed(f"one-token step {i + 1}", lambda: mx.eval(model(y, cache=cache)), quiet)
        if quiet:
            later.append(ms)
    if later:
        med, slow = slow_steps(later, prompt.shape[1] + 4)
        print(f"steps 5-{a.steps}: median {med:.2f} ms; over 2x at cache position: "
              + (", ".join(f"{p} ({t:.1f} ms)" for p, t in slow) or "none"), flush=True)


if __name__ == "__main__":
    main()
