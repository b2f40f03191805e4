"""chess-mlx: CHESS activation sparsification (He et al., EMNLP 2024) for MLX language models."""

from .calibrate import calibrate
from .errors import ChessError
from .methods import METHODS
from .model_io import fingerprint, load_model
from .sparse_layers import set_method, sparsify
from .thresholds import Thresholds

__version__ = "0.1.0"
__all__ = ["ChessError", "METHODS", "Thresholds", "calibrate", "fingerprint", "load_model",
           "set_method", "sparsify", "__version__"]
