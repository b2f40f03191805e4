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
from benchmarks.node_cost import launch_with  # noqa: E402
from benchmarks.pipeline_probe import add_model_args, calibrated_model  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402
from chess_mlx.bench import decode_speed  # noqa: E402
from chess_mlx.sparse_layers import set_method  # noqa: E402

_CUT = G.launch_source


def use(variant: str) -> None:
    """Kernels of ``variant`` from the next trace on (set_method drops the layers' plans, but not
    decode_paths' shared traces: ``launch_with`` does)."""
    launch_with(_CUT if variant == "cut" else G.kernel_source)


def greedy(model, prompt: mx.array, n: int = 32) -> list[int]:
    from chess_mlx import pipelined

    gen = pipelined.generate_step(prompt, model, max_tokens=n, sampler=lambda lp: mx.argmax(lp, axis=-1))
    return [int(t) for t, _ in gen]


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "chess,chess-attn")
    ap.add_argument("--rounds", type=int, default=3)
    ap.set_defaults(tokens=32)  # tokens of the synchronous split
    args = ap.parse_args()
    model, th, vocab, prompt = calibrated_model(args)
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
                tokens.setdefault(variant, greedy(model, prompt))
                print(json.dumps({"method": method, "round": r, "variant": variant, **rows[variant][-1]}), flush=True)
        med = {v: {k: round(statistics.median(x[k] for x in rs), 3) for k in rs[0]} for v, rs in rows.items()}
        print(f"{method}: full {med['full']}\n{' ' * len(method)}  cut  {med['cut']}\n"
              f"{' ' * len(method)}  encode {med['full']['encode_ms'] - med['cut']['encode_ms']:+.3f} ms/token less, "
              f"tok/s x{med['cut']['tok_s'] / med['full']['tok_s']:.3f}; greedy tokens equal: "
              f"{tokens['full'] == tokens['cut']}", flush=True)
    use("cut")


if __name__ == "__main__":
    main()
