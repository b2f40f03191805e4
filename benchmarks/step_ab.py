"""A/B of the whole-step decoder (``chess_mlx/decode_step.py``) in one process: tokens/s with it on
and off, interleaved run by run, and a synchronous split of one token's time.

    python benchmarks/step_ab.py [--layers 32] [--quantize 4] [--runs 5] [--methods dense,chess]

Synchronous split per token (median over the steps of one decode): *build* = the Python call
that returns the logits graph, *encode* = ``mx.async_eval`` returning (MLX walking the graph and
launching its kernels), *wait* = what is left until the logits are ready (GPU time not hidden
behind encoding). tokens/s is mlx-lm's pipelined ``generate_step`` (``chess_mlx.bench.decode_speed``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_step  # noqa: E402
from chess_mlx.bench import PRESETS, decode_speed, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.methods import parse_methods  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def sync_split(model, vocab: int, n: int = 48) -> dict:
    from mlx_lm.models.cache import make_prompt_cache

    m = decode_step.decoder(model)
    cache = make_prompt_cache(model)
    mx.eval(m(mx.random.randint(0, vocab, (1, 32), key=mx.random.key(4)), cache=cache))
    tok = mx.array([[1]], dtype=mx.uint32)
    build, encode, wait = [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        logits = m(tok, cache=cache)
        tok = mx.argmax(logits[:, -1], axis=-1, keepdims=True)
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        mx.eval(tok)
        t3 = time.perf_counter()
        build.append(t1 - t0), encode.append(t2 - t1), wait.append(t3 - t2)
    med = lambda v: round(1e3 * statistics.median(v[4:]), 3)  # noqa: E731 (steps after the first traces)
    return dict(build_ms=med(build), encode_ms=med(encode), wait_ms=med(wait))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--quantize", type=int, default=None)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--methods", default="dense,chess,chess-attn")
    ap.add_argument("--json")
    args = ap.parse_args()
    methods = parse_methods(args.methods)
    vocab = PRESETS["llama3-8b"]["vocab_size"]
    model = random_model("llama3-8b", args.layers, mx.float16, bits=args.quantize)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (4, 256), key=mx.random.key(7)), [0.5])
    rows = []
    for m in methods:  # warm both paths (and the traces) first
        set_method(model, m, th, 0.5)
        for on in (False, True):
            decode_step.enable(on)
            decode_speed(model, n_tokens=args.tokens, runs=0, vocab=vocab)
    speeds = {(m, on): [] for m in methods for on in (False, True)}
    for _ in range(args.runs):
        for m in methods:
            set_method(model, m, th, 0.5)
            for on in (False, True):
                decode_step.enable(on)
                speeds[m, on] += decode_speed(model, n_tokens=args.tokens, runs=1, vocab=vocab, warmup=False)
    for m in methods:
        set_method(model, m, th, 0.5)
        for on in (False, True):
            decode_step.enable(on)
            split = sync_split(model, vocab)
            tps = statistics.median(speeds[m, on])
            rows.append(dict(method=m, whole_step=on, tok_s=round(tps, 1),
                             runs=[round(v, 1) for v in speeds[m, on]], **split))
            print(f"{m:<11} whole step {'on ' if on else 'off'} {tps:7.1f} tok/s "
                  f"(runs {min(speeds[m, on]):.1f}-{max(speeds[m, on]):.1f}); sync build {split['build_ms']:.2f} "
                  f"encode {split['encode_ms']:.2f} wait {split['wait_ms']:.2f} ms", flush=True)
    decode_step.enable(True)
    base = {on: statistics.median(speeds[methods[0], on]) for on in (False, True)}
    for m in methods:
        print(f"{m:<11} vs {methods[0]}: off {statistics.median(speeds[m, False]) / base[False]:.2f}x, "
              f"on {statistics.median(speeds[m, True]) / base[True]:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
