"""GPU check of the compiled decode paths (per layer, ``decode_paths``, and the whole step,
``decode_step``): same greedy tokens and logits as the op-by-op path.

    python benchmarks/compile_check.py [--layers 4] [--json OUT]

A Llama-3-8B-shaped model with few layers and random float16 weights, thresholds calibrated at
50% on random tokens; for every method, 16 teacher-forced decode steps in each mode of ``modes``
(kernels op by op, per-layer compiled paths, whole-step decoder, and the reference products eager
and whole-step), each compared as ``checks`` says.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import decode_paths, decode_step  # noqa: E402
from chess_mlx import sparse_gemv as G  # noqa: E402
from chess_mlx.bench import PRESETS, random_model  # noqa: E402
from chess_mlx.calibrate import calibrate  # noqa: E402
from chess_mlx.methods import METHODS  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def greedy(model, prompt, n, forced=None):
    """Greedy tokens and the logits of each step; with ``forced`` (another run's tokens) those
    are fed instead, so one rounding flip cannot send the two runs down different texts."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    logits = model(prompt[None], cache=cache)[:, -1]
    toks, outs = [], []
    for i in range(n):
        t = mx.argmax(logits, axis=-1)
        toks.append(int(t.item()))
        if forced is not None:
            t = mx.array([forced[i]], dtype=t.dtype)
        logits = model(t[None], cache=cache)[:, -1]
        outs.append(logits.astype(mx.float32))
    return toks, mx.stack(outs)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--json")
    args = ap.parse_args()
    model = random_model(args.preset, args.layers, mx.float16)
    vocab = PRESETS[args.preset]["vocab_size"]
    state = sparsify(model)
    th = calibrate(model, mx.random.randint(0, vocab, (4, 256), key=mx.random.key(7)), [0.5])
    prompt = mx.random.randint(0, vocab, (16,), key=mx.random.key(1))
    rows, ok = [], True
    # Each mode: (kernels or the reference products, per-layer compiled paths, whole-step decoder).
    modes = {"op": (True, False, False), "paths": (True, True, False), "step": (True, True, True),
             "step2": (True, True, True), "ref": (False, False, False), "ref-step": (False, False, True)}
    # What each is checked against, and how close it must be. "paths" runs the very ops of "op";
    # "step2" repeats "step" (determinism); "ref-step" is the whole step on the reference products,
    # which isolates what tracing the whole step changes (fused elementwise work, attention masked
    # over the cache's capacity) from what the kernels change. "step" vs "op" combines both: under
    # float16 a thresholded input near its threshold may be decided the other way, which random
    # weights amplify, so it is reported beside "op" vs "ref", the kernels' own distance.
    checks = [("paths", "op", 0, 1e-6, 1e-2), ("step2", "step", 0, 0.0, 0.0), ("ref-step", "ref", 1, 1e-3, 1e-2),
              ("op", "ref", None, None, None), ("step", "ref", None, None, None), ("step", "op", None, None, None)]
    for m in METHODS:
        set_method(model, m, th, 0.5)
        res = {}
        dec = decode_step.decoder(model)
        for mode, (kernels, paths, whole) in modes.items():
            G.force_reference(not kernels)
            decode_paths.enable(paths)
            state.recorder.enabled = True
            before = dec.replays
            toks, logits = greedy(dec if whole else model, prompt, 16, res["op"][0] if res else None)
            calls = [c for c in state.recorder.pop() if c.n_tokens == 1]
            state.recorder.enabled = False
            if whole and dec.replays - before < 14:
                print(f"{m}: the whole-step decoder replayed only {dec.replays - before} of 16 steps")
                ok = False
            dens = np.mean([c.density for c in calls], axis=0) if calls else np.ones(1)
            res[mode] = (toks, logits, dens)
        G.force_reference(False)
        for mode, base, max_flips, max_dens, max_err in checks:
            got, want = res[mode], res[base]
            err = float(mx.max(mx.abs(got[1] - want[1])) / mx.max(mx.abs(want[1])))
            flips = sum(a != b for a, b in zip(got[0], want[0]))
            dens_err = float(np.abs(got[2] - want[2]).max())
            verdict = "info"
            if max_flips is not None:
                good = flips <= max_flips and dens_err <= max_dens and err <= max_err
                ok &= good
                verdict = "ok" if good else "FAIL"
            rows.append(dict(method=m, mode=mode, vs=base, flips=flips, max_rel_logit_err=err,
                             max_density_err=dens_err, verdict=verdict))
            print(f"{m:<11} {mode:<8} vs {base:<4} argmax flips: {flips:2d}  max rel logit err {err:.2e}  "
                  f"density err {dens_err:.1e}  {verdict}", flush=True)
    decode_paths.enable(True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
