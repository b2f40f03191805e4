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


def context_length(model: nn.Module) -> int:
    """The model's trained context (``max_position_embeddings``); 0 when the config does not say."""
    return int(getattr(getattr(model, "args", None), "max_position_embeddings", 0) or 0)


def memory_note(model: nn.Module) -> str:
    """What to tell when the weights take over 80% of what the device can give: decoding then
    swaps and crawls, where a 4-bit copy would fit; else ''."""
    have = device_memory_bytes()
    need = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if have and need > 0.8 * have:
        return (f"the weights take {need / 1e9:.1f} GB of this device's {have / 1e9:.1f} GB; expect swapping, "
                "or convert a 4-bit copy (chess-mlx convert --quantize 4)")
    return ""
