"""GPU check of the in-place KV cache (``kv_cache.InPlaceKVCache``) against mlx-lm's: the same
teacher-forced decode with each, step by step, then the caches' contents position by position.

    python benchmarks/kv_inplace_check.py [--layers 2] [--prompt 248] [--steps 16] [--methods dense,chess-attn] [--cudnn]

A Llama-3-8B-shaped model with few layers, random float16 weights. Prints, per method, the first
step whose logits differ, the largest difference, and which cache positions differ (layer,
position, max difference), so a lost or misplaced write shows where it is.

What must hold: logits and every layer's cache bit for bit mlx-lm's. Past 256 positions MLX's
CUDA attention decodes through cuDNN, whose results moved by a float16 step between two runs of
CHESS+attention with mlx-lm's own cache on the H100, and by one between the two caches for dense
(session 35). So the check sets ``MLX_CUDA_USE_CUDNN_SDPA=0`` (MLX's own attention kernel
throughout) unless ``--cudnn`` is given; with cuDNN only the first layer's cache, which depends on
the tokens alone, is held exact, and the rest only where two runs with mlx-lm's cache agree
exactly (printed first).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if "--cudnn" not in sys.argv:  # read by MLX when it first decides an attention: set before any
    os.environ["MLX_CUDA_USE_CUDNN_SDPA"] = "0"

import mlx.core as mx  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chess_mlx import kv_cache  # noqa: E402
from chess_mlx.bench import PRESETS, random_model, random_thresholds  # noqa: E402
from chess_mlx.sparse_layers import set_method, sparsify  # noqa: E402


def run(model, prompt: mx.array, forced: list[int], inplace: bool, piped: bool):
    kv_cache.enable_inplace(inplace)
    cache = kv_cache.make_cache(model)
    model(prompt[None], cache=cache)  # the prompt: evaluated with the first step
    logits = []
    for t in forced:
        nxt = model(mx.array([[t]]), cache=cache)[:, -1].astype(mx.float32)
        if piped:
            mx.async_eval(nxt)
        else:
            mx.eval(nxt)
        logits.append(nxt)
    kv = [c.keys_and_values() for c in cache]
    mx.eval(logits, kv)
    return mx.stack(logits), kv, type(cache[0]).__name__


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=248)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--methods", default="dense,chess-attn")
    ap.add_argument("--cudnn", action="store_true", help="leave MLX's cuDNN attention on (results then vary in the last bit)")
    a = ap.parse_args()
    vocab = PRESETS["llama3-8b"]["vocab_size"]
    model = random_model("llama3-8b", a.layers, mx.float16)
    sparsify(model)
    th = random_thresholds(model, vocab, 0.5, 512)
    prompt = mx.random.randint(0, vocab, (a.prompt,), key=mx.random.key(1))
    forced = mx.random.randint(0, vocab, (a.steps,), key=mx.random.key(2)).tolist()
    bad = 0
    for m in a.methods.split(","):
        set_method(model, m, th if m != "dense" else None, 0.5 if m != "dense" else None)
        ref, ref_kv, kind = run(model, prompt, forced, False, False)
        again = run(model, prompt, forced, False, False)[0]
        noise = mx.abs(again - ref).max().item()
        print(f"{m:10s} mlx-lm's cache twice: max logit difference {noise:.3e}", flush=True)
        for piped in (False, True):
            got, kv, kind2 = run(model, prompt, forced, True, piped)
            d = mx.abs(got - ref).max(axis=-1).squeeze().tolist()
            first = next((i for i, x in enumerate(d) if x > 0), None)
            print(f"{m:10s} {'piped' if piped else 'sync '} {kind} vs {kind2}: logits first differ at step "
                  f"{first} (of {a.steps}), max {max(d):.3e}", flush=True)
            for layer, ((k0, v0), (k1, v1)) in enumerate(zip(ref_kv, kv)):
                if k0.shape != k1.shape:
                    print(f"  layer {layer}: shapes {k0.shape} vs {k1.shape}")
                    bad += 1
                    continue
                dk = mx.abs(k0.astype(mx.float32) - k1.astype(mx.float32)).max(axis=(0, 1, 3))
                dv = mx.abs(v0.astype(mx.float32) - v1.astype(mx.float32)).max(axis=(0, 1, 3))
                pos = [(i, max(x, y)) for i, (x, y) in enumerate(zip(dk.tolist(), dv.tolist())) if x or y]
                if pos:
                    bad += layer == 0 or noise == 0
                    print(f"  layer {layer}: {len(pos)} positions differ, first {pos[:6]}", flush=True)
            bad += first is not None and noise == 0
    kv_cache.enable_inplace(True)
    print("in-place cache: " + ("same as mlx-lm's" if not bad else f"{bad} differences"), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
