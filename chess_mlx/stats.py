"""Live sparsity statistics, recorded by the sparse layers and read by the CLI and the UI.

Each sparse projection reports the density of what it really reads (kept input columns or
output rows, as a fraction). Densities arrive as lazy MLX scalars, grouped per forward call, and
are evaluated only when someone reads them, so recording costs the decode loop almost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import numpy as np

from .methods import PROJS

_P = {p: i for i, p in enumerate(PROJS)}


@dataclass
class CallStats:
    """Densities of one forward call: ``density[layer, proj]`` (1.0 where a projection is dense)."""

    density: np.ndarray
    n_tokens: int

    @classmethod
    def dense(cls, n_layers: int, n_tokens: int = 1) -> "CallStats":
        """What a dense call reads: every projection in full (nothing is recorded then)."""
        return cls(np.ones((n_layers, len(PROJS))), n_tokens)


def kept_fraction(keep: mx.array) -> mx.array:
    """Density of a keep mask, as a lazy float32 scalar."""
    return keep.astype(mx.float32).mean()


class SparsityRecorder:
    """Collects per-call densities. A new call starts when a (layer, proj) slot repeats."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.enabled = True
        self._current: dict[tuple[int, int], mx.array] = {}
        self._current_tokens = 0
        self._pending: list[tuple[dict, int]] = []

    def record(self, layer: int, projs: str | tuple[str, ...], keep: mx.array) -> None:
        """Record the density of ``keep`` for one projection or several that read the same input."""
        if self.enabled:
            self.record_density(layer, projs, kept_fraction(keep), keep.size // keep.shape[-1])

    def record_density(self, layer: int, projs: str | tuple[str, ...], density: mx.array, n_tokens: int) -> None:
        """Record an already computed kept fraction (a lazy scalar), e.g. from a compiled path."""
        if not self.enabled:
            return
        keys = [(layer, _P[p]) for p in ((projs,) if isinstance(projs, str) else projs)]
        if any(k in self._current for k in keys):
            self._close()
        for k in keys:
            self._current[k] = density
        self._current_tokens = n_tokens

    def _close(self) -> None:
        if self._current:
            self._pending.append((self._current, self._current_tokens))
        self._current, self._current_tokens = {}, 0

    def current(self) -> list[mx.array]:
        """The lazy densities of the call in progress (for a decode loop to schedule with its step)."""
        return list(self._current.values())

    def pop(self, closed_only: bool = False) -> list[CallStats]:
        """Finish the call in progress (unless ``closed_only``: a decode loop one step ahead leaves
        the step it has just built open) and return every call not yet read, oldest first."""
        if not closed_only:
            self._close()
        pending, self._pending = self._pending, []
        if not pending:
            return []
        mx.eval([v for d, _ in pending for v in d.values()])
        out = []
        for d, n in pending:
            dens = np.ones((self.n_layers, len(PROJS)), dtype=np.float64)
            for (layer, p), v in d.items():
                dens[layer, p] = v.item()
            out.append(CallStats(dens, n))
        return out

    def clear(self) -> None:
        self._current, self._pending = {}, []


@dataclass
class WeightBytes:
    """Dense byte size of every projection, to turn densities into bytes read per token."""

    per_proj: np.ndarray  # (n_layers, 7)
    other: int  # lm_head (tied or not): always read in full

    @property
    def dense_total(self) -> int:
        return int(self.per_proj.sum()) + self.other


@dataclass
class TokenStats:
    """What one forward call achieved, in the units the paper and the UI use."""

    ffn_sparsity: float  # zero fraction of the FFN activations that reach down_proj
    attn_sparsity: float  # zero fraction of thresholded attention inputs (q_proj and o_proj)
    ffn_per_layer: np.ndarray
    attn_per_layer: np.ndarray
    bytes_read: int
    bytes_dense: int
    n_tokens: int = 1
    density: np.ndarray = field(repr=False, default=None)

    @property
    def bytes_fraction(self) -> float:
        return self.bytes_read / self.bytes_dense if self.bytes_dense else 1.0


def summarize(call: CallStats, wb: WeightBytes) -> TokenStats:
    d = call.density
    ffn = 1.0 - d[:, _P["down"]]
    attn = 1.0 - 0.5 * (d[:, _P["q"]] + d[:, _P["o"]])
    read = float((d * wb.per_proj).sum()) + wb.other
    return TokenStats(
        ffn_sparsity=float(ffn.mean()),
        attn_sparsity=float(attn.mean()),
        ffn_per_layer=ffn,
        attn_per_layer=attn,
        bytes_read=int(round(read)),
        bytes_dense=wb.dense_total,
        n_tokens=call.n_tokens,
        density=d,
    )


def merge(calls: list[CallStats]) -> CallStats | None:
    """Token-weighted mean of several calls (e.g. a whole evaluated text)."""
    if not calls:
        return None
    w = np.array([c.n_tokens for c in calls], dtype=np.float64)
    dens = np.tensordot(w / w.sum(), np.stack([c.density for c in calls]), axes=1)
    return CallStats(np.clip(dens, 0.0, 1.0), int(w.sum()))  # no -0.0% from rounding
