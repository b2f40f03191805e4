"""GPU check of the compiled decode paths: same greedy tokens and logits as the op-by-op path.

    python benchmarks/compile_check.py [--layers 4] [--json OUT]

A Llama-3-8B-shaped model with few layers and random float16 weights, thresholds calibrated at
50% on random tokens; for every method, 16 greedy decode steps with ``decode_paths`` on and off.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_paths  # noqa: E402
from chess_mlx.bench import PRESETS, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.methods import METHODS  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def greedy(model, prompt, n):
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[:, -1]
    toks, outs = [], []
    for _ in range(n):
        t = mx.argmax(logits, axis=-1)
        toks.append(int(t.item()))
        logits = model(t[None], cache=cache)[:, -1]
        outs.append(logits.astype(mx.float32))
    return toks, mx.stack(outs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json")
    args = ap.parse_args()
    model = random_model("llama3-8b", args.layers, mx.float16)
    vocab = PRESETS["llama3-8b"]["vocab_size"]
    state = sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (4, 256), key=mx.random.key(7)), [0.5])
    prompt = mx.random.randint(0, vocab, (16,), key=mx.random.key(1))
    rows, ok = [], True
    for m in METHODS:
        set_method(model, m, th, 0.5)
        res = {}
        for on in (True, False):
            decode_paths.enable(on)
            state.recorder.enabled = True
            toks, logits = greedy(model, prompt, 16)
            calls = [c for c in state.recorder.pop() if c.n_tokens == 1]
            state.recorder.enabled = False
            dens = np.mean([c.density for c in calls], axis=0) if calls else np.ones(1)
            res[on] = (toks, logits, dens)
        err = float(mx.max(mx.abs(res[True][1] - res[False][1])) / mx.max(mx.abs(res[False][1])))
        same = res[True][0] == res[False][0]
        dens_err = float(np.abs(res[True][2] - res[False][2]).max())
        good = same and err < 1e-2 and dens_err < 1e-6
        ok &= good
        rows.append(dict(method=m, same_tokens=same, max_rel_logit_err=err, max_density_err=dens_err))
        print(f"{m:<11} tokens equal: {same}  max rel logit err {err:.2e}  density err {dens_err:.1e}  "
              f"{'ok' if good else 'FAIL'}", flush=True)
    decode_paths.enable(True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
