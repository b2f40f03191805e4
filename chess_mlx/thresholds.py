"""Calibrated thresholds: one file pair next to the model, every method and level inside.

``chess_thresholds.safetensors`` holds, per sparsity level ``s``: ``s/cats`` (L,), ``s/chess``
(L, d_ff), ``s/attn_in`` (L,), ``s/attn_out`` (L,), ``s/mlp_in`` (L,), ``s/down_in`` (L,), plus the
level-free ``up_mean`` (L, d_ff) that CHESS divides by. ``chess_thresholds.json`` says what they
were made from. Every method can therefore switch at run time from one calibration.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import ChessError
from .methods import level_key

STEM = "chess_thresholds"
FORMAT = "chess-mlx-thresholds"
VERSION = 1
LEVEL_TENSORS = ("cats", "chess", "attn_in", "attn_out", "mlp_in", "down_in")


@dataclass
class Thresholds:
    levels: dict[str, dict[str, np.ndarray]]  # level_key -> tensor name -> array
    up_mean: np.ndarray
    fingerprint: str
    meta: dict = field(default_factory=dict)

    @property
    def sparsities(self) -> list[float]:
        return sorted(float(k) for k in self.levels)

    def match(self, sparsity: float | None) -> float:
        """The calibrated level equal to ``sparsity`` (the only one if None), else a clear error."""
        available = self.sparsities
        if sparsity is None:
            if len(available) == 1:
                return available[0]
            raise ChessError(f"several sparsity levels are calibrated ({_fmt(available)}); pick one with --sparsity")
        for s in available:
            if abs(s - sparsity) < 1e-6:
                return s
        raise ChessError(f"sparsity {sparsity:g} is not calibrated; available: {_fmt(available)}")

    def level(self, sparsity: float | None) -> dict[str, np.ndarray]:
        return self.levels[level_key(self.match(sparsity))]

    def save(self, folder: Path) -> tuple[Path, Path]:
        """Write both files atomically (temporary name, then rename)."""
        from safetensors.numpy import save_file

        folder = Path(folder)
        tensors = {"up_mean": self.up_mean.astype(np.float32)}
        for key, lv in self.levels.items():
            for name, arr in lv.items():
                tensors[f"{key}/{name}"] = np.ascontiguousarray(arr, dtype=np.float32)
        meta = dict(self.meta, format=FORMAT, version=VERSION, fingerprint=str(self.fingerprint),
                    sparsities=self.sparsities)
        coarse = getattr(self.fingerprint, "coarse", None)
        if coarse:
            meta["fingerprint_bf16"] = coarse
        else:
            meta.pop("fingerprint_bf16", None)
        st_path, js_path = folder / f"{STEM}.safetensors", folder / f"{STEM}.json"
        for path, write in ((st_path, lambda p: save_file(tensors, str(p))),
                            (js_path, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))):
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.")
            os.close(fd)
            mask = os.umask(0)
            os.umask(mask)
            os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; these are ordinary files
            try:
                write(tmp)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
        return st_path, js_path


def _fmt(levels: list[float]) -> str:
    return ", ".join(f"{s:g}" for s in levels) or "none"


def exists(folder: Path) -> bool:
    return (Path(folder) / f"{STEM}.json").exists() and (Path(folder) / f"{STEM}.safetensors").exists()


def load(folder: Path, fingerprint: str | None = None) -> Thresholds:
    """Read thresholds from ``folder``; refuse them if made for a model with another fingerprint."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    folder = Path(folder)
    js_path, st_path = folder / f"{STEM}.json", folder / f"{STEM}.safetensors"
    if not js_path.exists() or not st_path.exists():
        raise ChessError(f"no calibrated thresholds in {folder}; run 'chess-mlx calibrate {folder}' first")
    try:
        meta = json.loads(js_path.read_text())
        tensors = load_file(str(st_path))
    except (json.JSONDecodeError, SafetensorError, OSError) as e:
        raise ChessError(f"threshold files in {folder} are unreadable: {str(e).splitlines()[0]}") from None
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise ChessError(f"{js_path} is not a chess-mlx thresholds file of version {VERSION}")
    coarse = getattr(fingerprint, "coarse", None)
    if fingerprint is not None and meta.get("fingerprint") != fingerprint and not (
            coarse and meta.get("fingerprint_bf16") == coarse):
        older = "" if meta.get("fingerprint_bf16") else (
            "; a file from before chess-mlx recorded a bfloat16 fingerprint also needs this for the same "
            "weights loaded as bfloat16")
        raise ChessError(
            f"thresholds in {folder} were calibrated for another model "
            f"(fingerprint {meta.get('fingerprint')}, this model is {fingerprint}); recalibrate{older}"
        )
    levels: dict[str, dict[str, np.ndarray]] = {}
    for name, arr in tensors.items():
        if "/" in name:
            key, tname = name.split("/", 1)
            levels.setdefault(key, {})[tname] = arr
    for key, lv in levels.items():
        missing = [t for t in LEVEL_TENSORS if t not in lv]
        if missing:
            raise ChessError(f"{st_path} level {key} lacks {', '.join(missing)}")
    from .model_io import Fingerprint

    return Thresholds(levels, tensors["up_mean"], Fingerprint(meta["fingerprint"], meta.get("fingerprint_bf16")), meta)
