"""Several projections' weights stored as one block, each projection keeping views of its rows.

Why: a one-token product over stacked rows is one graph node (and one kernel input) where the
separate projections are several, and decode on a fast GPU is bound by host time per node and
per input (benchmarks/RESULTS.md, sessions 8 and 15). Storing the block once and giving every
projection its rows back as views keeps memory as it was, and the parameter names, checkpoints,
calibration and the prefill path (mlx-lm's own products) see the same parameters as before.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx
import mlx.nn as nn

KEYS = ("weight", "scales", "biases", "bias")


def fusable(mods: list[nn.Module]) -> bool:
    """Same keys, dtypes, input size and quantization: rows that one product may read together."""
    def sig(m: nn.Module) -> tuple:
        return (tuple(k for k in KEYS if k in m), tuple(m[k].dtype for k in KEYS if k in m), m["weight"].shape[1],
                getattr(m, "bits", None), getattr(m, "group_size", None), getattr(m, "mode", None))
    return all(sig(m) == sig(mods[0]) for m in mods)


def store_rows(mods: list[nn.Module], pack_sb: bool = False) -> dict[str, mx.array]:
    """Concatenate the projections' rows once and give each projection its rows back as views.

    ``pack_sb``: quantized scales and biases go into one block ``sb`` = [every projection's scales;
    every projection's biases] (the layout of ``sparse_gemv.QWeight.sb``), so a kernel takes them
    as one input. Returns the blocks by key ("weight", "scales", "biases", "bias", or "sb")."""
    keys = [k for k in KEYS if k in mods[0]]
    rows = {k: mx.concatenate([m[k] for m in mods], axis=0) for k in keys if not (pack_sb and k in ("scales", "biases"))}
    if pack_sb and "scales" in keys:
        rows["sb"] = mx.concatenate([m["scales"] for m in mods] + [m["biases"] for m in mods], axis=0)
    mx.eval(rows)
    total, start = sum(m["weight"].shape[0] for m in mods), 0
    for m in mods:
        n = m["weight"].shape[0]
        for k, a in rows.items():
            if k == "sb":
                m["scales"], m["biases"] = a[start:start + n], a[total + start:total + start + n]
            else:
                m[k] = a[start:start + n]
        start += n
    mx.eval([m[k] for m in mods for k in keys])
    return rows


class RowStore:
    """One group of projections' stored block, stored again when the projections no longer hold
    the views it gave them (weights loaded since; they take effect at the next set_method)."""

    def __init__(self) -> None:
        self.rows: Optional[dict[str, mx.array]] = None
        self.views: list = []  # the weights as store_rows gave them back

    def rows_of(self, mods: list[nn.Module], pack_sb: bool = False) -> dict[str, mx.array]:
        if self.rows is None or len(self.views) != len(mods) or any(
                m["weight"] is not w for m, w in zip(mods, self.views)):
            self.rows = store_rows(mods, pack_sb)
            self.views = [m["weight"] for m in mods]
        return self.rows
