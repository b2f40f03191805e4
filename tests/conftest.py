from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    # MLX's Linux CPU wheel uses the reference BLAS; re-run pytest with OpenBLAS preloaded if we can.
    from chess_mlx.blas import reexec_with_openblas

    if not os.environ.get("PYTEST_XDIST_WORKER"):
        reexec_with_openblas(["-m", "pytest", *sys.argv[1:]])


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    from chess_mlx.paths import default_model_dir

    path = default_model_dir()
    if not (path / "model.safetensors").exists():
        msg = f"shipped model missing at {path}: run 'chess-mlx setup' (README) first"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    from tiny import save_tiny

    return save_tiny(tmp_path_factory.mktemp("tiny") / "llama")
