"""The float16 arithmetic of the quantized sparse-input kernel (``ChessSpinQ<half>`` in
cuda/common.cuh and its Metal twin), emulated op by op in numpy against float64.

The GPU check (benchmarks/kernels.py) shows the kernel computes what this scheme computes; these
tests show the scheme itself holds on inputs a random check rarely meets: products of four rows
summed in float16, with x * scale brought into [2^TGT, 2^(TGT+1)) by a power of two per four
rows, must neither overflow nor lose small rows to float16's subnormals, over many orders of
magnitude of x and of the scales.
"""

from __future__ import annotations

import numpy as np
import pytest

U = 4  # rows per half2 chain, as in spin_q


def f16(v):
    return np.asarray(v, dtype=np.float64).astype(np.float16).astype(np.float64)


def f32(v):
    return np.asarray(v, dtype=np.float64).astype(np.float32).astype(np.float64)


def power_of_two_scale(amax: np.ndarray, tgt: int) -> tuple[np.ndarray, np.ndarray]:
    """(up, down) as the kernel derives them from the float32 exponent field of amax."""
    a32 = amax.astype(np.float32)
    field = (a32.view(np.int32) >> 23).astype(np.int64)
    e = np.clip(field, tgt + 1, 254)
    return np.ldexp(1.0, 127 + tgt - e), np.ldexp(1.0, e - tgt - 127)


def emulate_spin_q_half(x, q, sc, bi, bits: int) -> np.ndarray:
    """y[n] = sum_j x[j] * (sc[j, n] * q[j, n] + bi[j, n]) as ChessSpinQ<half> computes it (sc and bi
    already broadcast to the outputs); float32 result before the output cast."""
    off = float(1 << (bits - 1))
    tgt = 8 if bits == 4 else 4
    k, n = q.shape
    acc = np.zeros(n)
    accb = np.zeros(n)
    for g in range(0, k, U):
        rows = range(g, min(g + U, k))
        xs = np.stack([f32(x[j] * sc[j]) for j in rows])
        for j in rows:
            accb = f32(x[j] * f32(off * sc[j] + bi[j]) + accb)
        up, down = power_of_two_scale(np.abs(xs).max(axis=0), tgt)
        xh = f16(xs * up)
        a = None
        for i, j in enumerate(rows):
            qh = f16(q[j] - off)  # exact: 1024 + q minus 1024 + OFF
            a = f16(qh * xh[i]) if a is None else f16(qh * xh[i] + a)  # HMUL2, then HFMA2 (one rounding)
        acc = f32(a * down + acc)
    return f32(acc + accb)


def case(rng, k: int, n: int, bits: int, x_decades: tuple[float, float], s_decades: tuple[float, float]):
    x = f16(rng.standard_normal(k) * 10.0 ** rng.uniform(*x_decades, k))
    q = rng.integers(0, 1 << bits, (k, n)).astype(np.float64)
    sc = f16(10.0 ** rng.uniform(*s_decades, (k, n)))
    bi = f16(-(1 << (bits - 1)) * sc * rng.uniform(0.8, 1.2, (k, n)))
    return x, q, sc, bi


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("x_decades,s_decades", [
    ((-1.0, 0.5), (-3.0, -2.0)),   # activations and scales of a real layer
    ((-7.0, 3.0), (-6.0, 0.0)),    # ten and six orders of magnitude in one sum
    ((2.5, 4.2), (-1.0, 0.0)),     # |x * s| up to ~1.6e4: a naive half product of q would overflow
])
def test_half2_sparse_input_rows_match_float64(bits, x_decades, s_decades):
    rng = np.random.default_rng(bits * 100 + int(10 * x_decades[1]))
    k, n = 64, 48
    x, q, sc, bi = case(rng, k, n, bits, x_decades, s_decades)
    ref = (x[:, None] * (sc * q + bi)).sum(axis=0)
    y = emulate_spin_q_half(x, q, sc, bi, bits)
    assert np.all(np.isfinite(y))
    # the half products err by ~2^-11 of each four-row chain; a column's error stays a few 1e-4 of
    # the size of its terms (not of the sum, which cancels)
    scale = np.sqrt((x[:, None] ** 2 * (sc * q + bi) ** 2).sum(axis=0))
    assert np.max(np.abs(y - ref) / scale) < 2e-3


def test_small_rows_are_not_lost_beside_a_large_one():
    """A row 2^-20 of the chain's largest still counts: without the per-chain power-of-two scale it
    would fall below float16's smallest subnormal and vanish."""
    bits, n = 4, 8
    q = np.full((4, n), 15.0)
    sc = np.full((4, n), 1.0)
    bi = np.zeros((4, n))
    x = np.array([1e-3, 1e-3 * 2.0 ** -20, 1e-3 * 2.0 ** -20, 0.0])
    y = emulate_spin_q_half(x, q, sc, bi, bits)
    ref = (x[:, None] * q).sum(axis=0)
    np.testing.assert_allclose(y, ref, rtol=1e-3)
    # the same rows alone (their chain's largest is small) are kept exactly as well
    y2 = emulate_spin_q_half(x[1:], q[1:], sc[1:], bi[1:], bits)
    np.testing.assert_allclose(y2, (x[1:, None] * q[1:]).sum(axis=0), rtol=1e-3)


def test_scale_brings_every_chain_maximum_into_its_window():
    rng = np.random.default_rng(0)
    amax = np.concatenate([10.0 ** rng.uniform(-30, 30, 1000), [0.0, 1e-40, np.float32(3e38)]])
    for tgt in (4, 8):
        up, down = power_of_two_scale(amax, tgt)
        np.testing.assert_array_equal(up * down, 1.0)
        scaled = amax * up
        normal = (amax > 2.0 ** -100) & (amax < 2.0 ** 120)
        assert np.all((scaled[normal] >= 2.0 ** tgt) & (scaled[normal] < 2.0 ** (tgt + 1)))
        assert np.all(scaled < 2.0 ** (tgt + 1))  # never above the window: chains cannot overflow
