"""The three matrix-vector products a sparse block needs, on any projection module.

These are the dispatch points for the sparse GEMV kernels. The functions here are the pure-MLX
reference path: they give the numbers the kernels must reproduce, on every device. A projection
module is anything with ``weight`` (and optionally ``bias``), or an mlx-lm ``QuantizedLinear``
(``weight``/``scales``/``biases`` + ``group_size``/``bits``).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn


def dense_linear(x: mx.array, proj: nn.Module) -> mx.array:
    """y = x W^T + b for float or MLX-quantized weights."""
    if "scales" in proj:
        y = mx.quantized_matmul(
            x,
            proj["weight"],
            proj["scales"],
            proj.get("biases"),
            transpose=True,
            group_size=proj.group_size,
            bits=proj.bits,
            mode=getattr(proj, "mode", "affine"),
        )
    else:
        y = x @ proj["weight"].T
    if "bias" in proj:
        y = y + proj["bias"]
    return y


def sparse_output_linear(x: mx.array, proj: nn.Module, keep: mx.array) -> mx.array:
    """Rows of W x where ``keep`` is True, zero elsewhere (up_proj under CATS/CHESS).

    A kernel reads only the kept rows of W; the reference computes all and masks.
    """
    return mx.where(keep, dense_linear(x, proj), mx.zeros((), dtype=x.dtype))


def sparse_input_linear(x: mx.array, proj: nn.Module) -> mx.array:
    """W x for an x with many exact zeros (down_proj, thresholded q/o inputs).

    A kernel reads only the columns of W that meet a non-zero input; the reference is the dense
    product, which gives the same numbers because the skipped terms are exact zeros.
    """
    return dense_linear(x, proj)


def weight_nbytes(proj: nn.Module) -> int:
    """Bytes a dense product reads from this projection's parameters."""
    return sum(proj[k].nbytes for k in ("weight", "scales", "biases", "bias") if k in proj)
