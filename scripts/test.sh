#!/usr/bin/env bash
# The project's test command (README, .ci/run): fresh venv, install, shipped model, full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# Optional speed-up: MLX's Linux CPU wheel uses the reference BLAS; chess-mlx preloads OpenBLAS
# when it is installed (see chess_mlx/blas.py). Without it the suite still runs, only slower.
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null && ! ldconfig -p | grep -q libopenblas.so.0; then
  (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread) >/dev/null 2>&1 \
    || echo "note: OpenBLAS not installed; CPU tests will be slow" >&2
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
chess-mlx setup
python -m pytest -q
