"""What a device and a model allow: the memory MLX can use, and the model's trained context.

The CLI checks both before long work (a benchmark preset that would not fit, a window past the
context) and warns where work can go on but badly (weights near the memory limit, a prompt past
the context).
"""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import ChessError

MEMORY_SHARE = 0.8  # weights past this share of the device's memory: a laptop swaps for minutes


def device_memory_bytes() -> int | None:
    """Memory the device can give MLX: Metal's recommended working set (what macOS lets one process
    wire before it swaps), else the device's total, else for the CPU the machine's RAM; None when
    unknown (the callers then do not check)."""
    try:
        info = mx.device_info()
    except Exception:  # older MLX
        info = {}
    for key in ("max_recommended_working_set_size", "memory_size", "total_memory"):
        if info.get(key):
            return int(info[key])
    if mx.default_device() == mx.cpu:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None
    return None


def memory_short(need: float) -> int | None:
    """The device's memory when ``need`` bytes of weights pass ``MEMORY_SHARE`` of it (decoding would
    swap or the process be killed); None when they fit or the memory is unknown."""
    have = device_memory_bytes()
    return have if have and need > MEMORY_SHARE * have else None


def context_length(model: nn.Module) -> int:
    """The model's trained context (``max_position_embeddings``); 0 when the config does not say."""
    return int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 0)


def check_window(model: nn.Module, option: str, n: int) -> None:
    """Refuse a measurement window longer than the model's context: positions past the trained
    length give perplexities and activation statistics of a model that is no longer itself."""
    limit = context_length(model)
    if limit and n > limit:
        raise ChessError(f"{option} {n} passes the model's context of {limit} tokens")


def memory_note(model: nn.Module) -> str:
    """What to tell when the weights take over ``MEMORY_SHARE`` of what the device can give: decoding then
    swaps and crawls, where a 4-bit copy would fit; else ''."""
    need = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    have = memory_short(need)
    if have:
        return (f"the weights take {need / 1e9:.1f} GB of this device's {have / 1e9:.1f} GB; expect swapping, "
                "or convert a 4-bit copy (chess-mlx convert --quantize 4)")
    return ""
