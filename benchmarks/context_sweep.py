"""Decode speed against the context already in the KV cache, with the in-place KV cache off
(mlx-lm's slice updates) and on, in one process: what the in-place write
(``chess_mlx/kv_cache.py``) gains as the context grows. Session 35, float16 after 4096 prompt
tokens on the H100: dense 143.1 -> 156.7 tok/s, CHESS+attention 190.1 -> 213.3.

    python benchmarks/context_sweep.py [--quantize 4] [--contexts 32,512,1024,2048,4096] [--json OUT]

One random llama3-8b model and one calibration; for each context, ``bench.run_bench`` of dense and
the methods with the in-place cache off, then on (the cache is made per decode, so the switch
takes effect at once). Prints one row per context and setting as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

from chess_mlx import kv_cache  # noqa: E402
from chess_mlx.bench import PRESETS, random_model, random_thresholds, run_bench  # noqa: E402
from chess_mlx.model_io import default_dtype  # noqa: E402


def sweep(model, vocab: int, contexts: list[int], methods: list[str], sparsity: float = 0.5, runs: int = 3,
          tokens: int = 128, calib_tokens: int = 1024) -> list[dict]:
    """Rows of (context, inplace, method, tok/s, x dense); the switch is left as it was."""
    th = random_thresholds(model, vocab, sparsity, calib_tokens)
    was, rows = kv_cache.inplace_enabled(), []
    try:
        for ctx in contexts:
            for inplace in (False, True):
                kv_cache.enable_inplace(inplace)
                res = run_bench(model, ["dense", *methods], sparsity, vocab, n_tokens=tokens, runs=runs, th=th,
                                prompt_len=ctx)
                base = res[0].tokens_per_s
                for r in res:
                    rows.append(dict(context=ctx, inplace=inplace, method=r.method, tok_s=r.tokens_per_s,
                                     runs=r.runs, vs_dense=r.tokens_per_s / base))
                print(f"context {ctx:5d} in-place {'on ' if inplace else 'off'}: " + ", ".join(
                    f"{r.method} {r.tokens_per_s:.1f} tok/s ({r.tokens_per_s / base:.2f}x)" for r in res), flush=True)
    finally:
        kv_cache.enable_inplace(was)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int)
    ap.add_argument("--quantize", type=int, choices=[4, 8])
    ap.add_argument("--contexts", default="32,512,1024,2048,4096")
    ap.add_argument("--methods", default="chess-attn")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    dtype = default_dtype()
    model = random_model(args.preset, args.layers, dtype, args.quantize)
    print(f"{args.preset} {'%d-bit' % args.quantize if args.quantize else dtype} on {mx.default_device()}", flush=True)
    rows = sweep(model, PRESETS[args.preset]["vocab_size"], [int(c) for c in args.contexts.split(",")],
                 args.methods.split(","), runs=args.runs, tokens=args.tokens)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
