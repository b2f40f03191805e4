"""Calibration: activation statistics of the dense model -> thresholds for every method.

The model is walked one block at a time over all calibration tokens (embeddings, then block 0 on
every sequence, then block 1, ...). Only one block's statistics are ever in memory, so quantiles
are taken **exactly over all calibration tokens** of that block (``numpy.quantile``, linear
interpolation), not averaged over samples as in the paper's code. When one statistic of one block
would exceed ``max_values`` numbers, a seeded uniform subsample of tokens is used for that
statistic instead; the CHESS channel means ``E|up_i|`` always use every token.

Per block and sparsity level s:
  cats     = quantile(|a|, s)                    a = SiLU(gate(x))
  up_mean  = mean over tokens of |up(x)_i|       (m_i)
  chess_i  = quantile(|a_i| * m_i, s) / m_i
  attn_in  = quantile(|h|, s)                    h = input of q/k/v_proj (normalized block input)
  attn_out = quantile(|o|, s)                    o = input of o_proj
  mlp_in   = quantile(|x|, s)                    x = input of gate/up_proj (TEAL)
  down_in  = quantile(|a * up(x)|, s)            input of down_proj (TEAL)
"""

from __future__ import annotations

from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ChessError
from .methods import DENSE, level_key
from .model_io import fingerprint, model_layers
from .sparse_layers import set_method, sparse_modules, sparsify
from .thresholds import Thresholds

TINY = 1e-12
STORED = ("attn_in", "attn_out", "mlp_in", "act", "down_in")


def _block_mask(model: nn.Module, layer: nn.Module, h: mx.array):
    from mlx_lm.models.base import create_attention_mask

    window = getattr(model.model, "sliding_window", None) if getattr(layer, "use_sliding", False) else None
    return create_attention_mask(h, None, window_size=window)


class _LayerStats:
    """Absolute values of one block's activations, with an optional token subsample."""

    def __init__(self, n_tokens: int, max_values: int, seed: int):
        self.n_tokens, self.max_values = n_tokens, max_values
        self.rng = np.random.default_rng(seed)
        self.keep: dict[int, np.ndarray] = {}  # width -> sorted kept token indices
        self.rows: dict[str, list[np.ndarray]] = {k: [] for k in STORED}
        self.up_sum: np.ndarray | None = None
        self.offset = 0  # first token index of the batch being collected

    def _kept(self, width: int) -> np.ndarray | None:
        if self.n_tokens * width <= self.max_values:
            return None
        if width not in self.keep:
            k = max(1, self.max_values // width)
            self.keep[width] = np.sort(self.rng.choice(self.n_tokens, size=k, replace=False))
        return self.keep[width]

    def add(self, name: str, x: mx.array) -> None:
        a = np.abs(np.array(x.astype(mx.float32))).reshape(-1, x.shape[-1])
        if name == "up":
            s = a.sum(axis=0, dtype=np.float64)
            self.up_sum = s if self.up_sum is None else self.up_sum + s
            return
        kept = self._kept(a.shape[1])
        if kept is not None:
            lo, hi = self.offset, self.offset + a.shape[0]
            sel = kept[(kept >= lo) & (kept < hi)] - lo
            a = a[sel]
        self.rows[name].append(a)

    def thresholds(self, sparsities: np.ndarray) -> dict[str, np.ndarray]:
        cat = {k: np.concatenate(v) for k, v in self.rows.items()}
        m = np.maximum(self.up_sum / self.n_tokens, TINY)
        tau = np.quantile(cat["act"] * m[None, :].astype(np.float32), sparsities)
        return {
            "cats": np.quantile(cat["act"], sparsities),
            "chess": tau[:, None] / m[None, :],
            "attn_in": np.quantile(cat["attn_in"], sparsities),
            "attn_out": np.quantile(cat["attn_out"], sparsities),
            "mlp_in": np.quantile(cat["mlp_in"], sparsities),
            "down_in": np.quantile(cat["down_in"], sparsities),
            "up_mean": m,
        }


def _check_finite(th: dict[str, np.ndarray], layer: int, dtype: mx.Dtype) -> None:
    """A non-finite activation makes every quantile after it NaN or inf: refuse rather than write
    thresholds that silently switch a layer fully on or fully off."""
    bad = [name for name, v in th.items() if not np.isfinite(v).all()]
    if bad:
        hint = "; float16 may overflow on this model: try --dtype bfloat16" if dtype == mx.float16 else ""
        raise ChessError(f"calibration: block {layer}'s activations are not finite (inf or NaN) on the "
                         f"calibration text ({', '.join(sorted(bad))}){hint}")


def calibrate(
    model: nn.Module,
    tokens: mx.array,
    sparsities: list[float],
    *,
    batch_size: int = 4,
    max_values: int = 1 << 23,
    seed: int = 0,
    progress: Optional[Callable[[int, int], None]] = None,
    meta: Optional[dict] = None,
) -> Thresholds:
    """Thresholds for every method at every level in ``sparsities`` from ``tokens`` (S, T)."""
    sparsify(model)
    set_method(model, DENSE)
    layers = model_layers(model)
    S, T = tokens.shape
    levels = np.array(sparsities, dtype=np.float64)
    hidden = [model.model.embed_tokens(tokens[i : i + batch_size]) for i in range(0, S, batch_size)]
    per_layer: list[dict[str, np.ndarray]] = []
    for li, layer in enumerate(layers):
        stats = _LayerStats(S * T, max_values, seed + li)
        projs, mlp = sparse_modules(layer)
        projs["q"].ctl.collector = lambda _p, x: stats.add("attn_in", x)
        projs["o"].ctl.collector = lambda _p, x: stats.add("attn_out", x)
        mlp.ctl.collector = stats.add
        try:
            for b, h in enumerate(hidden):
                stats.offset = b * batch_size * T
                out = layer(h, _block_mask(model, layer, h), cache=None)
                mx.eval(out)
                hidden[b] = out
        finally:
            projs["q"].ctl.collector = projs["o"].ctl.collector = mlp.ctl.collector = None
        per_layer.append(stats.thresholds(levels))
        _check_finite(per_layer[-1], li, hidden[0].dtype)
        if progress is not None:
            progress(li + 1, len(layers))
    out_levels = {}
    for j, s in enumerate(sparsities):
        out_levels[level_key(s)] = {
            name: np.stack([pl[name][j] for pl in per_layer]).astype(np.float32)
            for name in ("cats", "chess", "attn_in", "attn_out", "mlp_in", "down_in")
        }
    up_mean = np.stack([pl["up_mean"] for pl in per_layer]).astype(np.float32)
    info = dict(meta or {}, calibration_tokens=int(S * T), sequence_length=int(T),
                quantile="exact over all calibration tokens per block (numpy linear)",
                max_values_per_statistic=int(max_values))
    return Thresholds(out_levels, up_mean, fingerprint(model), info)
