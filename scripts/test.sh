#!/usr/bin/env bash
# The project's test command (README, .ci/run): fresh venv, install, shipped model, full suite.
set -euo pipefail
cd "$(dirname "$0")/.."
# System packages: OpenBLAS (MLX's Linux CPU wheel uses the reference BLAS; chess-mlx preloads
# OpenBLAS when it is there, see chess_mlx/blas.py) and tmux (the real-terminal chat test).
need=""
ldconfig -p | grep -q libopenblas.so.0 || need="$need libopenblas0-pthread"
command -v tmux >/dev/null || need="$need tmux"
if [ -n "$need" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  (apt-get update -qq && apt-get install -y -qq $need) >/dev/null 2>&1 \
    || echo "note: could not install$need" >&2
fi
python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test]"
chess-mlx setup
python -m pytest -q
