"""Perplexity with a sliding window, and the sparsity achieved while computing it.

Windows of ``context`` tokens advance by ``stride`` (default context/2); each token is scored
once, with at least ``context - stride`` tokens of left context after the first window (the
Hugging Face "perplexity of fixed-length models" recipe).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn

from .sparse_layers import sparsify
from .stats import CallStats, TokenStats, merge, summarize


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
    merged = merge(calls) or CallStats.dense(wb.per_proj.shape[0], count)
    mean = total / count
    return Perplexity(math.exp(mean), mean, count, summarize(merged, wb))


# ------------------------------------------------------------------ quality vs sparsity ---------
@dataclass
class EvalRow:
    method: str
    sparsity: Optional[float]
    ppl: Optional[float] = None
    ppl_ffn_sparsity: Optional[float] = None
    ppl_attn_sparsity: Optional[float] = None
    weight_bytes_fraction: Optional[float] = None
    tasks: dict = None  # task name -> {"acc", "acc_norm", "n", "ffn_sparsity"}


def run_eval(model: nn.Module, tokenizer, thresholds, runs: list[tuple[str, Optional[float]]],
             ppl_tokens: Optional[list[int]] = None, tasks: Optional[list] = None, context: int = 512,
             on_run: Optional[Callable[[int, int, str], None]] = None) -> list[EvalRow]:
    """Perplexity and/or task accuracy for every (method, sparsity) run, with achieved sparsity."""
    from .sparse_layers import set_method
    from .tasks import score_task

    state = sparsify(model)
    rows = []
    for k, (method, level) in enumerate(runs):
        if on_run is not None:
            on_run(k, len(runs), f"{method}{'' if level is None else f'@{level:g}'}")
        set_method(model, method, thresholds, level)
        row = EvalRow(method, level, tasks={})
        if ppl_tokens is not None:
            r = perplexity(model, ppl_tokens, context=context)
            row.ppl, row.ppl_ffn_sparsity = r.ppl, r.stats.ffn_sparsity
            row.ppl_attn_sparsity, row.weight_bytes_fraction = r.stats.attn_sparsity, r.stats.bytes_fraction
        for task in tasks or []:
            state.recorder.clear()
            state.recorder.enabled = True
            try:
                s = score_task(model, tokenizer, task)
                calls = state.recorder.pop()
            finally:
                state.recorder.enabled = False
            merged = merge(calls)
            row.tasks[task.name] = {"acc": s.acc, "acc_norm": s.acc_norm, "n": s.n,
                                    "ffn_sparsity": 0.0 if merged is None else summarize(merged, state.weight_bytes).ffn_sparsity}
        rows.append(row)
    set_method(model, "dense")
    return rows


def write_outputs(rows: list[EvalRow], out_dir: Path, meta: dict) -> list[Path]:
    """results.json, results.csv and (with matplotlib installed) quality_vs_sparsity.png."""
    import csv
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    data = {"meta": meta, "results": [r.__dict__ for r in rows]}
    (out_dir / "results.json").write_text(json.dumps(data, indent=2) + "\n")
    written.append(out_dir / "results.json")
    task_names = sorted({t for r in rows for t in (r.tasks or {})})
    with open(out_dir / "results.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["method", "sparsity", "ppl", "ppl_ffn_sparsity", "ppl_attn_sparsity", "weight_bytes_fraction"]
                   + [f"{t}_{k}" for t in task_names for k in ("acc", "acc_norm", "ffn_sparsity")])
        for r in rows:
            w.writerow([r.method, r.sparsity, r.ppl, r.ppl_ffn_sparsity, r.ppl_attn_sparsity, r.weight_bytes_fraction]
                       + [r.tasks.get(t, {}).get(k) for t in task_names for k in ("acc", "acc_norm", "ffn_sparsity")])
    written.append(out_dir / "results.csv")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    panels = (["ppl"] if any(r.ppl is not None for r in rows) else []) + task_names
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        for method in dict.fromkeys(r.method for r in rows):
            pts = [(r.sparsity or 0.0, r.ppl if panel == "ppl" else r.tasks.get(panel, {}).get("acc_norm"))
                   for r in rows if r.method == method]
            pts = [p for p in pts if p[1] is not None]
            if method == "dense":
                ax.axhline(pts[0][1], color="gray", linestyle="--", label="dense")
            elif pts:
                ax.plot(*zip(*sorted(pts)), marker="o", label=method)
        ax.set_xlabel("target sparsity")
        ax.set_ylabel("perplexity" if panel == "ppl" else f"{panel} acc_norm")
        if panel == "ppl":
            ax.set_yscale("log")
        ax.legend()
    fig.suptitle(Path(meta.get("model") or "").name)
    fig.tight_layout()
    fig.savefig(out_dir / "quality_vs_sparsity.png", dpi=110)
    plt.close(fig)
    written.append(out_dir / "quality_vs_sparsity.png")
    return written
