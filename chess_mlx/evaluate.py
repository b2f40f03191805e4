"""Perplexity with a sliding window, and the sparsity achieved while computing it.

Windows of ``context`` tokens advance by ``stride`` (default context/2); each token is scored
once, with at least ``context - stride`` tokens of left context after the first window (the
Hugging Face "perplexity of fixed-length models" recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .sparse_layers import sparsify
from .stats import TokenStats, merge, summarize


@dataclass
class Perplexity:
    ppl: float
    nll: float  # mean negative log-likelihood (nats/token)
    n_scored: int
    stats: TokenStats


def perplexity(
    model: nn.Module,
    tokens: list[int],
    context: int = 512,
    stride: Optional[int] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Perplexity:
    if len(tokens) < 2:
        raise ValueError("perplexity needs at least two tokens")
    stride = stride or max(1, context // 2)
    state = sparsify(model)
    rec = state.recorder
    rec.clear()
    rec.enabled = True
    ids = mx.array(tokens)
    n = len(tokens)
    total, count, prev_end, calls = 0.0, 0, 0, []
    try:
        for begin in range(0, n, stride):
            end = min(begin + context, n)
            first = max(prev_end, begin + 1)  # first target position scored here
            logits = model(ids[begin:end][None])[0]
            pred = logits[first - 1 - begin : end - 1 - begin].astype(mx.float32)
            nll = nn.losses.cross_entropy(pred, ids[first:end], reduction="sum")
            total += nll.item()
            count += end - first
            calls.extend(rec.pop())
            prev_end = end
            if progress is not None:
                progress(end, n)
            if end == n:
                break
    finally:
        rec.enabled = False
        rec.clear()
    wb = state.weight_bytes
    merged = merge(calls)
    if merged is None:  # dense: nothing recorded
        import numpy as np
        from .stats import CallStats
        merged = CallStats(np.ones(wb.per_proj.shape), count)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, summarize(merged, wb))
