"""A/B of a decode setting in one process: the two-thread decode's pipeline depth (steps built
ahead), or the in-place KV cache (``kv_cache``).

    python benchmarks/depth_ab.py [--quantize 4] [--methods dense,chess-attn] [--depths 1,2] [--runs 6]
    python benchmarks/depth_ab.py --set inplace_kv=0,1


``chess_mlx.pipelined`` builds and schedules ``CHESS_MLX_PIPELINE_DEPTH`` decode steps ahead of the
token being read (read at each decode's start, so one process can alternate it). Per round, every
(depth, method) decodes once (``chess_mlx.bench.decode_speed``: 128 greedy tokens after the bench's
prompt), depths and methods interleaved, so a slow spell of the shared host hits all of them. Prints
the median tokens/s of each, each method's ratio to dense at the same depth paired round by round,
and each depth's speed over depth 1 paired round by round (does a deeper pipeline slow dense?).
``--set inplace_kv=0,1`` alternates ``kv_cache.enable_inplace`` the same way (each decode makes its caches).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chess_mlx import kv_cache  # noqa: E402
from chess_mlx.bench import _as_method, decode_speed  # noqa: E402
from pipeline_probe import add_model_args, calibrated_model  # noqa: E402


SETTERS = {  # how each setting takes a value, between two decodes
    "depth": lambda v: os.environ.__setitem__("CHESS_MLX_PIPELINE_DEPTH", v),
    "inplace_kv": lambda v: kv_cache.enable_inplace(v != "0"),
}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "dense,chess-attn")
    ap.add_argument("--depths", default="1,2")
    ap.add_argument("--set", help="NAME=V1,V2: the setting to alternate, depth or inplace_kv (default: depth=DEPTHS)")
    ap.add_argument("--json")
    args = ap.parse_args()
    name, values = (args.set or f"depth={args.depths}").split("=")
    if name not in SETTERS:
        ap.error(f"--set takes one of {', '.join(SETTERS)}")
    depths = values.split(",")
    methods = args.methods.split(",")
    model, th, vocab, _ = calibrated_model(args)
    speeds: dict[tuple, list[float]] = {(d, m): [] for d in depths for m in methods}
    for r in range(args.runs + 1):  # round 0: warm-up, not counted
        for d in depths:
            SETTERS[name](d)
            for m in methods:
                with _as_method(model, m, th, 0.5):
                    s = decode_speed(model, n_tokens=args.tokens, runs=1, vocab=vocab, warmup=False)[0]
                if r:
                    speeds[(d, m)].append(s)
    print(f"{name} A/B: {args.preset} {'%d-bit' % args.quantize if args.quantize else 'unquantized'}, "
          f"{args.tokens} tokens x {args.runs} rounds")
    out = {}
    for d in depths:
        for m in methods:
            v = speeds[(d, m)]
            row = dict(median=statistics.median(v), runs=v)
            if m != "dense" and "dense" in methods:
                row["paired_vs_dense"] = statistics.median(a / b for a, b in zip(v, speeds[(d, "dense")]))
            if d != depths[0]:
                row["paired_vs_first_setting"] = statistics.median(a / b for a, b in zip(v, speeds[(depths[0], m)]))
            out[f"{name}{d}_{m}"] = row
            extra = "".join(f", {k} {row[k]:.3f}x" for k in ("paired_vs_dense", "paired_vs_first_setting") if k in row)
            print(f"  {name} {d} {m:<11} {row['median']:6.1f} tok/s (runs {min(v):.1f}-{max(v):.1f}){extra}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
