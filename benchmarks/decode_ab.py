"""A/B of the decode paths inside a real model (mlx-lm generate_step): op-by-op vs compiled.

    python benchmarks/decode_ab.py [--layers 8] [--methods chess,chess-attn]

(Its third variant of session 8, the bound paths without ``mx.compile``, went when the compiled
paths began to rebuild their weights and workspaces from arrays inside the trace, session 16.)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_paths as D  # noqa: E402
from chess_mlx.bench import decode_speed  # noqa: E402
from chess_mlx.sparse_layers import set_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_probe import calibrated_model  # noqa: E402


def sync_speed(model, n=64, vocab=512):
    """Decode without generate_step: build, eval, repeat (no pipelining)."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    y = model(mx.random.randint(0, vocab, (1, 32), key=mx.random.key(1)), cache=cache)[:, -1]
    tok = mx.argmax(y, axis=-1)
    mx.eval(tok)
    host = []
    t0 = time.perf_counter()
    for _ in range(n):
        h0 = time.perf_counter()
        y = model(tok[None], cache=cache)[:, -1]
        tok = mx.argmax(y, axis=-1)
        host.append(time.perf_counter() - h0)
        mx.eval(tok)
    return n / (time.perf_counter() - t0), 1e3 * statistics.median(host)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--methods", default="chess,chess-attn")
    args = ap.parse_args()
    model, th, vocab, _ = calibrated_model(argparse.Namespace(preset="llama3-8b", layers=args.layers, quantize=None))
    variants = {"op-by-op": lambda: D.enable(False), "paths, compiled": lambda: D.enable(True)}
    set_method(model, "dense")
    print(f"dense: generate_step {statistics.median(decode_speed(model, 64, runs=2, vocab=vocab)):.1f} tok/s; "
          "sync %.1f tok/s, host %.2f ms/token" % sync_speed(model), flush=True)
    for m in args.methods.split(","):
        set_method(model, m, th, 0.5)
        for name, setup in variants.items():
            setup()
            gs = statistics.median(decode_speed(model, 64, runs=2, vocab=vocab))
            ss, host = sync_speed(model)
            print(f"{m:<10} {name:<20} generate_step {gs:7.1f} tok/s; sync {ss:7.1f} tok/s, host {host:.2f} ms/token",
                  flush=True)
    D.enable(True)


if __name__ == "__main__":
    main()
