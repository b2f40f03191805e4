"""The matrix-vector products a sparse block needs, on any projection module.

These are the dispatch points for the sparse GEMV kernels (``chess_mlx/sparse_gemv.py``). A
projection is anything with ``weight`` (and optionally ``bias``), or an mlx-lm ``QuantizedLinear``
(``weight``/``scales``/``biases`` + ``group_size``/``bits``). Decode steps of at most
``KERNEL_MAX_TOKENS`` tokens go through the kernels on a GPU; everything else (prefill, the CPU)
takes the reference path, which gives the same numbers.
"""

from __future__ import annotations

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn

from . import decode_paths
from . import sparse_gemv as G

# One token only. With independent 50% masks the union of several tokens' active rows approaches
# dense: on the H100 the kernels alone still beat dense at 2 tokens (fp16) and up to 4-8 (4-bit)
# (benchmarks/RESULTS.md sessions 10 and 17), but decode is one token per step, and a prompt's
# chunks are long enough that their union is dense.
KERNEL_MAX_TOKENS = 1
# On by default (``CHESS_MLX_QUANT_KERNELS=0`` switches them off: quantized sparse products then take
# the reference path, dense quantized matmul + masks). The quantized kernels beat MLX's quantized
# matmul in GPU time per token (4-bit CHESS 1.49x dense, RESULTS.md session 11) and, with their
# half2 arithmetic, no longer lose wall-clock time on the lent host (0.99x, host-bound; 1.45x with
# the graph built ahead, session 12).
QUANTIZED_KERNELS = os.environ.get("CHESS_MLX_QUANT_KERNELS", "1") != "0"


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


def row_weight(proj: nn.Module):
    """The (out, in) weight as the kernels take it."""
    if "scales" in proj:
        return G.QWeight(proj["weight"], proj["scales"], proj["biases"], proj.bits, proj.group_size)
    return proj["weight"]


def transposed_weight(proj: nn.Module):
    """W^T (in, out) for sparse-input kernels, built once per projection and weight array.

    Float weights: a contiguous copy of W^T. Quantized weights: W^T re-quantized along the output
    dimension with the same bits and group size (the layout ``chess-mlx convert`` writes), so its
    numbers differ from the source quantization by one rounding; its scales and biases are packed
    into one array (``QWeight.sb``), as the kernels take them.
    """
    wt = getattr(proj, "_kernel_wt", None)
    if wt is None or getattr(proj, "_kernel_wt_of", None) is not proj["weight"]:  # first use, or new weights
        wt = _evaluated(_transpose(proj).packed() if "scales" in proj else _transpose(proj))
        proj._kernel_wt, proj._kernel_wt_of = wt, proj["weight"]
    return wt


def _transpose(proj: nn.Module):
    """W^T of one projection, lazy (see ``transposed_weight``); a QWeight without ``sb``."""
    if "scales" in proj:
        w = mx.dequantize(proj["weight"], proj["scales"], proj["biases"], group_size=proj.group_size, bits=proj.bits)
        return G.QWeight.quantize(mx.contiguous(w.T), proj.bits, proj.group_size)
    return mx.contiguous(proj["weight"].T)


def _evaluated(wt):
    """``wt`` with every array it holds evaluated (the kernels' bound inputs must not stay lazy)."""
    mx.eval(*((wt.w, wt.sb, wt.scales, wt.biases) if isinstance(wt, G.QWeight) else (wt,)))
    return wt


def stacked_transposed_weight(projs: list[nn.Module]):
    """``[W_1^T | W_2^T | ...]`` (in, sum of outs) of projections on one input, for one sparse-input
    launch over all of them (``sparse_gemv.sparse_input``'s ``nt``), built once per set of weight
    arrays and kept on the first projection. Each W^T is made as ``transposed_weight`` makes it
    (quantized ones: re-quantized along the outputs, so their groups stay inside one projection and
    side by side they equal one quantization of the stacked matrix), but not kept: the stacked copy
    is the only one. Costs memory beyond the row-major weights: the whole stacked copy."""
    first, arrays = projs[0], tuple(p["weight"] for p in projs)
    wt = getattr(first, "_kernel_wt_stack", None)
    of = getattr(first, "_kernel_wt_stack_of", ())
    if wt is None or len(of) != len(arrays) or any(a is not b for a, b in zip(of, arrays)):
        first._kernel_wt_stack = None  # drop the old copy before building the new one
        parts = [_transpose(p) for p in projs]
        if isinstance(parts[0], G.QWeight):
            wt = G.QWeight(*(mx.concatenate([getattr(q, k) for q in parts], axis=1) for k in ("w", "scales", "biases")),
                           parts[0].bits, parts[0].group_size).packed()
        else:
            wt = mx.concatenate(parts, axis=1)
        wt = _evaluated(wt)
        first._kernel_wt_stack, first._kernel_wt_stack_of = wt, arrays
    return wt


# Where a projection keeps the workspaces of its call sites: its own launches, and those over it
# stacked with others (the split launch). ``sparse_layers.settle`` evaluates their tokens.
WORKSPACES = ("_kernel_ws", "_split_ws")


def kernel_workspace(proj: nn.Module, like: mx.array, n_out: Optional[int] = None) -> G.Workspace:
    """The sparse-input kernel's counters and scratch for this projection (one call site), made
    once; a plain attribute, not a parameter of the module. ``like``, the site's input, shapes the
    placeholder ordering token as the launches' y and sizes the scratch (``sparse_gemv.workspace``).
    ``n_out``: the outputs of launches over this projection stacked with others (``n_out`` in
    all), a call site of its own beside the plain one."""
    name, n = (WORKSPACES[0], proj["weight"].shape[0]) if n_out is None else (WORKSPACES[1], n_out)
    ws = getattr(proj, name, None)
    if ws is None or ws.sem.size < -(-n // G.SPIN_MIN_TILE) + 2:
        ws = G.workspace(n, like)
        setattr(proj, name, ws)
    return ws


def _use_kernels(x: mx.array, proj: nn.Module) -> bool:
    if G.backend() == "reference" or getattr(proj, "mode", "affine") != "affine":
        return False
    if "scales" in proj and not QUANTIZED_KERNELS:
        return False
    return x.size // x.shape[-1] <= KERNEL_MAX_TOKENS


def compiled_path_ok(x: mx.array, *projs: nn.Module) -> bool:
    """Whether a one-token step may take the compiled kernel paths (``decode_paths``): weights
    without bias in the activation dtype (quantized ones: affine, with the quantized kernels
    switched on), kernels on this device. Shapes a kernel cannot take fall back to the reference
    product inside the same path."""
    if not decode_paths.enabled() or G.backend() == "reference" or x.size != x.shape[-1]:
        return False
    if x.dtype not in (mx.float16, mx.bfloat16):
        return False
    for p in projs:
        if "bias" in p:
            return False
        if "scales" in p:
            if not QUANTIZED_KERNELS or getattr(p, "mode", "affine") != "affine" or p["scales"].dtype != x.dtype:
                return False
        elif p["weight"].dtype != x.dtype or any(n % 8 for n in p["weight"].shape):
            return False
    return True


def gated_sparse_output_linear(x: mx.array, proj: nn.Module, a: mx.array) -> mx.array:
    """``a * (x W^T + b)``; a kernel computes only the rows where ``a`` is non-zero (up_proj)."""
    if not _use_kernels(x, proj):
        return a * dense_linear(x, proj)
    y = G.gated_sparse_output(x, row_weight(proj), a)
    return y + a * proj["bias"] if "bias" in proj else y


def sparse_input_linear(x: mx.array, proj: nn.Module) -> mx.array:
    """W x for an x with many exact zeros (down_proj, thresholded q/o inputs, TEAL).

    A kernel reads only the rows of W^T that meet a non-zero input; the reference is the dense
    product, which gives the same numbers because the skipped terms are exact zeros.
    """
    if not _use_kernels(x, proj):
        return dense_linear(x, proj)
    y, _ = G.sparse_input(x, transposed_weight(proj), ws=kernel_workspace(proj, x))
    return y + proj["bias"] if "bias" in proj else y


def weight_nbytes(proj: nn.Module) -> int:
    """Bytes a dense product reads from this projection's parameters."""
    return sum(proj[k].nbytes for k in ("weight", "scales", "biases", "bias") if k in proj)
