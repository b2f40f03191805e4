"""Sparse GEMV kernels for batch-1 (and small-batch) decode, with a pure-MLX reference.

Products, on float16/bfloat16 or MLX 4/8-bit affine-quantized weights:

* ``gated_sparse_output(x, w, a)``: ``a * (x @ W^T)`` computing only the rows where some ``a`` is
  non-zero (up_proj under CATS/CHESS). W keeps MLX's (out, in) layout.
* ``sparse_input(x, wt, t, ws)``: ``threshold(x, t) @ W^T`` reading only the rows of ``wt = W^T``
  (in, out) that meet a surviving input (down_proj; q/o under CHESS+attention; TEAL), and the
  density of that input. Quantized ``wt`` is quantized along the *output* dimension
  (``mx.quantize(W.T)``), so a skipped input channel costs no bytes.
* ``gate_up(x, w_gate, w_up, t)``: the whole CATS/CHESS FFN front, ``keep(SiLU(x W_gate^T), t) *
  (x W_up^T)`` with the up rows of dropped channels never read; one launch. The kernel takes the
  gate and up rows stacked as one matrix (``stack_gate_up``; ``gate_up_stacked`` for rows stored
  that way once).
* ``sparse_input(..., residual=r)`` adds ``r`` to the product inside the kernel (the block's
  residual add, one graph node fewer per layer).
* ``sparse_input(..., nt=n)``: the same kernel over several projections' W^T side by side, the
  input thresholded for the first ``n`` outputs only (q thresholded, k and v dense: one launch
  where the attention head took two).

Quantized weights reach the kernels with their scales and biases in one array (``QWeight.sb``):
every kernel input costs MLX host time at every launch (RESULTS.md session 8).

Decode speed on a GPU is bound by the number of graph nodes per token as much as by bytes
(benchmarks/RESULTS.md), so thresholds, split-K reduction and the density count live inside
the kernels rather than in separate MLX ops.

Dispatch: Metal kernels (``metal/``) on an Apple GPU, CUDA kernels (``cuda/``) on MLX's CUDA
backend, the reference everywhere else. ``CHESS_MLX_REFERENCE=1`` or ``force_reference(True)``
selects the reference path on every device. The CUDA and Metal kernels share algorithm, tiling and
indexing; the CUDA ones are checked and timed on a GPU by ``benchmarks/kernels.py``.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple, Optional

import mlx.core as mx
import numpy as np

from . import kernel_text
from .stats import kept_fraction

MAX_TOKENS = 8  # decode batch the kernels handle; larger batches use dense matmul
_FORCE_REFERENCE = os.environ.get("CHESS_MLX_REFERENCE", "") not in ("", "0")
_POISON: Optional[float] = None  # benchmarks/kernels.py fills outputs with NaN to catch unwritten elements
_ROOT = Path(__file__).resolve().parents[1]


def force_reference(on: bool = True) -> None:
    """Use the pure-MLX reference path everywhere (debugging, A/B checks)."""
    global _FORCE_REFERENCE
    _FORCE_REFERENCE = on


@lru_cache(maxsize=None)
def _gpu_kind() -> str:
    """Which kernels this process's GPU takes, asked once: every sparse module asks ``backend``
    at every decode token, and decode speed is bound by host time."""
    if mx.metal.is_available():
        return "metal"
    if mx.cuda.is_available():
        return "cuda"
    return "reference"


def backend() -> str:
    if _FORCE_REFERENCE or mx.default_device() != mx.gpu:
        return "reference"
    return _gpu_kind()


@dataclass(frozen=True)
class QWeight:
    """An MLX affine-quantized matrix: packed ``w`` (rows, cols*bits/32), ``scales``/``biases``
    (rows, cols/group_size). ``sb``: the kernels' layout of the two, ``[scales; biases]`` as one
    (2*rows, cols/group_size) array (``packed``), of which ``scales`` and ``biases`` are then views."""

    w: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int
    sb: Optional[mx.array] = None

    @property
    def rows(self) -> int:
        return self.w.shape[0]

    @property
    def cols(self) -> int:
        return self.w.shape[1] * 32 // self.bits

    @property
    def nbytes(self) -> int:
        return self.w.nbytes + self.scales.nbytes + self.biases.nbytes

    @classmethod
    def quantize(cls, m: mx.array, bits: int, group_size: int) -> "QWeight":
        w, s, b = mx.quantize(m, group_size=group_size, bits=bits)
        return cls(w, s, b, bits, group_size)

    def dequantize(self) -> mx.array:
        return mx.dequantize(self.w, self.scales, self.biases, group_size=self.group_size, bits=self.bits)

    @classmethod
    def from_packed(cls, w: mx.array, sb: mx.array, bits: int, group_size: int) -> "QWeight":
        rows = w.shape[0]
        return cls(w, sb[:rows], sb[rows:], bits, group_size, sb)

    def kernel_sb(self) -> mx.array:
        """``sb``, or a lazy concatenation of scales and biases where this matrix has none."""
        return self.sb if self.sb is not None else mx.concatenate([self.scales, self.biases], axis=0)

    def packed(self) -> "QWeight":
        """This matrix with ``sb`` (lazy: the caller evaluates it if it keeps it)."""
        return self if self.sb is not None else QWeight.from_packed(self.w, self.kernel_sb(), self.bits,
                                                                      self.group_size)


def stack_gate_up(wg, wu):
    """The gate and up rows as one matrix, as ``gate_up``'s kernels read them: ``[Wg; Wu]`` (2N, K)
    for float weights, a packed QWeight of 2N rows for quantized ones (so its ``sb`` is ``[gate
    scales; up scales; gate biases; up biases]``). Lazy; the sparse layers store it once
    (``row_store``) and give the projections views of it."""
    if isinstance(wg, QWeight):
        w = mx.concatenate([wg.w, wu.w], axis=0)
        return QWeight.from_packed(w, mx.concatenate([wg.scales, wu.scales, wg.biases, wu.biases], axis=0),
                                   wg.bits, wg.group_size)
    return mx.concatenate([wg, wu], axis=0)


def split_gate_up(w2):
    """(gate, up) of ``stack_gate_up``'s matrix, as views (the reference path's products)."""
    if isinstance(w2, QWeight):
        n = w2.rows // 2
        return (QWeight(w2.w[:n], w2.scales[:n], w2.biases[:n], w2.bits, w2.group_size),
                QWeight(w2.w[n:], w2.scales[n:], w2.biases[n:], w2.bits, w2.group_size))
    n = w2.shape[0] // 2
    return w2[:n], w2[n:]


# ---------------------------------------------------------------- reference (any device) --------
def matvec_t(x: mx.array, w) -> mx.array:
    """``x @ W^T`` for a float W (out, in) or its QWeight: MLX's own dense products."""
    if isinstance(w, QWeight):
        return mx.quantized_matmul(x, w.w, w.scales, w.biases, transpose=True,
                                   group_size=w.group_size, bits=w.bits)
    return x @ w.T


def reference_gated_sparse_output(x: mx.array, w, a: mx.array) -> mx.array:
    return a * matvec_t(x, w)


def threshold(x: mx.array, t: Optional[mx.array]) -> mx.array:
    """x with |x| < t set to 0 (t: scalar, a ``scalar_threshold``, or one per channel; None keeps x)."""
    if t is None:
        return x
    if t.size not in (1, x.shape[-1]):  # a scalar padded to SCALAR_SLOTS equal values
        t = t.reshape(-1)[:1]
    return x * (mx.abs(x) >= t).astype(x.dtype)


def _times_wt(x: mx.array, wt) -> mx.array:
    """``x @ wt`` for a transposed weight (K, N), float or quantized along N."""
    if isinstance(wt, QWeight):
        return mx.quantized_matmul(x, wt.w, wt.scales, wt.biases, transpose=False, group_size=wt.group_size,
                                   bits=wt.bits)
    return x @ wt


Norm = tuple  # (weight, eps) of an RMSNorm fused into a sparse-input launch (``sparse_input``)

ROPE_POSITION_SLOTS = 4  # a rope position array's entries: arrays of <= 8 bytes are slow for kernels to read


class Rope(NamedTuple):
    """MLX's rope (``mx.fast.rope``, as ``nn.RoPE`` or mlx-lm's ``Llama3RoPE`` call it) of a
    product's first ``n`` outputs, heads of ``dims`` (``n`` a multiple of ``dims``), fused into a
    sparse-input launch (``sparse_input``): q's and k's heads leave the split launch rotated. The
    angle of head dimension pair i is ``(scale * pos[0]) * inv_freq[i]``, in float32 as MLX
    computes it. A layer fixes everything but the position (``pos`` None: a spec, as
    ``fused_attention.rope_spec`` gives it); ``at`` adds a token's position."""

    inv_freq: mx.array  # float32 (dims // 2,)
    dims: int
    n: int
    traditional: bool = False
    scale: float = 1.0
    pos: Optional[mx.array] = None  # int32, ROPE_POSITION_SLOTS equal entries (``rope_position``)

    def at(self, pos: mx.array) -> "Rope":
        return self._replace(pos=pos)


def rope_inverse_frequencies(dims: int, base: float) -> mx.array:
    """MLX's rope frequencies for ``base`` as its kernels compute them: exp2(-(i / half) * log2(base))
    in float32, i < dims / 2 (``nn.RoPE``; ``Llama3RoPE`` gives its own, 1 / freqs)."""
    f32 = np.float32
    half = dims // 2
    return mx.array(np.exp2(-(np.arange(half, dtype=f32) / f32(half)) * f32(np.log2(f32(base)))).astype(f32))


def rope_position(offset: int) -> mx.array:
    """A token position as a fused rope reads it (``Rope.pos``)."""
    return mx.array([offset] * ROPE_POSITION_SLOTS, dtype=mx.int32)


def reference_rope(y: mx.array, rope: Rope) -> mx.array:
    """``Rope`` applied to y (..., N) with MLX ops: what the kernels' epilogue computes, and what
    ``mx.fast.rope`` gives on the heads of y's first ``rope.n`` outputs."""
    if rope.pos is None:
        raise ValueError("a rope spec has no position: give the token's with Rope.at")
    d, h, n = rope.dims, rope.dims // 2, rope.n
    theta = (mx.array(rope.scale, dtype=mx.float32) * rope.pos[0].astype(mx.float32)) * rope.inv_freq
    c, s = mx.cos(theta), mx.sin(theta)
    lead = y.shape[:-1]
    r = y[..., :n].astype(mx.float32).reshape(*lead, n // d, d)
    if rope.traditional:
        x1, x2 = r[..., 0::2], r[..., 1::2]
        out = mx.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    else:
        x1, x2 = r[..., :h], r[..., h:]
        out = mx.concatenate([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    out = out.reshape(*lead, n).astype(y.dtype)
    return out if n == y.shape[-1] else mx.concatenate([out, y[..., n:]], axis=-1)


def reference_sparse_input(x: mx.array, wt, t: Optional[mx.array] = None, residual: Optional[mx.array] = None,
                           nt: Optional[int] = None, xnorm: Optional[Norm] = None,
                           ynorm: Optional[Norm] = None, rope: Optional[Rope] = None) -> tuple:
    """``threshold(x, t) @ wt [+ residual]`` and the density of the thresholded input; with ``nt``,
    the outputs past ``nt`` take x as it is. Those come from a second product on the whole of
    ``wt`` (MLX's CUDA quantized product takes no column slice of the transposed layout: "no
    implementation for problem shape"); a fallback and a check, not a decode path. ``xnorm``: x
    goes through that RMSNorm first; ``ynorm``: a third result, that RMSNorm of y; ``rope``: y's
    first outputs rotated (before any residual)."""
    if xnorm is not None:
        x = mx.fast.rms_norm(x, *xnorm)
    xs = threshold(x, t)
    y = _times_wt(xs, wt)
    if nt is not None and nt < y.shape[-1]:
        y = mx.concatenate([y[..., :nt], _times_wt(x, wt)[..., nt:]], axis=-1)
    if rope is not None:
        y = reference_rope(y, rope)
    if residual is not None:
        y = residual + y
    dens = kept_fraction(xs != 0)  # the share of weight rows a kernel reads
    return (y, dens) if ynorm is None else (y, dens, mx.fast.rms_norm(y, *ynorm))


def silu(x: mx.array) -> mx.array:
    # x * sigmoid(x) written out: nn.silu is itself compiled, which stops fusion at its edge
    return x * mx.sigmoid(x)


def reference_gate_up(x: mx.array, wg, wu, t: mx.array) -> mx.array:
    return threshold(silu(matvec_t(x, wg)), t) * matvec_t(x, wu)


# ---------------------------------------------------------------- kernel sources ----------------
def source_dir(kind: str) -> Path:
    """The folder of a backend's kernel sources: the data package an installed wheel carries
    (``chess_mlx/cuda``, ``chess_mlx/metal``), else the repository's top-level folder."""
    sub = "cuda" if kind == "cuda" else "metal"
    installed = Path(__file__).resolve().parent / sub
    return installed if installed.is_dir() else _ROOT / sub


_INCLUDE = re.compile(r'^#include "(\w+\.(?:cuh|metal))"[ \t]*\n', re.M)


def read_source(kind: str, name: str) -> tuple[str, str]:
    """(header, body) of one kernel; ``kind`` is 'cuda' or 'metal'. A body's ``#include "file"``
    lines are replaced by that file of the same folder (the sparse-input kernels share their
    prologue so): MLX compiles one body text, not files."""
    d = source_dir(kind)
    header = (d / ("common.cuh" if kind == "cuda" else "common.metal")).read_text()
    body = (d / f"{name}.{'cu' if kind == 'cuda' else 'metal'}").read_text()
    return header, _INCLUDE.sub(lambda m: (d / m.group(1)).read_text(), body)


_INPUTS = {
    "spout_f": ["x", "w", "a"],
    "spout_q": ["x", "w", "sb", "a"],
    "spin_f": ["x", "t", "wt", "sem", "partial", "after"],
    "spin_q": ["x", "t", "wt", "sb", "sem", "partial", "after"],
    "gateup_f": ["x", "w", "t"],
    "gateup_q": ["x", "w", "sb", "t"],
    "kv_write": ["q", "k", "v", "kb", "vb", "meta"],  # kv_cache.InPlaceKVCache's one-token write
    "kv_grow": ["q", "k", "v", "kb", "vb", "meta"],  # ... and its growth by 256 positions
}
_OUTPUTS = {"spout_f": ["y"], "spout_q": ["y"], "spin_f": ["y", "dens"], "spin_q": ["y", "dens"],
            "gateup_f": ["y"], "gateup_q": ["y"], "kv_write": ["q_out"], "kv_grow": ["q_out", "kb2", "vb2"]}
# What each define of a variant adds to its base kernel: (inputs, outputs), in this order.
_DEFINE_EXTRAS = {
    "CHESS_RESIDUAL": (["r"], []),  # the residual add fused into the epilogue
    "CHESS_XNORM": (["gx"], []),  # x's RMSNorm applied in the kernel (q's head launch takes the block's input)
    "CHESS_YNORM": (["gy"], ["yn"]),  # y's RMSNorm as a third output (o's launch gives the post-attention norm)
    "CHESS_ROPE": (["rp", "rf"], []),  # MLX's rope of the first outputs (the split launch gives q, k rotated)
}
# A variant is its base kernel's source with these defined (one source per kernel and backend).
VARIANTS = {
    f"{base}{suffix}": (base, defines) for base in ("spin_f", "spin_q")
    for suffix, defines in (("_res", ("CHESS_RESIDUAL",)), ("_xnorm", ("CHESS_XNORM",)),
                            ("_res_ynorm", ("CHESS_RESIDUAL", "CHESS_YNORM")), ("_rope", ("CHESS_ROPE",)),
                            ("_xnorm_rope", ("CHESS_XNORM", "CHESS_ROPE")))
}
for _name, (_base, _defines) in VARIANTS.items():
    _INPUTS[_name] = _INPUTS[_base] + [i for d in _defines for i in _DEFINE_EXTRAS[d][0]]
    _OUTPUTS[_name] = _OUTPUTS[_base] + [o for d in _defines for o in _DEFINE_EXTRAS[d][1]]
RESIDUAL_VARIANTS = {v: base for v, (base, defs) in VARIANTS.items() if defs == ("CHESS_RESIDUAL",)}
# Template parameters of each kernel, in the order the launchers pass them (checked by the tests
# against the "Template:" line of both the CUDA and the Metal source).
TEMPLATES = {
    "spout_f": ("T", "M", "K", "N", "WPR"),
    "spout_q": ("T", "M", "K", "N", "BITS", "GS", "RPW", "PARTS"),
    "spin_f": ("T", "M", "K", "N", "KC", "TPC", "NT"),
    "spin_q": ("T", "M", "K", "N", "BITS", "GS", "KC", "WORDS", "TPC", "NT"),
    "gateup_f": ("T", "M", "K", "N", "WPR", "TPC"),
    "gateup_q": ("T", "M", "K", "N", "BITS", "GS", "RPW", "TPC"),
    "kv_write": ("T", "NQ", "NKV", "D"),
    "kv_grow": ("T", "NQ", "NKV", "D"),
}


def kernel_source(kind: str, name: str) -> tuple[str, str]:
    """(header, body) of a kernel as written: a variant is its base source with its ``VARIANTS``
    defines."""
    if name not in VARIANTS:
        return read_source(kind, name)
    base, defines = VARIANTS[name]
    header, body = read_source(kind, base)
    return header, "".join(f"#define {d} 1\n" for d in defines) + body


def launch_source(kind: str, name: str) -> tuple[str, str]:
    """(header, body) as handed to MLX: ``kernel_source`` without comments and with only the
    shared helpers the kernel uses (``kernel_text``: MLX hashes or compares the whole text at every
    launch)."""
    return kernel_text.launch_text(*kernel_source(kind, name))


@lru_cache(maxsize=None)
def _kernel(kind: str, name: str):
    header, body = launch_source(kind, name)
    if kind == "cuda":
        return mx.fast.cuda_kernel(name=f"chess_{name}", input_names=_INPUTS[name],
                                   output_names=_OUTPUTS[name], source=body, header=header)
    return mx.fast.metal_kernel(name=f"chess_{name}", input_names=_INPUTS[name],
                                output_names=_OUTPUTS[name], source=body, header=header)


# ---------------------------------------------------------------- launch geometry ---------------
H100_SMS = 132  # the GPU the launch geometry was tuned on (benchmarks/RESULTS.md)


def split_k_chunk(k: int, n_tiles: int, quantized: bool) -> int:
    """Rows per split-K chunk of spin: the longest chunk (512 rows for half weights, 256 for
    quantized ones) halved until the grid has 2.5 blocks per SM (down to 64 rows). Long chunks
    amortise each block's compaction and epilogue; 2.5 blocks per SM keep every SM streaming.
    Chained sweep on the H100 (session 10): 4-bit 14336 -> 4096 at 50% took 19.5 us with 256 rows
    against 22.8 us with the 128 shipped before, 4096 -> 4096 10.3 us with 64 against 11.4. The
    rule was 3 blocks per SM until session 19, whose sweep of the split launch (4096 -> 6144,
    ``chain_sweep.py --only split``) put 384 blocks (2.9 per SM) ahead of 768: 4-bit 12.3 against
    15.8 us at 50% (14.9 / 21.6 at 0, 13.6 / 18.5 at 70%), float16 within noise at 0 and 50% and
    16.3 against 19.0 us at 70%. Of the kernels' shapes only the split launch's chunk changes."""
    kc = 256 if quantized else 512
    while kc > 64 and n_tiles * -(-k // kc) < 2.5 * H100_SMS:
        kc //= 2
    return kc


def spout_rows_per_warp(m: int, k: int, n: int) -> int:
    """Rows per warp of spout_q beyond one token (and of gateup_q but for one float16 token): 4 shares
    each x load and latency chain among 4 rows (Nsight A/B on H100: 1.45x one row per warp at 50%
    sparsity); 8 for one token on rows of <= 4096 inputs when the n rows still give every SM a
    block, as 4-step lanes leave room for 8 rows of loads in flight (chained on the GPU clock: 21.2
    vs 24.3 us at 50% on 14336x4096; on 4096x4096, 64 blocks, 12.3 vs 9.6 us: 4 wins; on
    14336-input rows 8 spills, 38.8 vs 25.9 us); 2 for larger decode batches, whose accumulators
    (RPW x M) would spill."""
    if m == 1 and k <= 4096 and n >= 8 * 8 * H100_SMS:
        return 8
    return 4 if m <= 4 else 2


def gateup_rows_per_warp(m: int, k: int, n: int, dtype=mx.float16) -> int:
    """Rows per warp of gateup_q (one warp per row group). Until session 11 ``spout_rows_per_warp``
    (8 for one token on the FFN shape); with float16 activations the dot products now run on half2
    (ChessQX in the kernel sources), and the chained sweep on the H100 put 2 rows ahead: 4-bit
    2x14336x4096 at 50% 28.6 us against 35.8 with 8, 37.2 with 4 and 35.7 with 1 (two ``qmv``:
    68.2 us). bfloat16 keeps the float32 dot product and its rule."""
    return 2 if m == 1 and dtype == mx.float16 else spout_rows_per_warp(m, k, n)


def spout_q_geometry(m: int, k: int, n: int, bits: int, dtype=mx.float16) -> tuple[int, int]:
    """(rows per warp, warps per row group) of spout_q. One float16 token (half2 dot products,
    session 11): 4-bit 4 rows x 4 warps on rows of <= 4096 inputs, x 2 beyond; 8-bit 4 rows x 4
    warps (8 beyond 4096 inputs). Fewer warps where a row has too few 16-byte steps to give each
    lane one. Chained sweep on the H100 (session 11, every combination checked against the
    reference, benchmarks/results/chain_sweep_half2_session11.txt): 4-bit at 50% 14336x4096 11.6
    us (8 x 4: 13.0), 4096x14336 13.0 (14.7), 4096x4096 4.9 (5.4); the 8-bit choice was within
    0.6 us of the best on every shape. bfloat16 keeps the float32 dot product and session 10's
    choice (4-bit 8 x 4). Larger batches keep ``spout_rows_per_warp`` and one warp per group (not
    swept)."""
    if m > 1:
        return spout_rows_per_warp(m, k, n), 1
    if bits == 8:
        rpw, parts = 4, 4 if k <= 4096 else 8
    elif dtype == mx.float16:
        rpw, parts = 4, 4 if k <= 4096 else 2
    else:
        rpw, parts = 8, 4
    steps = k * bits // 128
    while parts > 1 and 32 * parts > steps:
        parts //= 2
    return rpw, parts


def spout_warps_per_row(row_bytes: int) -> int:
    """Warps sharing one row in spout: long rows are split so few active rows still fill the GPU."""
    return 8 if row_bytes >= 16384 else 4 if row_bytes >= 6144 else 2 if row_bytes >= 2048 else 1


METAL_THREADGROUP_BYTES = 32768  # what an Apple GPU threadgroup may declare


def spin_tile(words: int = 0, bits: Optional[int] = None) -> int:
    """Outputs per block of spin_f (``bits`` None: 8 per lane) or spin_q (``words`` per lane)."""
    return 256 if bits is None else 32 * words * (32 // bits)


def spin_geometry(m: int, k: int, n: int, bits: Optional[int] = None, kind: str = "cuda",
                  words: Optional[int] = None, kc: Optional[int] = None) -> tuple[int, int, int]:
    """(words per lane, tiles, split-K chunk) of a spin_f (``bits`` None, words 0) or spin_q
    launch on (m, k) x (k, n); ``words`` and ``kc`` override the defaults (probes), and the default
    chunk follows the tile count that the words give."""
    words = 0 if bits is None else words or spin_q_words(m, k, n, bits, kind)
    tiles = -(-n // spin_tile(words, bits))
    return words, tiles, kc or split_k_chunk(k, tiles, quantized=bits is not None)


SPIN_BLOCKS_PER_SM = 4  # spin_q blocks an H100 SM holds at once (256 threads of <= 64 registers)


def spin_q_words(m: int, k: int, n: int, bits: int, kind: str = "cuda") -> int:
    """Words per lane of a spin_q launch: ``spin_words``, halved for one token where the narrower
    tile's grid (with its ``split_k_chunk``) fills one wave of SPIN_BLOCKS_PER_SM blocks per SM
    (7/8 of it or more, but no more). With the split-K sum in fixed-point reductions (session 26)
    a chunk's blocks no longer pay for partials the last block must sum, and a narrow tile with
    longer chunks wins at the same block count when they fill the wave: chained sweep on the H100
    (``chain_sweep.py --only spinq``), 4096 -> 4096 (512 blocks) at 50% / 70%, 4-bit 7.2 / 6.5 us
    with 1 word and 128-row chunks against 7.9 / 6.9 with 2 words and 64 rows (MLX's
    ``quantized_matmul``: 12.2), 8-bit 8.1 / 7.0 with 2 words and 128 rows against 9.0 / 7.3 with
    4 and 64. At half a wave it lost (4-bit, 256 blocks: 8.1 us with 1 word and 256 rows against
    7.7 with 2 and 128), and on down_proj's 14336 inputs the narrow grid would need two waves (896
    blocks; 4-bit 15.3 against 12.7 us at 50%). The split launch (q with k and v, 4096 -> 6144: 384
    blocks) is not measured yet and keeps ``spin_words``. ``split_fits`` and ``rope_fits`` callers
    check against the wider ``spin_words`` tile, which the narrow one divides."""
    words = spin_words(m, bits, kind)
    if m == 1 and words > 1:
        narrow = words // 2
        tiles = -(-n // spin_tile(narrow, bits))
        blocks = tiles * -(-k // split_k_chunk(k, tiles, quantized=True))
        if 7 * SPIN_BLOCKS_PER_SM * H100_SMS <= 8 * blocks <= 8 * SPIN_BLOCKS_PER_SM * H100_SMS:
            return narrow
    return words


def spin_threadgroup_bytes(m: int, kc: int, words: int = 0, bits: Optional[int] = None) -> int:
    """Static shared/threadgroup memory of spin_f (``bits`` None) or spin_q, as their sources
    declare it: idx[KC], xsh[M * KC], red[8][TILE], wcount and wnnz (8 per 256 rows of the chunk),
    a flag, and the fused norm's per-warp sums wss[8 * M]."""
    return 4 * (kc + m * kc + 8 * spin_tile(words, bits) + 16 * -(-kc // 256) + 1 + 8 * m)


def spin_words(m: int, bits: int = 4, kind: str = "cuda") -> int:
    """32-bit words per lane in spin_q: 8-byte loads for one or two tokens, 4-byte beyond; at 8 bits
    and one token 16-byte loads, so the tile is 512 outputs as at 4 bits (chained sweep, session
    10: 8-bit down_proj 14336 -> 4096 at 50% 21.8 us against 27.6 with 2 words; 4096 -> 4096 11.6
    against 10.9). On Metal also narrower where the reduction tile would not fit a threadgroup's
    32 KB."""
    words = 2 if m <= 2 else 1  # Nsight sweep (H100): 2 words beat 4 at one token, 1.4x at 4096x4096
    if bits == 8 and m == 1:
        words = 4
    if kind == "metal":
        while words > 1 and spin_threadgroup_bytes(m, 256, words, bits) > METAL_THREADGROUP_BYTES:
            words //= 2
    return words


def kernel_supports(kind: str, x: mx.array, w, transposed: bool) -> bool:
    """Shapes/dtypes the kernels handle (anything else takes the reference path). x may have any
    leading shape: its rows are the decode tokens (see ``rows``)."""
    if x.ndim < 2 or x.shape[-1] == 0 or x.dtype not in (mx.float16, mx.bfloat16):
        return False
    m, k_x = rows(x), x.shape[-1]
    if m == 0 or m > MAX_TOKENS:
        return False
    if isinstance(w, QWeight):
        if w.bits not in (4, 8) or w.group_size not in (32, 64) or w.scales.dtype != x.dtype:
            return False
        if transposed:
            return (m <= 4 and w.cols % (128 // w.bits) == 0 and k_x == w.rows
                    and _spin_chunks(m, k_x, w.cols, w.bits, kind) <= SPIN_MAX_CHUNKS)
        return k_x == w.cols and w.cols % (128 // w.bits) == 0
    if w.dtype != x.dtype:
        return False
    k = w.shape[0] if transposed else w.shape[1]
    n = w.shape[1] if transposed else w.shape[0]
    return (k_x == k and k % 8 == 0 and n % 8 == 0
            and (not transposed or _spin_chunks(m, k, n, None, kind) <= SPIN_MAX_CHUNKS))


def _spin_chunks(m: int, k: int, n: int, bits: Optional[int], kind: str) -> int:
    """Split-K chunks of a default spin launch (the kernels' fixed-point sum takes at most
    SPIN_MAX_CHUNKS: inputs beyond 511 * 512 rows for float weights go to the reference path)."""
    return -(-k // spin_geometry(m, k, n, bits, kind)[2])


def rows(x: mx.array) -> int:
    """Tokens in x (..., K). The kernels index a row-contiguous x as (rows, K) and write y in x's
    leading shape, so a decode step's (1, 1, K) activations need no reshape nodes: each graph node
    costs host time at every token (benchmarks/RESULTS.md, session 8)."""
    return x.size // x.shape[-1]


# ---------------------------------------------------------------- kernel calls ------------------
def _launch_spout(kind: str, x: mx.array, w, a: mx.array, wpr: Optional[int] = None,
                  rpw: Optional[int] = None, parts: Optional[int] = None) -> mx.array:
    """spout_f (``wpr`` warps per row) / spout_q (``rpw`` rows per warp and ``parts`` warps per
    row group, default ``spout_q_geometry``); the overrides are for launch-geometry probes."""
    m, k = rows(x), x.shape[-1]
    if isinstance(w, QWeight):
        n = w.rows
        d_rpw, d_parts = spout_q_geometry(m, k, n, w.bits, x.dtype)
        rpw, parts = rpw or d_rpw, parts or d_parts
        tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("BITS", w.bits), ("GS", w.group_size), ("RPW", rpw),
                ("PARTS", parts)]
        return _kernel(kind, "spout_q")(
            inputs=[x, w.w, w.kernel_sb(), a], template=tmpl, grid=(-(-n // (8 // parts * rpw)) * 256, 1, 1),
            threadgroup=(256, 1, 1), output_shapes=[(*x.shape[:-1], n)], output_dtypes=[x.dtype], init_value=_POISON)[0]
    n = w.shape[0]
    wpr = wpr or spout_warps_per_row(k * 2)
    tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("WPR", wpr)]
    blocks = -(-n // (8 // wpr))
    return _kernel(kind, "spout_f")(inputs=[x, w, a], template=tmpl, grid=(blocks * 256, 1, 1),
                                    threadgroup=(256, 1, 1), output_shapes=[(*x.shape[:-1], n)], output_dtypes=[x.dtype],
                                    init_value=_POISON)[0]


@dataclass
class Workspace:
    """The int32 counters of one sparse-input call site (``sem``: tiles + 1 zeros) and the ordering
    token of its launches (``last``: the previous launch's output y).

    The kernel's blocks meet through ``sem`` and the last one resets it, so two launches on one
    workspace must never overlap. MLX's CUDA graphs run nodes without a data path between them
    concurrently: teacher-forced decode steps (the layer-0 projections of consecutive tokens) and
    the independent calls of a timed batch would share counters and corrupt each other's sums
    (seen on the H100: run-to-run differences in logits). Each launch therefore takes ``last`` as an
    input it never reads, which makes it wait for the launch before it at the same site; that costs
    no node and no bytes.

    The token is y, not the density output: the stats recorder reads the densities on the thread
    that builds the next token, and reading an array waits on and clears its completion event. An
    array that the next token's graph takes as an input must not be read there while the
    two-thread decode's encoder evaluates that graph (``pipelined``): MLX's eval reads the event of
    every input scheduled earlier. The same race on the sampled token crashed the CPU decode
    (RESULTS.md session 16 §5); the density tokens fit session 15's hangs with the recorder on.
    Nothing reads a layer's y on the host.

    ``partial`` is the site's split-K scratch (``spin_partials``: three 32-bit words per token and
    output), zeros before and after every launch: the blocks add their chunks' sums into it in
    fixed point and the last block of a tile reads the totals and zeroes them. It is kept between
    launches (an output would be allocated at every launch: ~2 us of MLX's encoding each,
    RESULTS.md session 18); the token orders it as it orders ``sem``."""

    sem: mx.array
    last: mx.array
    partial: mx.array

    def hold(self, size: int) -> None:
        """Grow the scratch to at least ``size`` floats: fresh zeros (every launch leaves its
        totals at zero, so nothing old need be kept)."""
        if self.partial.size < size:
            self.partial = mx.zeros((size,), dtype=mx.float32)


SPIN_MIN_TILE = 128  # outputs per block of the narrowest spin launch: spin_q, 8 bits, one word per lane


def workspace(n_out: int, like: Optional[mx.array] = None) -> Workspace:
    """A fresh workspace for one sparse-input call site (see ``Workspace``): zeroed counters and a
    placeholder first token. Given the site's input ``like``, the placeholder has the shape and
    dtype of the launches' y, so a compiled path traced with it replays for every later token
    instead of tracing again at the second one, and the split-K scratch is sized for launches on
    inputs of that shape (any weight type: it holds one total per output); otherwise the first
    launch sizes it."""
    first = mx.zeros((), dtype=mx.float32) if like is None else mx.zeros((*like.shape[:-1], n_out), dtype=like.dtype)
    size = 1 if like is None else spin_partials(rows(like), n_out)
    ws = Workspace(mx.zeros((-(-n_out // SPIN_MIN_TILE) + 2,), dtype=mx.int32), first,
                   mx.zeros((size,), dtype=mx.float32))
    mx.eval(ws.sem, ws.last, ws.partial)
    return ws


def spin_partials(m: int, n: int) -> int:
    """Float32 elements of a spin launch's split-K scratch: three 32-bit words per token and
    output, whatever the chunk (the kernels add the chunks' sums into one fixed-point total per
    output: an int64 on CUDA, three 32-bit words on Metal; common.cuh's chess_fixed)."""
    return SPIN_SCRATCH_WORDS * m * n


SPIN_SCRATCH_WORDS = 3
SPIN_MAX_CHUNKS = 511  # chess_max_chunks() of the kernels: the fixed-point totals' headroom


SCALAR_SLOTS = 8


def scalar_threshold(v: float, dtype) -> mx.array:
    """A scalar threshold as the kernels should get it: SCALAR_SLOTS equal values (>= 16 bytes).
    MLX's CUDA allocator serves buffers of <= 8 bytes from one managed pool advised read-mostly,
    where every launch's density output is also written; a kernel reading its threshold from
    there waited 3-4 us per block before its first weight load (H100 clock stamps,
    benchmarks/RESULTS.md session 9). The kernels read t[0]; the reference path takes one value."""
    return mx.full((SCALAR_SLOTS,), v, dtype=dtype)


_ZERO: dict = {}


def zero_threshold(dtype) -> mx.array:
    """t = 0 (keep every input) as a cached ``scalar_threshold``, so no launch allocates a constant."""
    z = _ZERO.get(dtype)
    if z is None:
        z = _ZERO[dtype] = scalar_threshold(0.0, dtype)
        mx.eval(z)
    return z


def _tpc(t: mx.array, n: int) -> int:
    """1 for one threshold per channel, 0 for a scalar (1 value or a padded ``scalar_threshold``,
    whose equal values also make it right to read per channel when n == SCALAR_SLOTS)."""
    if t.size == n:
        return 1
    if t.size in (1, SCALAR_SLOTS):
        return 0
    raise ValueError(f"threshold has {t.size} entries, expected 1, {SCALAR_SLOTS} (a padded scalar) or {n}")


def split_fits(m: int, nt: int, bits: Optional[int] = None, kind: str = "cuda") -> bool:
    """Whether a spin launch of ``m`` tokens on float (``bits`` None) or ``bits``-bit weights can
    threshold its first ``nt`` outputs only: ``nt`` must end a tile (a block compacts one input for
    its whole tile)."""
    words = 0 if bits is None else spin_words(m, bits, kind)
    return nt > 0 and nt % spin_tile(words, bits) == 0


def spin_variant(residual: bool, xnorm: bool, ynorm: bool, rope: bool = False) -> Optional[str]:
    """The suffix of the spin kernel for these fused extras (a ``VARIANTS`` entry of spin_f, whose
    spin_q twin has the same defines), or None where no kernel has them."""
    want = {d for d, on in (("CHESS_RESIDUAL", residual), ("CHESS_XNORM", xnorm), ("CHESS_YNORM", ynorm),
                            ("CHESS_ROPE", rope)) if on}
    if not want:
        return ""
    return next((name[len("spin_f"):] for name, (base, defines) in VARIANTS.items()
                 if base == "spin_f" and set(defines) == want), None)


def _eps_bits(eps: float) -> int:
    """A norm's eps (or a rope's scale) as the int32 bits of its float32 (a kernel template takes ints only)."""
    return struct.unpack("<i", struct.pack("<f", float(eps)))[0]


def rope_fits(rope: Rope, n: int, tile: int) -> bool:
    """Whether a spin launch with ``n`` outputs in tiles of ``tile`` can apply ``rope``: each rotated
    pair must lie in one tile and every thread's outputs at one head dimension (``dims`` divides 256
    and the tile), and the rotated outputs must be whole heads."""
    d = rope.dims
    return d > 0 and d % 2 == 0 and 256 % d == 0 and tile % d == 0 and 0 < rope.n <= n and rope.n % d == 0


def _rope_args(rope: Rope, n: int, tile: int) -> tuple[list, list]:
    """The rope's (inputs, template entries) of a spin launch, after checking what the kernel reads."""
    if not rope_fits(rope, n, tile):
        raise ValueError(f"rope of {rope.n} outputs in heads of {rope.dims} does not fit {n} outputs in tiles of {tile}")
    if rope.pos is None or rope.pos.dtype != mx.int32 or rope.pos.size < ROPE_POSITION_SLOTS:
        raise ValueError(f"rope position must be int32 with >= {ROPE_POSITION_SLOTS} entries (rope_position)")
    if rope.inv_freq.dtype != mx.float32 or rope.inv_freq.shape != (rope.dims // 2,):
        raise ValueError(f"rope inverse frequencies must be float32 of shape ({rope.dims // 2},)")
    return ([rope.pos, rope.inv_freq],
            [("ROPE_D", rope.dims), ("ROPE_N", rope.n), ("ROPE_TRAD", int(rope.traditional)),
             ("ROPE_SB", _eps_bits(rope.scale))])


def _launch_spin(kind: str, x: mx.array, wt, t: mx.array, ws: Workspace,
                 kc: Optional[int] = None, words: Optional[int] = None,
                 residual: Optional[mx.array] = None, nt: Optional[int] = None,
                 xnorm: Optional[Norm] = None, ynorm: Optional[Norm] = None,
                 rope: Optional[Rope] = None) -> tuple:
    """spin_f / spin_q: thresholded sparse-input product and its input density, one launch,
    ordered after the previous launch on ``ws`` (y becomes its token). The density is a
    0-d array (no reshape node). ``residual`` (y's shape and dtype, row-contiguous) is added to
    the product in the kernel. ``nt``: threshold the input of the first ``nt`` outputs only (a
    multiple of the tile; None: all). ``xnorm`` = (weight, eps): x is an RMSNorm's input, applied
    in the kernel; ``ynorm`` (with ``residual``): a third result, that RMSNorm of y
    (``spin_variant``); ``rope``: y's first outputs rotated (without ``residual``). ``kc`` and
    ``words`` (spin_q) override the launch geometry for probes."""
    m, k = rows(x), x.shape[-1]
    quantized = isinstance(wt, QWeight)
    n = wt.cols if quantized else wt.shape[1]
    words, tiles, kc = spin_geometry(m, k, n, wt.bits if quantized else None, kind, words, kc)
    chunks = -(-k // kc)
    nt = n if nt is None else nt
    if not 0 < nt <= n or (nt < n and nt % spin_tile(words, wt.bits if quantized else None)):
        raise ValueError(f"thresholded outputs {nt} of {n} do not end a tile")
    variant = spin_variant(residual is not None, xnorm is not None, ynorm is not None, rope is not None)
    if variant is None:
        raise ValueError("no spin kernel fuses this combination of residual, norms and rope")
    # the kernel indexes sem[0 .. tiles] (and sem[tiles + 1] with a fused output norm)
    if ws.sem.dtype != mx.int32 or ws.sem.size < tiles + 1 + (ynorm is not None):
        raise ValueError(f"workspace too small: {ws.sem.size} counters for {tiles} tiles")
    if chunks > SPIN_MAX_CHUNKS:
        raise ValueError(f"{chunks} split-K chunks of {kc} rows: the kernels sum at most {SPIN_MAX_CHUNKS}")
    ws.hold(spin_partials(m, n))  # grows only a workspace made without the site's input, or for fewer tokens
    site = [ws.sem, ws.partial, ws.last]
    if quantized:
        name, inputs = "spin_q", [x, t, wt.w, wt.kernel_sb(), *site]
        tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("BITS", wt.bits), ("GS", wt.group_size),
                ("KC", kc), ("WORDS", words), ("TPC", _tpc(t, k)), ("NT", nt)]
    else:
        name, inputs = "spin_f", [x, t, wt, *site]
        tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("KC", kc), ("TPC", _tpc(t, k)), ("NT", nt)]
    if residual is not None:  # the kernel reads r[m * N + n] for every output it writes
        if residual.shape != (*x.shape[:-1], n) or residual.dtype != x.dtype:
            raise ValueError(f"residual of shape {residual.shape} and {residual.dtype}, expected "
                             f"{(*x.shape[:-1], n)} and {x.dtype}")
        inputs = inputs + [residual]
    for norm, size in ((xnorm, k), (ynorm, n)):
        if norm is not None:  # the kernel reads the weight 16 bytes at a time
            if norm[0].shape != (size,) or norm[0].dtype != x.dtype or size % 8:
                raise ValueError(f"norm weight of shape {norm[0].shape} and {norm[0].dtype}, expected "
                                 f"({size},) and {x.dtype}, a multiple of 8")
            inputs = inputs + [norm[0]]
            tmpl = tmpl + [("EPSB", _eps_bits(norm[1]))]
    if rope is not None:
        more, rt = _rope_args(rope, n, spin_tile(words, wt.bits if quantized else None))
        inputs, tmpl = inputs + more, tmpl + rt
    out_shape = (*x.shape[:-1], n)
    out = _kernel(kind, name + variant)(
        inputs=inputs, template=tmpl, grid=(tiles * 256, chunks, 1), threadgroup=(256, 1, 1),
        output_shapes=[out_shape, ()] + ([out_shape] if ynorm is not None else []),
        output_dtypes=[x.dtype, mx.float32] + ([x.dtype] if ynorm is not None else []),
        init_value=_POISON)
    ws.last = out[0]
    return tuple(out)


def _launch_gateup(kind: str, x: mx.array, w2, t: mx.array, wpr: Optional[int] = None,
                   rpw: Optional[int] = None) -> mx.array:
    """gateup_f (``w2`` = float ``[Wg; Wu]``, ``wpr`` warps per row) / gateup_q (``w2`` = the stacked
    QWeight of ``stack_gate_up``, ``rpw`` rows per warp, default ``gateup_rows_per_warp``)."""
    m, k = rows(x), x.shape[-1]
    if isinstance(w2, QWeight):
        n = w2.rows // 2
        rpw = rpw or gateup_rows_per_warp(m, k, n, x.dtype)
        tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("BITS", w2.bits), ("GS", w2.group_size),
                ("RPW", rpw), ("TPC", _tpc(t, n))]
        return _kernel(kind, "gateup_q")(
            inputs=[x, w2.w, w2.kernel_sb(), t], template=tmpl,
            grid=(-(-n // (8 * rpw)) * 256, 1, 1), threadgroup=(256, 1, 1), output_shapes=[(*x.shape[:-1], n)],
            output_dtypes=[x.dtype], init_value=_POISON)[0]
    n = w2.shape[0] // 2
    wpr = wpr or spout_warps_per_row(k * 2)
    tmpl = [("T", x.dtype), ("M", m), ("K", k), ("N", n), ("WPR", wpr), ("TPC", _tpc(t, n))]
    blocks = -(-n // (8 // wpr))
    return _kernel(kind, "gateup_f")(inputs=[x, w2, t], template=tmpl, grid=(blocks * 256, 1, 1),
                                     threadgroup=(256, 1, 1), output_shapes=[(*x.shape[:-1], n)], output_dtypes=[x.dtype],
                                     init_value=_POISON)[0]


def gated_sparse_output(x: mx.array, w, a: mx.array) -> mx.array:
    """``a * (x @ W^T)`` for x (..., K), W (N, K) or QWeight, a (..., N); rows with a == 0 are skipped."""
    kind = backend()
    n = w.rows if isinstance(w, QWeight) else w.shape[0]
    if (kind != "reference" and kernel_supports(kind, x, w, transposed=False) and a.dtype == x.dtype
            and a.shape == (*x.shape[:-1], n)):
        return _launch_spout(kind, x, w, a)
    return reference_gated_sparse_output(x, w, a)


def sparse_input(x: mx.array, wt, t: Optional[mx.array] = None, ws: Optional[Workspace] = None,
                 residual: Optional[mx.array] = None, nt: Optional[int] = None,
                 xnorm: Optional[Norm] = None, ynorm: Optional[Norm] = None,
                 rope: Optional[Rope] = None) -> tuple:
    """``(threshold(x, t) @ wt [+ residual], density)`` for x (..., K), wt = W^T (K, N) or its
    QWeight (quantized along N); only the rows of wt that meet a surviving input are read. ``ws``:
    the call site's ``workspace`` (a fresh one is made if omitted, at the cost of a fill). ``nt``:
    only the first ``nt`` outputs take the threshold, the rest x as it is, i.e. a thresholded
    projection and dense ones on the same x, their W^T side by side in ``wt``; one launch where
    ``nt`` ends a kernel tile (``split_fits``), else the reference. The density is that of the
    thresholded input. ``xnorm`` = (weight, eps): x is that RMSNorm's input (the product takes
    its output); ``ynorm`` = (weight, eps): a third result, that RMSNorm of the (residual) sum;
    ``rope``: y's first outputs rotated (``Rope``). Where a kernel fuses them (``spin_variant``,
    ``rope_fits``), one launch does it all."""
    kind = backend()
    bits = wt.bits if isinstance(wt, QWeight) else None
    fused = spin_variant(residual is not None, xnorm is not None, ynorm is not None, rope is not None) is not None
    if kind != "reference" and fused and kernel_supports(kind, x, wt, transposed=True) and (
            nt is None or split_fits(rows(x), nt, bits, kind)):
        n = wt.cols if isinstance(wt, QWeight) else wt.shape[1]
        if rope is None or rope_fits(rope, n, spin_tile(spin_words(rows(x), bits, kind) if bits else 0, bits)):
            return _launch_spin(kind, x, wt, zero_threshold(x.dtype) if t is None else t,
                                workspace(n) if ws is None else ws, residual=residual, nt=nt, xnorm=xnorm,
                                ynorm=ynorm, rope=rope)
    return reference_sparse_input(x, wt, t, residual, nt, xnorm, ynorm, rope)


def gate_up(x: mx.array, wg, wu, t: mx.array) -> mx.array:
    """``threshold(SiLU(x W_gate^T), t) * (x W_up^T)``; the up rows of dropped channels are never
    read. One fused kernel for two float weights or two QWeights of one format (their rows stacked
    here, lazily: ``gate_up_stacked`` takes rows stored that way); otherwise (mixed formats) the
    gate GEMV, then the sparse-output kernel for up."""
    if isinstance(wg, QWeight) and isinstance(wu, QWeight):
        same = (wg.bits, wg.group_size, wg.rows, wg.cols) == (wu.bits, wu.group_size, wu.rows, wu.cols)
    elif isinstance(wg, QWeight) or isinstance(wu, QWeight):
        same = False  # mixed formats
    else:
        same = wg.shape == wu.shape and wg.dtype == wu.dtype
    if not same:
        return gated_sparse_output(x, wu, threshold(silu(matvec_t(x, wg)), t))
    if backend() == "reference":
        return reference_gate_up(x, wg, wu, t)
    return gate_up_stacked(x, stack_gate_up(wg, wu), t)


def gate_up_stacked(x: mx.array, w2, t: mx.array) -> mx.array:
    """``gate_up`` on the stacked rows ``w2`` of ``stack_gate_up``: one launch where a kernel takes
    them, else the reference on their gate and up views."""
    kind = backend()
    if kind != "reference" and kernel_supports(kind, x, w2, transposed=False):
        return _launch_gateup(kind, x, w2, t)
    return reference_gate_up(x, *split_gate_up(w2), t)
