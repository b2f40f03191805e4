"""``chess-mlx convert``: model folder -> (quantize) -> calibrate -> a folder ``chat``/``generate`` load.

Everything is written into a temporary folder beside OUT and renamed at the very end, so a failed
or interrupted conversion leaves no OUT (and no temporary folder) behind.

Thresholds are calibrated on the weights that will run: after quantization. On the CPU the
calibration pass runs on a float32 dequantized copy of those quantized weights (the same numbers;
MLX's CPU quantized matmul is slow); the thresholds carry the fingerprint of the quantized model.

Weight layout (``layout_version`` 1): MLX's standard layout, loadable by plain mlx-lm. The
sparse-input kernels take W^T, which ``chess_mlx.linear_ops`` builds once per projection at first
use on a GPU (for quantized weights: W^T re-quantized along the output dimension).
"""

from __future__ import annotations

import json
import re
import threading
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx
import numpy as np

from . import __version__
from . import methods as M
from .errors import ChessError
from .device_limits import check_window
from .model_io import (cast_floats, evaluate_by_layer, fingerprint, fingerprint_of, fingerprint_parts, load_model,
                       read_config)

MANIFEST = "chess.json"
# Set by the CLI's SIGINT handler: a library may swallow the KeyboardInterrupt, so convert also
# checks this between stages and before the final rename.
INTERRUPTED = threading.Event()
LAYOUT_VERSION = 1
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                   "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "LICENSE", "SOURCE.md")


@dataclass
class ConvertOptions:
    quantize: Optional[int] = None
    group_size: int = 64
    method: str = M.CHESS
    sparsities: list[float] = field(default_factory=lambda: [0.5])
    calib: Optional[Path] = None
    calib_tokens: int = 4096
    seq_len: int = 512
    dtype: str = "float16"
    force: bool = False


def _check_options(o: ConvertOptions) -> None:
    M.check_method(o.method)
    for s in o.sparsities:
        M.check_sparsity(s)
    if o.quantize not in (None, 4, 8):
        raise ChessError(f"--quantize takes 4 or 8, not {o.quantize}")
    if o.group_size not in (32, 64):
        raise ChessError(f"--group-size takes 32 or 64, not {o.group_size}")
    if o.dtype not in ("float16", "bfloat16"):
        raise ChessError(f"--dtype takes float16 or bfloat16, not {o.dtype}")


def resolve_source(src: str) -> Path:
    """A local model folder, or a Hugging Face repo id downloaded when the network allows it."""
    path = Path(src)
    if path.exists() or not re.fullmatch(r"[\w.-]+/[\w.-]+", src):
        read_config(path)
        return path
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(src, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as e:  # offline, unknown repo, auth: all end the same way for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChessError(f"{src} is not a local folder and could not be downloaded from the hub ({msg})") from None
    read_config(Path(local))
    return Path(local)


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors") if not p.name.startswith("chess_"))


def _stage(progress: Optional[Callable[[str], None]], text: str) -> None:
    if INTERRUPTED.is_set():
        raise KeyboardInterrupt
    if progress is not None:
        progress(text)


def convert(src: str, out: Path, o: ConvertOptions, progress: Optional[Callable[[str], None]] = None,
            layer_progress: Optional[Callable[[int, int], None]] = None) -> dict:
    """Convert ``src`` into ``out``; returns the manifest. Raises ChessError on bad input."""
    from mlx_lm.utils import dequantize_model, quantize_model, save_config, save_model

    from .calibrate import calibrate
    from .paths import calibration_text_path
    from .text import read_text, token_sequences

    t0 = time.perf_counter()
    _check_options(o)
    out = Path(out)
    if out.exists() and not o.force:
        raise ChessError(f"{out} already exists; pass --force to replace it")
    if not out.parent.is_dir():
        raise ChessError(f"the folder {out.parent} for {out.name} does not exist")
    src_path = resolve_source(src)
    if src_path.resolve() == out.resolve():
        raise ChessError("OUT must differ from SRC")
    if out.resolve() in src_path.resolve().parents:  # --force would delete the source with OUT
        raise ChessError(f"SRC {src_path} lies inside OUT {out}; replacing OUT would delete the source")
    calib_path = Path(o.calib) if o.calib else calibration_text_path()
    text = read_text(calib_path, "calibration text")

    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp makes 0700; the result is an ordinary folder
    try:
        _stage(progress, f"loading {src_path}")
        model, tokenizer, config = load_model(src_path, o.dtype, lazy=True)
        check_window(model, "--seq-len", min(o.seq_len, o.calib_tokens))
        tokens = token_sequences(tokenizer, text, o.calib_tokens, o.seq_len, source=f"calibration text {calib_path}")
        source_parts = fingerprint_parts(model)  # lazy samples of the source, read with each block below
        if o.quantize:
            if "quantization" in config:
                raise ChessError(f"{src_path} is already quantized; convert it without --quantize")
            _stage(progress, f"quantizing to {o.quantize}-bit, group size {o.group_size}")
            model, config = quantize_model(model, config, o.group_size, o.quantize)
        evaluate_by_layer(model, {name: sample for name, _, sample in source_parts})
        source_fp = fingerprint_of(source_parts)
        model_fp = fingerprint(model)

        _stage(progress, "writing weights, config and tokenizer")
        save_model(tmp, model)
        save_config(dict(config), tmp / "config.json")
        for name in TOKENIZER_FILES:
            if (src_path / name).exists():
                shutil.copy2(src_path / name, tmp / name)

        _stage(progress, f"calibrating {', '.join(f'{s:g}' for s in o.sparsities)} on {tokens.size} tokens")
        if mx.default_device() == mx.cpu:
            calib_model, _, _ = load_model(tmp, "float32")
            if "quantization" in config:
                calib_model = dequantize_model(calib_model)
                cast_floats(calib_model, mx.float32)
        else:
            calib_model = model
        th = calibrate(calib_model, tokens, o.sparsities, progress=layer_progress,
                       meta={"method": o.method, "calibration_text": calib_path.name, "model": out.name})
        th.fingerprint = model_fp
        th.save(tmp)
        heldout = _heldout_sparsity(calib_model, tokenizer, text, tokens.size, th, o.method)

        manifest = {
            "format": "chess-mlx-model",
            "layout_version": LAYOUT_VERSION,
            "layout": "mlx-standard; sparse-input W^T built at first GPU use",
            "method": o.method,
            "sparsities": th.sparsities,
            "bits": o.quantize or (config.get("quantization") or {}).get("bits"),
            "group_size": o.group_size if o.quantize else (config.get("quantization") or {}).get("group_size"),
            "dtype": o.dtype,
            "calibration_tokens": int(tokens.size),
            "calibration_text": calib_path.name,
            "source": str(src),
            "source_fingerprint": source_fp,
            "model_fingerprint": model_fp,
            "source_bytes": _folder_bytes(src_path),
            "bytes": _folder_bytes(tmp),
            "heldout_ffn_sparsity_per_layer": heldout,
            "chess_mlx_version": __version__,
            "seconds": round(time.perf_counter() - t0, 1),
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")

        _stage(progress, f"moving into {out}")
        if out.exists():  # --force: swap, then drop the old folder
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / out.name)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
        return manifest
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _heldout_sparsity(model, tokenizer, text: str, skip: int, th, method: str, n: int = 512) -> dict:
    """FFN sparsity per layer for ``method`` at every level, on up to ``n`` tokens of the
    calibration text that calibration did not use (empty when the text has none left)."""
    from .sparse_layers import set_method, sparsify
    from .text import encode

    ids = encode(tokenizer, text)[skip : skip + n]
    if len(ids) < 16:
        return {}
    state = sparsify(model)
    out = {}
    for s in th.sparsities:
        set_method(model, method if method != M.DENSE else M.CHESS, th, s)
        state.recorder.clear()
        state.recorder.enabled = True
        try:
            model(mx.array(ids)[None])
            calls = state.recorder.pop()
        finally:
            state.recorder.enabled = False
        dens = calls[-1].density[:, M.PROJS.index("down")]
        out[f"{s:g}"] = [round(float(1 - d), 4) for d in dens]
    set_method(model, M.DENSE)
    return out


def sparsity_summary(per_layer: dict) -> list[str]:
    """'layers a-b: min-max' lines of the held-out FFN sparsity, per level."""
    lines = []
    for level, vals in per_layer.items():
        n = len(vals)
        step = max(1, -(-n // 6))
        parts = [f"{lo}-{min(n, lo + step) - 1}: {min(vals[lo:lo + step]):.0%}-{max(vals[lo:lo + step]):.0%}"
                 for lo in range(0, n, step)]
        lines.append(f"held-out FFN sparsity @ {level} (per layer, min-max by layer range): " + ", ".join(parts))
    return lines


def threshold_summary(folder: Path) -> list[str]:
    """Per-level, per-layer-range statistics of the thresholds in ``folder`` (for info/convert)."""
    from . import thresholds as T

    th = T.load(folder)
    lines = []
    n_layers = th.up_mean.shape[0]
    step = max(1, -(-n_layers // 6))
    for s in th.sparsities:
        lv = th.level(s)
        lines.append(f"sparsity {s:g}:  layers | CATS t | CHESS t (median) | attn in t | attn out t")
        for lo in range(0, n_layers, step):
            hi = min(n_layers, lo + step)
            sl = slice(lo, hi)
            lines.append(f"  {lo:>3}-{hi - 1:<3} | {np.mean(lv['cats'][sl]):.4g} | "
                         f"{np.median(lv['chess'][sl]):.4g} | {np.mean(lv['attn_in'][sl]):.4g} | "
                         f"{np.mean(lv['attn_out'][sl]):.4g}")
    return lines


def info(folder: Path) -> list[str]:
    from . import thresholds as T

    folder = Path(folder)
    if not folder.is_dir():
        raise ChessError(f"{folder} is not a folder")
    lines = []
    manifest = folder / MANIFEST
    if manifest.exists():
        try:
            data = json.loads(manifest.read_text())
        except json.JSONDecodeError as e:
            raise ChessError(f"{manifest} is not valid JSON: {e}") from None
        lines += [f"{k}: {v}" for k, v in data.items()]
    if T.exists(folder):
        meta = json.loads((folder / f"{T.STEM}.json").read_text())
        lines.append(f"thresholds: levels {', '.join(f'{s:g}' for s in meta['sparsities'])}, "
                     f"{meta.get('calibration_tokens')} calibration tokens, fingerprint {meta['fingerprint']}")
        lines += threshold_summary(folder)
    if not lines:
        raise ChessError(f"{folder} holds neither a {MANIFEST} nor calibrated thresholds")
    return lines
