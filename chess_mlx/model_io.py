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


def load_model(path: Path | str, dtype: str | None = None, lazy: bool = False):
    """Load (model, tokenizer, config) from a local folder; float weights cast to ``dtype``.
    ``lazy``: nothing is read yet (``evaluate_by_layer`` reads it), so a converter never holds the
    source and its converted copy whole at once."""
    from mlx_lm.utils import load

    path = Path(path)
    config = read_config(path)
    try:
        model, tokenizer = load(str(path), lazy=lazy)
    except Exception as e:  # mlx-lm raises bare ValueError/FileNotFoundError/... on bad folders
        raise ChessError(f"could not load model from {path}: {str(e).splitlines()[0]}") from None
    check_vocab(model, tokenizer, path)
    target = getattr(mx, dtype) if dtype else default_dtype()
    cast_floats(model, target, evaluate=not lazy)
    return model, tokenizer, config


def check_vocab(model: nn.Module, tokenizer, path: Path) -> None:
    """Refuse a tokenizer that can emit ids past the model's embedding rows: MLX does not bounds-check
    a gather, so such an id reads memory that is not the table (NaN thresholds, a crash), never a
    clear error. Added tokens past the rows are let through (some checkpoints add a pad token they
    never embed); the base vocabulary is what plain text encodes to."""
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    rows = getattr(getattr(embed, "weight", None), "shape", (None,))[0]
    n = getattr(tokenizer, "vocab_size", None)
    if isinstance(rows, int) and isinstance(n, int) and n > rows:
        raise ChessError(f"{path}: the tokenizer has {n} tokens but the model's embedding only {rows} rows; "
                         "the tokenizer files do not belong to these weights")


def cast_floats(model: nn.Module, dtype: mx.Dtype, evaluate: bool = True) -> None:
    """Cast floating parameters only; quantized (integer) weights keep their type."""
    params = tree_flatten(model.parameters())
    model.load_weights(
        [(k, v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in params],
        strict=False,
    )
    if evaluate:
        mx.eval(model.parameters())


def evaluate_by_layer(model: nn.Module, extra: dict[str, mx.array] | None = None) -> None:
    """Evaluate a lazily loaded (and perhaps lazily quantized) model one block at a time, with the
    ``extra`` arrays named by the parameter they read (fingerprint samples): each block's source
    weights are read, turned into what the model now holds, and let go before the next block, so
    the peak is the result plus one source block (an 8B float16 -> 4-bit conversion held 20 GB
    read whole)."""
    extra = dict(extra or {})
    for i, layer in enumerate(model_layers(model)):
        prefix = f"model.layers.{i}."
        mine = [extra.pop(k) for k in [k for k in extra if k.startswith(prefix)]]
        mx.eval(layer.parameters(), mine)
    # the rest one tensor at a time: the embedding and the head are each a block's size or more
    for name, value in tree_flatten(model.parameters()):
        mx.eval(value, [extra.pop(name)] if name in extra else [])
    mx.eval(list(extra.values()))


class Fingerprint(str):
    """A model's fingerprint: the hash of its weights sampled as float16 (what threshold files
    store since their first version, and what compares equal), carrying ``coarse``, the same sample
    as bfloat16. The float16 sample makes a float16 model and its float32 copy agree; it cannot
    make a bfloat16 copy agree (bfloat16 keeps fewer mantissa bits, so `--dtype bfloat16` found the
    shipped model's thresholds "calibrated for another model"). The bfloat16 sample can; it alone
    would not make a float32-stored model agree with its float16 copy (rounding twice is not
    rounding once). So files keep both and a model matches if either does (``thresholds.load``)."""

    coarse: str | None

    def __new__(cls, fine: str, coarse: str | None = None) -> "Fingerprint":
        obj = super().__new__(cls, fine)
        obj.coarse = coarse
        return obj


FingerprintParts = list[tuple[str, tuple, mx.array]]


def fingerprint_parts(model: nn.Module) -> FingerprintParts:
    """(name, shape, sample) of every parameter, the samples lazy: taken before a lazy model is
    quantized, they let ``fingerprint_of`` hash the source without it being held whole."""
    parts = []
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = value.reshape(-1)
        n = flat.size
        idx = np.unique(np.concatenate([np.arange(min(n, 256)), np.linspace(0, n - 1, 1024).astype(np.int64)]))
        parts.append((name, tuple(value.shape), flat[mx.array(idx)]))
    return parts


def fingerprint(model: nn.Module) -> Fingerprint:
    """sha256 over parameter names, shapes and a deterministic sample of each tensor's values, the
    floating ones as float16 (the fingerprint) and as bfloat16 (its ``coarse`` twin)."""
    return fingerprint_of(fingerprint_parts(model))


def fingerprint_of(parts: FingerprintParts) -> Fingerprint:
    fine, coarse = hashlib.sha256(), hashlib.sha256()
    for name, shape, sample in parts:
        floating = mx.issubdtype(sample.dtype, mx.floating)
        head = f"{name}:{shape}:{'f' if floating else sample.dtype}".encode()
        for h, dtype in ((fine, mx.float16), (coarse, mx.bfloat16)):
            h.update(head)
            values = sample.astype(dtype) if floating else sample
            h.update(np.array(values.view(mx.uint16) if values.dtype == mx.bfloat16 else values).tobytes())
    return Fingerprint(fine.hexdigest()[:32], coarse.hexdigest()[:32])


def model_layers(model: nn.Module) -> list[nn.Module]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ChessError("model has no .model.layers; only Llama-style mlx-lm models are supported")
    return layers
