"""Where a decode token's host time goes: graph building, encoding, waiting for the GPU.

    python benchmarks/host_probe.py [--layers 32] [--methods dense,chess,chess-attn,teal] [--quantize 4]
                                    [--profile N]

Per token (median over --tokens steps, synchronous, no pipelining):
  build  = Python forward pass (graph construction),
  encode = ``mx.async_eval`` returning (MLX evaluates the graph on the host: allocation, CUDA-graph
           node creation, graph launches), the GPU running behind it,
  wait   = ``mx.eval`` of the already-scheduled token (GPU time not hidden behind encoding).
Run it under different MLX_MAX_OPS_PER_BUFFER / MLX_USE_CUDA_GRAPHS settings to see which part moves.
``--profile N`` also prints, per method, the N functions with the most own time (cProfile) in the
build step of 16 tokens: which Python the build spends its time in.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx.bench import decode_speed  # noqa: E402
from chess_mlx.sparse_layers import set_method  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pipeline_probe import add_model_args, calibrated_model  # noqa: E402


def prefilled(model, vocab: int) -> tuple[list, mx.array]:
    """(KV cache, first greedy token) after a fixed random 32-token prompt: where each probe's
    decode steps start."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    tok = mx.argmax(model(mx.random.randint(0, vocab, (1, 32), key=mx.random.key(1)), cache=cache)[:, -1], axis=-1)
    mx.eval(tok)
    return cache, tok


def split_times(model, n: int, vocab: int) -> dict:
    cache, tok = prefilled(model, vocab)
    b, e, w, t = [], [], [], []
    for _ in range(n):
        t0 = time.perf_counter()
        y = model(tok[None], cache=cache)[:, -1]
        tok = mx.argmax(y, axis=-1)
        t1 = time.perf_counter()
        mx.async_eval(tok)
        t2 = time.perf_counter()
        mx.eval(tok)
        t3 = time.perf_counter()
        b.append(t1 - t0), e.append(t2 - t1), w.append(t3 - t2), t.append(t3 - t0)
    med = lambda v: round(1e3 * statistics.median(v), 3)  # noqa: E731
    return {"build_ms": med(b), "encode_ms": med(e), "wait_ms": med(w), "total_ms": med(t)}


def profile_build(model, vocab: int, top: int, tokens: int = 16) -> str:
    """cProfile of ``tokens`` synchronous decode steps, graph building only (each token is
    evaluated outside the profiled span): the ``top`` functions by own time, summed over the tokens."""
    import cProfile
    import io
    import pstats

    cache, tok = prefilled(model, vocab)
    prof = cProfile.Profile()
    for _ in range(tokens):
        prof.enable()
        tok = mx.argmax(model(tok[None], cache=cache)[:, -1], axis=-1)
        prof.disable()
        mx.eval(tok)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(top)
    return out.getvalue()


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "dense,chess,chess-attn,teal")
    ap.set_defaults(tokens=48)
    ap.add_argument("--json")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest build functions")
    args = ap.parse_args()
    env = {k: os.environ.get(k) for k in ("MLX_MAX_OPS_PER_BUFFER", "MLX_USE_CUDA_GRAPHS", "CHESS_MLX_COMPILE")}
    model, th, vocab, _ = calibrated_model(args)
    rows = []
    for m in args.methods.split(","):
        set_method(model, m, th, 0.5)
        split_times(model, 8, vocab)  # warm-up: compile traces, kernels, allocator
        r = {"method": m, **split_times(model, args.tokens, vocab),
             "generate_step_tok_s": round(statistics.median(decode_speed(model, 64, runs=2, vocab=vocab)), 1)}
        rows.append(r)
        print(json.dumps({**r, "env": env, "bits": args.quantize}), flush=True)
        if args.profile:
            print(profile_build(model, vocab, args.profile), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"env": env, "layers": args.layers, "bits": args.quantize, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
