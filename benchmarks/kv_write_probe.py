"""Does a one-token KV cache write copy the whole cache when decode is pipelined?

MLX's slice update writes in place only when its input buffer is donatable. While step t runs on
the GPU its command buffer holds the cache buffer it reads (MLX retains every input's data until
completion), so step t+1's slice update, encoded meanwhile, cannot donate it and copies the whole
buffer: ~2 x 16.8 MB per layer and token for Llama-3-8B keys and values at 4096 positions.

What it showed on the H100 (session 35): nothing. Each layer's few small launches leave this loop
bound by the host's graph building (1.5-2.8 ms a step in every mode), which hides GPU-side
copies; the model's decode (``chess-mlx bench --context 4096``, in-place on and off) is the
measurement that counts. Kept as a functional check of the in-place write under pipelining.

This probe times an attention-only decode step (32 layers of Llama-3-8B's KV shapes: a write of
one position, MLX's one-token attention, the output fed to the next layer) at several contexts:
- ``mlxlm``: mlx-lm's ``KVCache`` (two slice updates);
- ``inplace``: ``chess_mlx.kv_cache.InPlaceKVCache``: one launch writes k and v into the buffers
  in place and hands q on as its output, so the attention, reading that q, is ordered after the
  write (MLX's CUDA graph edges follow output buffers only).
Each mode runs pipelined (step t+1 built and queued before step t is waited for, as decode runs)
and synchronously. The in-place mode is also checked against the functional one.

    python benchmarks/kv_write_probe.py [--contexts 32,250,1024,4096] [--steps 64]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
from mlx_lm.models.cache import KVCache  # noqa: E402

from chess_mlx.kv_cache import InPlaceKVCache  # noqa: E402

HQ, HK, D, LAYERS = 32, 8, 128, 32


def make(mode: str, ctx: int) -> list:
    cls = {"mlxlm": KVCache, "inplace": InPlaceKVCache}[mode]
    caches = [cls() for _ in range(LAYERS)]
    for c in caches:
        z = mx.zeros((1, HK, ctx, D), dtype=mx.float16)
        c.update_and_fetch(z, z)
    mx.eval([c.keys for c in caches])
    return caches


def step(mode: str, caches: list, x: mx.array) -> mx.array:
    """One token through the layers' attention; x (1, HQ, 1, D)."""
    for c in caches:
        q = x * 0.5
        kv = x[:, :2 * HK] * 0.25
        if mode == "inplace":
            q, k, v = c.write(q, kv[:, :HK], kv[:, HK:])
        else:
            k, v = c.update_and_fetch(kv[:, :HK], kv[:, HK:])
        x = 0.5 * x + mx.fast.scaled_dot_product_attention(q, k, v, scale=D ** -0.5)
    return x


def timed(mode: str, ctx: int, steps: int, piped: bool) -> tuple[float, mx.array]:
    caches = make(mode, ctx)
    x = mx.random.normal((1, HQ, 1, D), key=mx.random.key(1)).astype(mx.float16)
    ts, outs = [], []
    y = step(mode, caches, x)
    mx.async_eval(y) if piped else mx.eval(y)
    for _ in range(steps):
        t0 = time.perf_counter()
        if piped:
            ny = step(mode, caches, y)
            mx.async_eval(ny)
            mx.eval(y)
            outs.append(y)
            y = ny
        else:
            y = step(mode, caches, y)
            mx.eval(y)
            outs.append(y)
        ts.append(time.perf_counter() - t0)
    mx.eval(y)
    ts.sort()
    return 1e3 * ts[len(ts) // 2], mx.stack([o.astype(mx.float32) for o in outs[:8]])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="32,250,1024,4096")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--modes", default="mlxlm,inplace")
    a = ap.parse_args()
    print(f"{LAYERS} layers, {HQ}/{HK} heads of {D}, float16, on {mx.default_device()}", flush=True)
    for ctx in (int(c) for c in a.contexts.split(",")):
        for piped in (True, False):
            row, ref = [], None
            for mode in a.modes.split(","):
                ms, out = timed(mode, ctx, a.steps, piped)
                if ref is None:
                    ref = out
                err = mx.abs(out - ref).max().item()
                row.append(f"{mode} {ms:6.3f} ms (max diff {err:.1e})")
            print(f"context {ctx:5d} {'piped' if piped else 'sync '}: " + ", ".join(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
