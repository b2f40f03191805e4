"""``python -m chess_mlx``: the same entry as the ``chess-mlx`` console script (re-exec under
OpenBLAS on a Linux CPU, whose MLX wheel links the slow reference BLAS; ``blas``)."""

from .cli import entry

entry()
