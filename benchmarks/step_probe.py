"""Why a whole compiled decode step (``chess_mlx.compiled_step``) costs more host time than the
op-by-op model: per-token build/encode/wait split and graph node counts, per variant.

    python benchmarks/step_probe.py [--quantize 4] [--layers 32] [--methods dense,chess] [--dot DIR]

Each ``step`` row also checks the compiled step against the op-by-op model (``check``).
Variants: ``op`` (the model op by op), ``step`` (compiled step), ``step-nomask`` (compiled step,
attention without the buffer mask: wrong numbers, timing only), ``step-noinner`` (compiled step
with the per-block compiled paths off inside it).
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import compiled_step, decode_paths  # noqa: E402
from chess_mlx.bench import PRESETS, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from host_probe import prefilled, split_times  # noqa: E402


def node_counts(model, vocab: int, path: Path) -> dict:
    cache, tok = prefilled(model, vocab)
    step = compiled_step.wrap(model)
    y = step(tok[None], cache=cache)
    mx.export_to_dot(str(path), y, *[c.keys for c in cache])
    ops = collections.Counter()
    for line in path.read_text().splitlines():
        m = re.search(r'label\s*=\s*"([A-Za-z_]+)", shape=rectangle', line)
        if m:
            ops[m.group(1)] += 1
    mx.eval(y)
    return dict(ops.most_common())


def check(model, vocab: int, n: int = 16) -> dict:
    """The compiled step against the model op by op, teacher-forced on the same greedy tokens:
    the largest logit difference relative to the largest logit, and argmax agreement."""
    cache_a, tok = prefilled(model, vocab)
    cache_b, _ = prefilled(model, vocab)
    step = compiled_step.wrap(model)
    worst, same = 0.0, 0
    for _ in range(n):
        a = model(tok[None], cache=cache_a)[:, -1].astype(mx.float32)
        b = step(tok[None], cache=cache_b)[:, -1].astype(mx.float32)
        worst = max(worst, (mx.abs(a - b).max() / mx.abs(a).max()).item())
        same += int(mx.argmax(a).item() == mx.argmax(b).item())
        tok = mx.argmax(a, axis=-1)
    return {"rel_err": worst, "argmax_same": f"{same}/{n}"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--quantize", type=int, choices=(4, 8))
    ap.add_argument("--methods", default="dense,chess")
    ap.add_argument("--variants", default="op,step,step-nomask,step-noinner")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--dot", help="folder for one token's graph per variant (GraphViz)")
    args = ap.parse_args()
    gpu = mx.default_device() == mx.gpu
    model = random_model(args.preset, args.layers, mx.float16 if gpu else mx.float32, bits=args.quantize)
    vocab = PRESETS[args.preset]["vocab_size"]
    if not gpu:  # a logic check of the probe: the compiled step also on the CPU
        wrap = compiled_step.wrap
        compiled_step.wrap = lambda model, cpu=True: wrap(model, cpu)
    sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (2, 256), key=mx.random.key(7)), [0.5])
    mask = compiled_step._TraceCache.make_mask
    for m in args.methods.split(","):
        for v in args.variants.split(","):
            set_method(model, m, th, 0.5)  # a fresh trace per variant
            compiled_step.enable(v != "op")
            decode_paths.enable(v != "step-noinner")
            compiled_step._TraceCache.make_mask = (lambda self, n, **k: None) if v == "step-nomask" else mask
            split_times(model, 8, vocab)
            r = {"method": m, "variant": v, **split_times(model, args.tokens, vocab)}
            if v == "step":
                r["check"] = check(model, vocab)
            if args.dot:
                Path(args.dot).mkdir(parents=True, exist_ok=True)
                r["nodes"] = node_counts(model, vocab, Path(args.dot) / f"{m}_{v}.dot")
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
