"""Load a model folder through mlx-lm, with clear errors and a stable fingerprint.

The fingerprint ties calibrated thresholds to the exact weights they were measured on: the same
weights in another float dtype share it, re-quantized or different weights do not.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .errors import ChessError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def read_config(path: Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise ChessError(f"model folder {path} does not exist")
    if not path.is_dir():
        raise ChessError(f"{path} is not a folder")
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise ChessError(f"{path} is not a model folder (no config.json)")
    try:
        config = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ChessError(f"{cfg_file} is not valid JSON: {e}") from None
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ChessError(
            f"unsupported architecture {model_type!r} in {path}; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if not any(path.glob("*.safetensors")):
        raise ChessError(f"{path} holds no *.safetensors weights")
    return config


def default_dtype() -> mx.Dtype:
    """float32 on the CPU (MLX's CPU half-precision paths are slow and less exact), else float16."""
    return mx.float32 if mx.default_device() == mx.cpu else mx.float16


def load_model(path: Path | str, dtype: str | None = None):
    """Load (model, tokenizer, config) from a local folder; float weights cast to ``dtype``."""
    from mlx_lm.utils import load

    path = Path(path)
    config = read_config(path)
    try:
        model, tokenizer = load(str(path))
    except Exception as e:  # mlx-lm raises bare ValueError/FileNotFoundError/... on bad folders
        raise ChessError(f"could not load model from {path}: {str(e).splitlines()[0]}") from None
    target = getattr(mx, dtype) if dtype else default_dtype()
    cast_floats(model, target)
    return model, tokenizer, config


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast floating parameters only; quantized (integer) weights keep their type."""
    params = tree_flatten(model.parameters())
    model.load_weights(
        [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params],
        strict=False,
    )
    mx.eval(model.parameters())


def fingerprint(model: nn.Module) -> str:
    """sha256 over parameter names, shapes and a deterministic sample of each tensor's values.

    Floating tensors are sampled as float16 so a float16 model and its float32 copy agree.
    """
    h = hashlib.sha256()
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = value.reshape(-1)
        n = flat.size
        idx = np.unique(np.concatenate([np.arange(min(n, 256)), np.linspace(0, n - 1, 1024).astype(np.int64)]))
        sample = flat[mx.array(idx)]
        if mx.issubdtype(sample.dtype, mx.floating):
            sample = sample.astype(mx.float16)
        h.update(f"{name}:{tuple(value.shape)}:{'f' if mx.issubdtype(value.dtype, mx.floating) else value.dtype}".encode())
        h.update(np.array(sample).tobytes())
    return h.hexdigest()[:32]


def model_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ChessError("model has no .model.layers; only Llama-style mlx-lm models are supported")
    return layers
