"""Where the shipped assets live.

The project keeps models and text under ``assets/`` at the repository root (an editable install
points there). ``CHESS_MLX_ASSETS`` overrides it, e.g. for a wheel install.
"""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def assets_dir() -> Path:
    env = os.environ.get("CHESS_MLX_ASSETS")
    if env:
        return Path(env)
    repo_assets = Path(__file__).resolve().parents[1] / "assets"
    if repo_assets.is_dir():
        return repo_assets
    return Path.home() / ".cache" / "chess-mlx" / "assets"


def default_model_dir() -> Path:
    return assets_dir() / "models" / DEFAULT_MODEL_NAME


def calibration_text_path() -> Path:
    return assets_dir() / "text" / "calibration.txt"


def heldout_text_path() -> Path:
    return assets_dir() / "text" / "heldout.txt"
