"""A/B in one process: kernels launched with their full source text against the cut text.

    python benchmarks/kernel_text_ab.py [--quantize 4] [--methods chess,chess-attn] [--rounds 3]

MLX's CUDA backend hashes a custom kernel's whole source at every launch (``kernel_text``). Per
method and round, each variant (``full``: the commented sources with the whole shared header, as
before session 18; ``cut``: ``sparse_gemv.launch_source``) is measured after ``set_method``
(which drops every compiled path, so the next token traces with that variant's kernels):
host_probe's synchronous split (build / encode / wait ms per token) and decode tokens/s of the
two-thread decode. Greedy tokens of the two variants must be equal.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.host_probe import split_times  # noqa: E402
from chess_mlx import decode_paths as D  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402
from chess_mlx.bench import PRESETS, bench_prompt, decode_speed, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402

_CUT = G.launch_source


def use(variant: str) -> None:
    """Kernels of ``variant`` from the next trace on. decode_paths shares compiled functions (and
    their traces) between layers and plans, and set_method does not drop them: cleared here."""
    G.launch_source = _CUT if variant == "cut" else G.kernel_source
    G._kernel.cache_clear()
    D._COMPILED.clear()


def greedy(model, vocab: int, n: int = 32) -> list[int]:
    from chess_mlx import pipelined

    gen = pipelined.generate_step(bench_prompt(32, vocab, 1), model, max_tokens=n,
                                  sampler=lambda lp: mx.argmax(lp, axis=-1))
    return [int(t) for t, _ in gen]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantize", type=int, choices=(4, 8))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--methods", default="chess,chess-attn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    args = ap.parse_args()
    model = random_model("llama3-8b", args.layers, mx.float16, bits=args.quantize)
    vocab = PRESETS["llama3-8b"]["vocab_size"]
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (2, 256), key=mx.random.key(7)), [0.5])
    for method in args.methods.split(","):
        rows: dict[str, list] = {"full": [], "cut": []}
        tokens = {}
        for r in range(args.rounds):
            for variant in (("full", "cut") if r % 2 == 0 else ("cut", "full")):
                use(variant)
                set_method(model, method, th, 0.5)
                split_times(model, 8, vocab)  # warm-up: traces and kernels of this variant
                s = split_times(model, args.tokens, vocab)
                tps = statistics.median(decode_speed(model, 128, runs=2, vocab=vocab))
                rows[variant].append({**s, "tok_s": round(tps, 1)})
                tokens.setdefault(variant, greedy(model, vocab))
                print(json.dumps({"method": method, "round": r, "variant": variant, **rows[variant][-1]}), flush=True)
        med = {v: {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]} for v, rs in rows.items()}
        print(f"{method}: full {med['full']}\n{' ' * len(method)}  cut  {med['cut']}\n"
              f"{' ' * len(method)}  encode {med['full']['encode_ms'] - med['cut']['encode_ms']:+.3f} ms/token less, "
              f"tok/s x{med['cut']['tok_s'] / med['full']['tok_s']:.3f}; greedy tokens equal: "
              f"{tokens['full'] == tokens['cut']}", flush=True)
    use("cut")


if __name__ == "__main__":
    main()
