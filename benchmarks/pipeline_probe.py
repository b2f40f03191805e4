"""Probe: decode with graph building and MLX's encoding on two threads.

    python benchmarks/pipeline_probe.py [--quantize 4] [--methods dense,chess] [--tokens 128] [--runs 3]

On the lent host a token's Python graph building and MLX's encoding run one after the other on
one thread, and together they exceed CHESS's GPU time (RESULTS.md, session 13). ``mx.async_eval``
releases the GIL while it encodes, so here the main thread builds token n+1's graph while a second
thread encodes token n, on a stream made by ``mx.new_thread_unsafe_stream`` (one that may be
evaluated on another thread; only that thread ever evaluates, so evaluations stay in order).
Greedy tokens must equal mlx-lm's ``generate_step`` exactly; tokens/s of both, interleaved.
"""

from __future__ import annotations

import argparse
import json
import queue
import statistics
import sys
import threading
import time
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx.bench import PRESETS, bench_prompt, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def _timed(gen, n: int) -> tuple[list[int], float]:
    """All tokens of a ``generate_step``-style generator of n + 1 steps, and tokens/s after the first."""
    toks = [int(next(gen)[0])]
    t0 = time.perf_counter()
    toks += [int(t) for t, _ in gen]
    return toks, n / (time.perf_counter() - t0)


def sequential(model, prompt: mx.array, n: int) -> tuple[list[int], float]:
    from mlx_lm.generate import generate_step

    return _timed(generate_step(prompt, model, max_tokens=n + 1, sampler=lambda lp: mx.argmax(lp, axis=-1)), n)


def _start(model, prompt: mx.array, stream):
    """Cache and first token as ``generate_step`` makes them (all but the last prompt token
    prefilled, then a one-token step), so both loops below compute exactly the same graphs."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    with mx.stream(stream):
        model(prompt[None, :-1], cache=cache)
        mx.eval([c.state for c in cache])
        y = mx.argmax(model(prompt[None, -1:], cache=cache)[:, -1], axis=-1)
    mx.eval(y)
    return cache, y


def one_thread(model, prompt: mx.array, n: int) -> tuple[list[int], float]:
    """The same loop as ``pipelined`` on one thread, in ``generate_step``'s order (build token
    n+1, schedule it, then read token n): the reference for its tokens."""
    stream = mx.new_thread_unsafe_stream(mx.default_device())
    cache, y = _start(model, prompt, stream)
    toks = [int(y.item())]
    t0 = time.perf_counter()
    with mx.stream(stream):
        for _ in range(n):
            nxt = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            mx.async_eval(nxt)
            y = nxt
            toks.append(y)
    toks = [toks[0]] + [int(t.item()) for t in toks[1:]]
    return toks, n / (time.perf_counter() - t0)


def pipelined(model, prompt: mx.array, n: int, depth: int = 2) -> tuple[list[int], float]:
    stream = mx.new_thread_unsafe_stream(mx.default_device())
    cache, y = _start(model, prompt, stream)
    first = int(y.item())
    todo: queue.Queue = queue.Queue(maxsize=depth)
    done: list[mx.array] = []
    errors: list[BaseException] = []

    def encode() -> None:
        while (item := todo.get()) is not None:
            try:
                mx.async_eval(item)
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
            done.append(item)

    worker = threading.Thread(target=encode, daemon=True)
    t0 = time.perf_counter()
    worker.start()
    with mx.stream(stream):
        for _ in range(n):
            y = mx.argmax(model(y[:, None], cache=cache)[:, -1], axis=-1)
            todo.put(y)
    todo.put(None)
    worker.join()
    if errors:
        raise errors[0]
    toks = [first] + [int(t.item()) for t in done]
    return toks, n / (time.perf_counter() - t0)


def library(model, prompt: mx.array, n: int) -> tuple[list[int], float]:
    """``chess_mlx.pipelined.generate_step`` as ``chess-mlx bench`` runs it (a token read per step)."""
    from chess_mlx import pipelined as P

    return _timed(P.generate_step(prompt, model, max_tokens=n + 1), n)


def densities(model, prompt: mx.array, n: int, two_threads: bool) -> list:
    """Per-token recorded densities as ``chess_mlx.generate.stream`` collects them (one step
    ahead, densities scheduled with their step), on two threads or through mlx-lm's loop."""
    import numpy as np

    from chess_mlx import pipelined as P

    rec = sparsify(model).recorder
    rec.clear()
    rec.enabled = True
    was = P.enabled()
    P.enable(two_threads)
    out = []
    try:
        gen = P.generate_step(prompt, model, max_tokens=n, also=rec.current) if two_threads else \
            P.generate_step(prompt, model, max_tokens=n)
        for _ in gen:
            out += [c.density for c in rec.pop(closed_only=True) if c.n_tokens == 1]
    finally:
        P.enable(was)
        rec.enabled = False
        rec.clear()
    return [np.asarray(d) for d in out]


def add_model_args(ap: argparse.ArgumentParser, methods: str) -> None:
    """The options of a decode probe's model and timing (shared with decode_variants_ab.py)."""
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quantize", type=int, choices=(4, 8))
    ap.add_argument("--methods", default=methods)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3)


def calibrated_model(args) -> tuple:
    """(model, thresholds, vocab, prompt): a random model of the preset's shape, sparsified and
    calibrated at 50% on random tokens, and the bench's prompt."""
    gpu = mx.default_device() == mx.gpu
    model = random_model(args.preset, args.layers, mx.float16 if gpu else mx.float32, bits=args.quantize)
    vocab = PRESETS[args.preset]["vocab_size"]
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (2, 256), key=mx.random.key(7)), [0.5])
    return model, th, vocab, bench_prompt(32, vocab, 1)


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "dense,chess")
    ap.add_argument("--depth", type=int, default=2, help="graphs built ahead of the encoder")
    ap.add_argument("--check-stats", action="store_true",
                    help="only compare per-token recorded densities, two threads against mlx-lm's loop")
    ap.add_argument("--repeat", type=int, default=1, help="--check-stats: repeat each method's check (races are rare)")
    ap.add_argument("--switch", type=float, default=0.0,
                    help="sys.setswitchinterval (s): how soon the encoder thread gets the GIL back")
    args = ap.parse_args()
    if args.switch:
        sys.setswitchinterval(args.switch)
    model, th, vocab, prompt = calibrated_model(args)
    if args.check_stats:
        import numpy as np

        for m in args.methods.split(","):
            set_method(model, m, th, 0.5)
            for rep in range(args.repeat):
                a = densities(model, prompt, args.tokens, False)
                b = densities(model, prompt, args.tokens, True)
                same = len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
                print(json.dumps({"method": m, "repeat": rep, "tokens_with_stats": [len(a), len(b)],
                                  "densities_identical": same,
                                  "mean_density": round(float(np.mean(b)), 4) if b else None}), flush=True)
        return
    speeds: dict = {}
    for run in range(args.runs + 1):  # run 0 warms up
        for m in args.methods.split(","):
            set_method(model, m, th, 0.5)
            ref, s_seq = sequential(model, prompt, args.tokens)
            one, s_one = one_thread(model, prompt, args.tokens)
            got, s_pipe = pipelined(model, prompt, args.tokens, args.depth)
            lib, s_lib = library(model, prompt, args.tokens)
            row = {"run": run, "method": m, "generate_step": round(s_seq, 1), "one_thread": round(s_one, 1),
                   "pipelined": round(s_pipe, 1), "library": round(s_lib, 1),
                   "library_same_as_one_thread": f"{sum(a == b for a, b in zip(one, lib))}/{len(one)}",
                   "same_as_one_thread": f"{sum(a == b for a, b in zip(one, got))}/{len(one)}",
                   "one_thread_same_as_generate_step": f"{sum(a == b for a, b in zip(ref, one))}/{len(ref)}"}
            print(json.dumps(row), flush=True)
            if run:
                speeds.setdefault(m, []).append((s_seq, s_one, s_pipe, s_lib))
    base = speeds.get("dense")
    for m, v in speeds.items():
        r = {"method": m, **{k: round(statistics.median(x[i] for x in v), 1)
                             for i, k in enumerate(("generate_step", "one_thread", "pipelined", "library"))}}
        if base:
            r["paired_vs_dense"] = {k: round(statistics.median(x[i] / b[i] for x, b in zip(v, base)), 3)
                                    for i, k in enumerate(("generate_step", "one_thread", "pipelined", "library"))}
        print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
