"""Check and time every sparse GEMV kernel in one GPU call.

    python benchmarks/kernels.py [--quick] [--json OUT.json]

1. Correctness: every kernel x weight type x Llama-3-8B shape x sparsity (0, 0.5, 0.7, 0.9, 0.99)
   against the pure-MLX reference on fresh random inputs, outputs pre-filled with NaN so an
   unwritten element fails; relative error ||y - ref|| / ||ref|| must be < 1e-2. The sparse-input
   kernel is checked plain (pre-sparsified x) and with its fused threshold (scalar and per
   channel), its density output exactly, and its workspace back at zeros after every launch; the
   fused gate/up kernel with per-channel thresholds set 2% away from |SiLU(g)| (so rounding cannot
   flip a decision: its zero pattern must match exactly) and with a scalar threshold.
2. Timing at sparsity 0, 0.5, 0.7, 0.9 against dense ``x @ W.T`` / ``mx.quantized_matmul`` of the
   same matrix, rotating several weight copies (> 4x L2) so the cache does not flatter anyone.
   On CUDA each op runs in a chain, as a model's layers do, and is timed on the GPU's own clock
   (``gpu_timer.py``: kernel plus one launch gap, no host time, free clocks); elsewhere (Metal) by
   host-timed batches of independent calls. Achieved bandwidth = bytes the kernel really reads /
   time, as a fraction of the measured copy bandwidth (read + write of 1-2 GiB; on CUDA timed on
   the GPU clock like the kernels since session 32, before that host-timed, which spread ~10%).
3. Crossover: decode batch M = 1, 2, 4, 8 tokens (independent 50% masks) vs dense.
4. The attention head under CHESS+attention: the split launch over ``[Wq^T | Wk^T | Wv^T]`` (q's
   input thresholded, k and v dense; checked in 1. as ``sparse_input_split``) against q's own
   launch plus the dense ``[Wk; Wv]`` product, and against the dense ``[Wq; Wk; Wv]`` product.

``--benches`` picks the timings (gemv, gate_up, qkv); ``--wtypes`` the weight types checked and
timed (e.g. ``--skip-check --benches gemv --wtypes float16``: one type's table in about a minute).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
import json
import math
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from chess_mlx import sparse_gemv as G  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_timer  # noqa: E402

SHAPES = [(4096, 14336), (14336, 4096), (4096, 4096)]  # (out, in) of W
QKV = (4096, 1024)  # Llama-3-8B's q and k/v outputs: [Wq^T | Wk^T | Wv^T] is 4096 x 6144
LEVELS_CHECK = [0.0, 0.5, 0.7, 0.9, 0.99]
LEVELS_TIME = [0.0, 0.5, 0.7, 0.9]
WTYPES = ["float16", "bfloat16", "q4g64", "q4g32", "q8g64", "q8g32"]
L2_BYTES = 50 << 20


def parse_wtype(t: str):
    if t.startswith("q"):
        bits, gs = t[1:].split("g")
        return mx.float16, int(bits), int(gs)
    return getattr(mx, t), None, None


def make_weight(out_dim: int, in_dim: int, wtype: str, transposed: bool):
    """Random weight in the kernel's layout: W (out, in) or W^T (in, out); quantized likewise, with
    scales and biases packed (``QWeight.sb``) as the model's stored weights are."""
    dtype, bits, gs = parse_wtype(wtype)
    shape = (in_dim, out_dim) if transposed else (out_dim, in_dim)
    m = (mx.random.normal(shape) * (1.0 / math.sqrt(in_dim))).astype(dtype)
    if bits:
        return G.QWeight.quantize(m, bits, gs).packed()
    return m


def arrays(w) -> list:
    """What to evaluate of a weight so that no launch meets a lazy part of it."""
    return [w.w, w.sb, w.scales, w.biases] if isinstance(w, G.QWeight) else [w]


def weight_copies(out_dim: int, in_dim: int, wtype: str, transposed: bool = False, per_call: int = 1) -> list:
    """Separately allocated random weights, evaluated: enough (>= 2) that rotating through them,
    ``per_call`` matrices per call, touches over 4x the L2, so the cache flatters no timing."""
    first = make_weight(out_dim, in_dim, wtype, transposed)
    count = max(2, math.ceil(4 * L2_BYTES / (per_call * first.nbytes)))
    ws = [first] + [make_weight(out_dim, in_dim, wtype, transposed) for _ in range(count - 1)]
    mx.eval([a for w in ws for a in arrays(w)])
    return ws


def sparse_vec(m: int, n: int, s: float, dtype) -> mx.array:
    v = mx.random.normal((m, n)).astype(dtype)
    keep = mx.random.uniform(shape=(m, n)) >= s
    return mx.where(keep, v, mx.zeros((), dtype))


def random_case(wtype: str, out_dim: int, in_dim: int, s: float, m: int = 1):
    """Fresh (w, wt, x, a, xs): both weight layouts, a dense x, and s-sparse gate / input vectors,
    all evaluated so that later timing sees none of their creation."""
    dtype = parse_wtype(wtype)[0]
    w = make_weight(out_dim, in_dim, wtype, transposed=False)
    wt = make_weight(out_dim, in_dim, wtype, transposed=True)
    x = mx.random.normal((m, in_dim)).astype(dtype)
    a, xs = sparse_vec(m, out_dim, s, dtype), sparse_vec(m, in_dim, s, dtype)
    mx.eval(x, a, xs, *arrays(w), *arrays(wt))
    return w, wt, x, a, xs


def rel_err(y: mx.array, ref: mx.array) -> float:
    y, ref = y.astype(mx.float32), ref.astype(mx.float32)
    if mx.any(mx.isnan(y)).item():
        return float("nan")
    den = mx.linalg.norm(ref).item()
    return mx.linalg.norm(y - ref).item() / max(den, 1e-30)


def spin_check(kind: str, x: mx.array, wt, t=None, residual: bool = False, nt=None, xnorm=None, ynorm=None,
               rope=None) -> dict:
    """One sparse-input launch vs the reference: output error, density error, workspace reset. A
    launch that raises is a failed check (rel_err NaN, the error kept), not the end of the run.
    ``residual``: the fused-residual kernel, with a random residual r; the error is that of y - r
    against the reference's (so r's size does not hide the product's error). ``nt``: a split
    launch, the threshold on the first nt outputs only (``sparse_input``'s ``nt``). ``xnorm`` /
    ``ynorm``: (weight, eps) of a fused RMSNorm of x / of the residual sum; with ``ynorm`` the
    error is also that of the norm's output (``yn_err``), and counts in rel_err. ``rope``: a fused
    rope of the first outputs (``sparse_gemv.Rope``)."""
    try:
        return _spin_check(kind, x, wt, t, residual, nt, xnorm, ynorm, rope)
    except ValueError as e:
        return dict(rel_err=float("nan"), error=str(e))


def _spin_check(kind: str, x: mx.array, wt, t=None, residual: bool = False, nt=None, xnorm=None, ynorm=None,
                rope=None) -> dict:
    n = wt.cols if isinstance(wt, G.QWeight) else wt.shape[1]
    ws = G.workspace(n)
    r = mx.random.normal((*x.shape[:-1], n)).astype(x.dtype) if residual else None
    tt = G.zero_threshold(x.dtype) if t is None else t
    out = G._launch_spin(kind, x, wt, tt, ws, residual=r, nt=nt, xnorm=xnorm, ynorm=ynorm, rope=rope)
    mx.eval(out)  # a workspace serves one launch at a time (the model's launches are data-ordered)
    out2 = G._launch_spin(kind, x, wt, tt, ws, residual=r, nt=nt, xnorm=xnorm, ynorm=ynorm, rope=rope)
    ref = G.reference_sparse_input(x, wt, t, r, nt, xnorm, ynorm, rope)
    mx.eval(out2, ref)
    (y, d), (y2, d2), (ry, rd) = out[:2], out2[:2], ref[:2]
    yn_err = max(rel_err(out[2], ref[2]), rel_err(out2[2], ref[2])) if ynorm is not None else 0.0
    if r is not None:
        r32 = r.astype(mx.float32)
        y, y2, ry = (v.astype(mx.float32) - r32 for v in (y, y2, ry))
    dens_err = max(abs(d.item() - rd.item()), abs(d2.item() - rd.item()))
    ok_ws = not mx.any(ws.sem != 0).item()
    err = max(rel_err(y, ry), rel_err(y2, ry), yn_err)
    return dict(rel_err=err if ok_ws and dens_err < 1e-6 else float("nan"),
                dens_err=dens_err, ws_reset=ok_ws, density=rd.item(), **({"yn_err": yn_err} if ynorm else {}))


def norm_case(k: int, s: float, dtype, m: int = 1):
    """(x, (weight, eps), t) for a fused input norm: x of a larger scale than its norm's output,
    a random weight, and a scalar threshold that drops the share s of the normalized inputs,
    midway between two of their values (a tie would hang on the last bit of the norm's scale,
    whose summation order the kernel does not share with MLX)."""
    x = (3 * mx.random.normal((m, k))).astype(dtype)
    g = mx.random.uniform(0.5, 1.5, (k,)).astype(dtype)
    v = np.sort(np.abs(np.array(mx.fast.rms_norm(x, g, 1e-5).astype(mx.float32))).reshape(-1))
    i = min(v.size - 2, int(s * v.size))
    while i + 2 < v.size and v[i] == v[i + 1]:  # values repeat in half precision: the next gap
        i += 1
    # float32, so the midpoint stays between the two (in x's dtype it would round onto one)
    return x, (g, 1e-5), mx.array([float(v[i] + v[i + 1]) / 2 if s else 0.0], dtype=mx.float32)


ROPE_POSITIONS = (0, 1, 37, 8191, 131071)


def rope_case(i: int, dims: int, n: int) -> G.Rope:
    """The i-th fused-rope case: positions from 0 to 131071, both layouts, Llama-3's base (500000)
    and a random set of frequencies (as Llama3RoPE's rescaled ones are), scale 1 or 0.5."""
    if i % 2 == 0:
        inv = G.rope_inverse_frequencies(dims, 500000.0)
    else:
        inv = mx.array(np.random.default_rng(i).uniform(1e-6, 1.0, dims // 2).astype(np.float32))
    return G.Rope(inv, dims, n, traditional=i % 3 == 1, scale=0.5 if i % 4 == 3 else 1.0,
                  pos=G.rope_position(ROPE_POSITIONS[i % len(ROPE_POSITIONS)]))


def float32_weight(w) -> mx.array:
    """W in float32; a QWeight as scale * q + bias computed in float32. The reference for quantized
    sparse-output kernels: MLX's CUDA 4-bit quantized_matmul accumulates in the activation dtype
    (float16), which moves small outputs by more than the kernels' float32 sums do."""
    if isinstance(w, G.QWeight):
        return G.QWeight(w.w, w.scales.astype(mx.float32), w.biases.astype(mx.float32), w.bits,
                         w.group_size).dequantize()
    return w.astype(mx.float32)


def act_abs(x, wg) -> mx.array:
    """|SiLU(x W_gate^T)| in float32 (M, N): what the fused gate/up kernel thresholds."""
    g = x.astype(mx.float32) @ float32_weight(wg).T
    return mx.abs(g * mx.sigmoid(g))


def decision_margin(a: mx.array, t: mx.array) -> mx.array:
    """How far |SiLU(g)| may legitimately sit from its threshold and still be decided either way:
    2% (the kernels round g, the sigmoid and a to the activation dtype) plus an absolute floor of
    2e-3 of the mean |SiLU(g)|. Since session 11 the float16 quantized kernels sum their products
    in half2 chains (ChessQX), as MLX's own quantized_matmul accumulates in float16: g then carries
    an absolute error of float16's precision (2^-10 ~ 1e-3) of a typical |g|, so a channel whose
    |SiLU(g)| far below the mean may flip at more than 2% of its own value. The floor was 1e-4
    (float32 sums) before; the first half2 check flipped 0.2-0.5% of channels at a 3% + 1.5e-4
    distance (results/kernel_check_q_half2_run1_session11.txt), a floor of 1e-3 still one channel
    of 14336 (run 2), so the check allows twice that."""
    return 0.02 * mx.maximum(t, 0.0) + 2e-3 * mx.mean(a)


def robust_channel_thresholds(x, wg, s: float) -> mx.array:
    """Per-channel t dropping a random fraction s of channels, each outside decision_margin."""
    a = act_abs(x, wg)[0]
    drop = mx.random.uniform(shape=a.shape) < s
    floor = 3e-3 * mx.mean(a)
    return mx.where(drop, a * 1.03 + floor, mx.maximum(a * 0.97 - floor, 0.0))


def gateup_check(kind: str, x, wg, wu, t) -> dict:
    """Fused gate/up vs the reference. A channel whose |SiLU(g)| lies within rounding distance of
    its threshold (2%) may legitimately be decided the other way (the two paths round g and the
    SiLU at different points); such flips are counted, any other disagreement fails, and the error
    is measured on the channels both decided alike."""
    y = G._launch_gateup(kind, x, G.stack_gate_up(wg, wu), t)
    if isinstance(wg, G.QWeight):
        ref = G.reference_gate_up(x, float32_weight(wg), float32_weight(wu), t).astype(x.dtype)
    else:
        ref = G.reference_gate_up(x, wg, wu, t)
    a = act_abs(x, wg)
    tt = t.astype(mx.float32)
    agree = (y == 0) == (ref == 0)
    near = mx.abs(a - tt) <= decision_margin(a, tt)
    flips = 1.0 - mx.mean(agree.astype(mx.float32)).item()
    bad_flips = mx.sum((~agree) & (~near)).item()
    zero = mx.zeros((), dtype=y.dtype)
    err = rel_err(mx.where(agree, y, zero), mx.where(agree, ref, zero))
    # flip_gap: the largest |a - t| among flipped channels, in units of their decision margin
    gap = mx.max(mx.where(agree, 0.0, mx.abs(a - tt) / decision_margin(a, tt))).item()
    return dict(rel_err=err if bad_flips == 0 and flips < 0.01 else float("nan"), flips=flips, flip_gap=gap,
                zero_pattern_match=flips == 0.0, density=mx.mean((ref != 0).astype(mx.float32)).item())


def check(kind: str, quick: bool, only: list | None = None) -> list[dict]:
    G._POISON = float("nan")
    rows = []
    wtypes = only or (WTYPES[:3] if quick else WTYPES)
    for wtype in wtypes:
        dtype = parse_wtype(wtype)[0]
        for out_dim, in_dim in SHAPES:
            w = make_weight(out_dim, in_dim, wtype, transposed=False)
            wt = make_weight(out_dim, in_dim, wtype, transposed=True)
            base = dict(wtype=wtype, shape=f"{out_dim}x{in_dim}")
            for s in LEVELS_CHECK:
                x = mx.random.normal((1, in_dim)).astype(dtype)
                a = sparse_vec(1, out_dim, s, dtype)
                y = G._launch_spout(kind, x, w, a)
                rows.append(dict(kernel="sparse_output", **base, sparsity=s,
                                 rel_err=rel_err(y, G.reference_gated_sparse_output(x, float32_weight(w), a))))
                rows.append(dict(kernel="sparse_input", **base, sparsity=s,
                                 **spin_check(kind, sparse_vec(1, in_dim, s, dtype), wt)))
                rows.append(dict(kernel="sparse_input_residual", **base, sparsity=s,
                                 **spin_check(kind, sparse_vec(1, in_dim, s, dtype), wt, residual=True)))
                yg = (mx.random.uniform(0.5, 1.5, (out_dim,)).astype(dtype), 1e-5)
                rows.append(dict(kernel="sparse_input_residual_ynorm", **base, sparsity=s,
                                 **spin_check(kind, sparse_vec(1, in_dim, s, dtype), wt, residual=True, ynorm=yg)))
                # fused threshold on a dense x: per channel (float32) and scalar (activation dtype)
                q = mx.sort(mx.abs(x.astype(mx.float32))[0])[min(in_dim - 1, int(s * in_dim))].item()
                tpc = mx.abs(mx.random.normal((in_dim,))) * q
                rows.append(dict(kernel="sparse_input_thr_channel", **base, sparsity=s, **spin_check(kind, x, wt, tpc)))
                rows.append(dict(kernel="sparse_input_thr_scalar", **base, sparsity=s,
                                 **spin_check(kind, x, wt, mx.array([q], dtype=dtype))))
                wu = make_weight(out_dim, in_dim, wtype, transposed=False)
                t_ch = robust_channel_thresholds(x, w, s)
                r = gateup_check(kind, x, w, wu, t_ch)
                if not r["zero_pattern_match"]:
                    r["rel_err"] = float("nan")
                rows.append(dict(kernel="gate_up_channel", **base, sparsity=s, **r))
                av = mx.sort(act_abs(x, w)[0])
                t_sc = mx.array([av[min(out_dim - 1, int(s * out_dim))].item()], dtype=dtype)
                rows.append(dict(kernel="gate_up_scalar", **base, sparsity=s, **gateup_check(kind, x, w, wu, t_sc)))
        # q thresholded, k and v dense: one split launch over [Wq^T | Wk^T | Wv^T]
        nq, nkv = QKV
        wt = make_weight(nq + 2 * nkv, nq, wtype, transposed=True)
        for s in LEVELS_CHECK:
            x = mx.random.normal((1, nq)).astype(dtype)
            q = mx.sort(mx.abs(x.astype(mx.float32))[0])[min(nq - 1, int(s * nq))].item()
            rows.append(dict(kernel="sparse_input_split", wtype=wtype, shape=f"{nq + 2 * nkv}x{nq}", sparsity=s,
                             **spin_check(kind, x, wt, mx.array([q], dtype=dtype), nt=nq)))
            xr, norm, tn = norm_case(nq, s, dtype)
            rows.append(dict(kernel="sparse_input_split_xnorm", wtype=wtype, shape=f"{nq + 2 * nkv}x{nq}", sparsity=s,
                             **spin_check(kind, xr, wt, tn, nt=nq, xnorm=norm)))
            # the same with q's and k's heads rotated in the launch (head size 128: 40 heads of 48)
            rope = rope_case(LEVELS_CHECK.index(s), 128, nq + nkv)
            rows.append(dict(kernel="sparse_input_split_xnorm_rope", wtype=wtype, shape=f"{nq + 2 * nkv}x{nq}",
                             sparsity=s, position=int(np.array(rope.pos)[0]), traditional=rope.traditional,
                             **spin_check(kind, xr, wt, tn, nt=nq, xnorm=norm, rope=rope)))
            rows.append(dict(kernel="sparse_input_split_rope", wtype=wtype, shape=f"{nq + 2 * nkv}x{nq}", sparsity=s,
                             **spin_check(kind, x, wt, mx.array([q], dtype=dtype), nt=nq,
                                          rope=rope_case(LEVELS_CHECK.index(s) + 1, 128, nq + nkv))))
        # small decode batches
        for m in (2, 4, 8):
            out_dim, in_dim = SHAPES[2]
            w = make_weight(out_dim, in_dim, wtype, transposed=False)
            wt = make_weight(out_dim, in_dim, wtype, transposed=True)
            x = mx.random.normal((m, in_dim)).astype(dtype)
            a = sparse_vec(m, out_dim, 0.5, dtype)
            rows.append(dict(kernel=f"sparse_output_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                             rel_err=rel_err(G._launch_spout(kind, x, w, a), G.reference_gated_sparse_output(x, w, a))))
            if G.kernel_supports(kind, x, wt, transposed=True):
                xs = sparse_vec(m, in_dim, 0.5, dtype)
                rows.append(dict(kernel=f"sparse_input_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                                 **spin_check(kind, xs, wt)))
                rows.append(dict(kernel=f"sparse_input_residual_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                                 **spin_check(kind, xs, wt, residual=True)))
                rows.append(dict(kernel=f"sparse_input_thr_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                                 **spin_check(kind, x, wt, mx.array([0.6745], dtype=dtype))))
                xr, norm, tn = norm_case(in_dim, 0.5, dtype, m)
                rows.append(dict(kernel=f"sparse_input_xnorm_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                                 **spin_check(kind, xr, wt, tn, xnorm=norm)))
                yg = (mx.random.uniform(0.5, 1.5, (out_dim,)).astype(dtype), 1e-5)
                rows.append(dict(kernel=f"sparse_input_residual_ynorm_M{m}", wtype=wtype, shape="4096x4096",
                                 sparsity=0.5, **spin_check(kind, xs, wt, residual=True, ynorm=yg)))
                rows.append(dict(kernel=f"sparse_input_rope_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                                 **spin_check(kind, xs, wt, rope=rope_case(m, 128, in_dim))))
            wu = make_weight(out_dim, in_dim, wtype, transposed=False)
            rows.append(dict(kernel=f"gate_up_M{m}", wtype=wtype, shape="4096x4096", sparsity=0.5,
                             **gateup_check(kind, x, w, wu, mx.array([0.1], dtype=dtype))))
    G._POISON = None
    return rows


def timeit(fn_list, reps: int = 15, batch: int = 64) -> float:
    """Median seconds per call. Each timed eval holds ``batch`` independent calls cycling over
    ``fn_list`` (the weight copies), so the fixed cost of one eval (graph launch, sync) is spread
    thin and consecutive calls never hit the same weights in L2."""
    calls = [fn_list[i % len(fn_list)] for i in range(batch)]
    mx.eval([f() for f in calls])
    times = []
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        mx.eval([f() for f in calls])
        mx.synchronize()
        times.append((time.perf_counter() - t0) / batch)
    times.sort()
    return times[len(times) // 2]


def time_op(kind: str, op, x: mx.array, calls: int = 48) -> float:
    """Seconds per ``op(x_i, i)``, call i on weight copy i mod copies: on CUDA the GPU-clock time
    in a chain (gpu_timer), elsewhere host-timed batches of independent calls."""
    if kind == "cuda":
        return gpu_timer.chain_time(op, x, calls=calls)
    return timeit([lambda i=i: op(x, i) for i in range(64)])


def copy_bandwidth(kind: str = "") -> float:
    """Bytes read + written per second by a copy of 1-2 GiB. On CUDA timed on the GPU clock in a
    chain like the kernels (two 1 GiB copies alternating): host-timed, the same copy read 2.60-2.90
    TB/s in one process on session 32's H100 and 2.91-2.93 on the GPU clock, so the kernels'
    fractions moved by 10% with the denominator's noise alone."""
    if kind == "cuda":
        scaled_abs = mx.compile(lambda b, s: mx.abs(b * s))  # one fused pass that reads x_i (orders the chain)
        srcs = [mx.random.normal((1 << 29,)).astype(mx.float16) for _ in range(2)]
        mx.eval(srcs)
        x = mx.ones((1, 8), dtype=mx.float16)
        t = gpu_timer.chain_time(lambda xi, i: scaled_abs(srcs[i % 2], xi[0, :1]), x, calls=12)
        return 2 * srcs[0].nbytes / t
    a = mx.random.normal((1 << 30,)).astype(mx.float16)  # 2 GiB
    mx.eval(a)
    t = timeit([lambda: mx.abs(a)], reps=5, batch=4)
    return 2 * a.nbytes / t


def dense(x, w) -> mx.array:
    if isinstance(w, G.QWeight):
        return mx.quantized_matmul(x, w.w, w.scales, w.biases, transpose=True, group_size=w.group_size, bits=w.bits)
    return x @ w.T


def dense_fn(x, w):
    return lambda: dense(x, w)


def dense_op(ws: list):
    return lambda xi, i: dense(xi, ws[i % len(ws)])


def spin_op(kind: str, wts: list, t=None, spaces: int = 64, nt=None):
    """op(x_i, i) for time_op: the sparse-input kernel on copy i, each call with its own workspace
    (host-timed batches are independent graph nodes that the GPU may run concurrently, so they
    must not share one; in a chain it costs nothing). ``nt``: a split launch."""
    n = wts[0].cols if isinstance(wts[0], G.QWeight) else wts[0].shape[1]
    ws = [G.workspace(n) for _ in range(spaces)]
    return lambda xi, i: G._launch_spin(kind, xi, wts[i % len(wts)], G.zero_threshold(xi.dtype) if t is None else t,
                                        ws[i % spaces], nt=nt)[0]


def bench_gate_up(kind: str, bw: float, only: list[str] | None = None) -> Iterator[dict]:
    """The fused FFN front vs MLX's two dense GEMVs (gate and up, quantized_matmul for 4-bit) on
    the Llama-3-8B FFN shape."""
    out_dim, in_dim = SHAPES[1]
    for wtype in only or ("float16", "bfloat16", "q4g64"):
        dtype = parse_wtype(wtype)[0]
        pairs = list(zip(weight_copies(out_dim, in_dim, wtype, per_call=2), weight_copies(out_dim, in_dim, wtype, per_call=2)))
        copies = len(pairs)
        x = mx.random.normal((1, in_dim)).astype(dtype)
        t_dense = time_op(kind, lambda xi, i: tuple(dense(xi, w) for w in pairs[i % copies]), x)
        stacked = [G.stack_gate_up(g, u) for g, u in pairs]  # the kernel's layout, as the layers store it
        mx.eval([a for w in stacked for a in arrays(w)])
        for s in LEVELS_TIME:
            ts = [robust_channel_thresholds(x, g, s) for g, _ in pairs]
            mx.eval(ts)
            t = time_op(kind, lambda xi, i: G._launch_gateup(kind, xi, stacked[i % copies], ts[i % copies]), x)
            dens = mx.mean((G.reference_gate_up(x, *pairs[0], ts[0]) != 0).astype(mx.float32)).item()
            read = pairs[0][0].nbytes * (1 + dens)
            yield dict(kernel="gate_up", wtype=wtype, shape=f"2x{out_dim}x{in_dim}", sparsity=s, us=t * 1e6,
                       dense_us=t_dense * 1e6, speedup=t_dense / t, bytes_read=read, bw_fraction=(read / t) / bw)


def bench_qkv(kind: str, bw: float, wtypes: list[str]) -> Iterator[dict]:
    """The attention head's products under CHESS+attention on the Llama-3-8B shapes: one split
    launch over ``[Wq^T | Wk^T | Wv^T]`` (q's input thresholded) against q's own sparse-input
    launch followed by the dense ``[Wk; Wv]`` product, and against the dense ``[Wq; Wk; Wv]``."""
    nq, nkv = QKV
    for wtype in wtypes:
        dtype = parse_wtype(wtype)[0]
        n = nq + 2 * nkv
        stacked = weight_copies(n, nq, wtype, transposed=True)  # the split launch's layout
        qs = weight_copies(nq, nq, wtype, transposed=True)
        kvs = weight_copies(2 * nkv, nq, wtype)
        x = mx.random.normal((1, nq)).astype(dtype)
        t_dense = time_op(kind, dense_op(weight_copies(n, nq, wtype)), x)
        for s in LEVELS_TIME:
            t = mx.array([mx.sort(mx.abs(x.astype(mx.float32))[0])[int(s * nq)].item()], dtype=dtype)
            dens = mx.mean((G.threshold(x, t) != 0).astype(mx.float32)).item()
            t_split = time_op(kind, spin_op(kind, stacked, t, nt=nq), x)
            q_op, kv_op = spin_op(kind, qs, t), dense_op(kvs)
            t_two = time_op(kind, lambda xi, i: (q_op(xi, i), kv_op(xi, i)), x)
            read = dens * qs[0].nbytes + kvs[0].nbytes
            yield dict(kernel="qkv_split", wtype=wtype, shape=f"{n}x{nq}", sparsity=s, us=t_split * 1e6,
                       dense_us=t_dense * 1e6, speedup=t_dense / t_split, two_launch_us=t_two * 1e6,
                       bytes_read=read, bw_fraction=(read / t_split) / bw)


def equal_bytes_dense(kind: str, out_dim: int, in_dim: int, wtype: str, dens: float, axis: int) -> float:
    """Seconds of MLX's own dense product (``matmul`` / ``quantized_matmul``) over a weight that
    keeps ``dens`` of W's rows (``axis`` 0: what sparse-output reads) or of its columns (1: what
    sparse-input reads), rounded to 64: the time a launch of the library needs to read those
    bytes. Why: the bandwidth target counts a short read against the copy bandwidth of a 2 GiB
    copy; this floor shows what part of the gap every launch of that many bytes pays."""
    keep = max(64, round(dens * (out_dim if axis == 0 else in_dim) / 64) * 64)
    shape = (keep, in_dim) if axis == 0 else (out_dim, keep)
    x = mx.random.normal((1, shape[1])).astype(parse_wtype(wtype)[0])
    return time_op(kind, dense_op(weight_copies(*shape, wtype)), x)


def bench(kind: str, bw: float, wtypes: list[str]) -> Iterator[dict]:
    for wtype in wtypes:
        dtype = parse_wtype(wtype)[0]
        for out_dim, in_dim in SHAPES:
            ws = weight_copies(out_dim, in_dim, wtype)
            wts = weight_copies(out_dim, in_dim, wtype, transposed=True)
            copies = len(ws)
            wbytes = ws[0].nbytes
            x = mx.random.normal((1, in_dim)).astype(dtype)
            t_dense = time_op(kind, dense_op(ws), x)
            for s in LEVELS_TIME:
                a = sparse_vec(1, out_dim, s, dtype)
                xs = sparse_vec(1, in_dim, s, dtype)
                dens_out = mx.mean((a != 0).astype(mx.float32)).item()
                dens_in = mx.mean((xs != 0).astype(mx.float32)).item()
                t_out = time_op(kind, lambda xi, i: G._launch_spout(kind, xi, ws[i % copies], a), x)
                t_in = time_op(kind, spin_op(kind, wts), xs)
                for axis, (name, t, dens) in enumerate((("sparse_output", t_out, dens_out), ("sparse_input", t_in, dens_in))):
                    read = dens * wbytes
                    row = dict(kernel=name, wtype=wtype, shape=f"{out_dim}x{in_dim}", sparsity=s,
                               us=t * 1e6, dense_us=t_dense * 1e6, speedup=t_dense / t,
                               bytes_read=read, bw_fraction=(read / t) / bw)
                    if s > 0:  # the same bytes read by MLX's dense product
                        t_eq = equal_bytes_dense(kind, out_dim, in_dim, wtype, dens, axis)
                        row.update(equal_bytes_dense_us=t_eq * 1e6, vs_equal_bytes=t_eq / t,
                                   equal_bytes_bw_fraction=(read / t_eq) / bw)
                    yield row
        # crossover in the decode batch
        out_dim, in_dim = SHAPES[0]
        ws = [make_weight(out_dim, in_dim, wtype, transposed=False) for _ in range(2)]
        wts = [make_weight(out_dim, in_dim, wtype, transposed=True) for _ in range(2)]
        mx.eval([a for w in ws + wts for a in arrays(w)])
        for m in (1, 2, 4, 8):
            x = mx.random.normal((m, in_dim)).astype(dtype)
            a = sparse_vec(m, out_dim, 0.5, dtype)
            xs = sparse_vec(m, in_dim, 0.5, dtype)
            t_dense = time_op(kind, dense_op(ws), x)
            t_out = time_op(kind, lambda xi, i: G._launch_spout(kind, xi, ws[i % 2], a), x)
            row = dict(kernel="crossover", wtype=wtype, shape=f"{out_dim}x{in_dim}", M=m, dense_us=t_dense * 1e6,
                       sparse_output_us=t_out * 1e6)
            if G.kernel_supports(kind, xs, wts[0], transposed=True):
                row["sparse_input_us"] = time_op(kind, spin_op(kind, wts), xs) * 1e6
            yield row


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--skip-bench", action="store_true")
    ap.add_argument("--skip-check", action="store_true", help="timing only (kernels unchanged since their last check)")
    ap.add_argument("--wtypes", help="comma-separated weight types to check and time, e.g. q4g64 (default: all; "
                    "timed with --quick: float16, q4g64)")
    ap.add_argument("--benches", default="gemv,gate_up,qkv", help="which timings: some of gemv, gate_up, qkv")
    args = ap.parse_args()
    benches = args.benches.split(",")
    if any(b not in ("gemv", "gate_up", "qkv") for b in benches):
        ap.error("--benches takes some of gemv, gate_up, qkv")
    only = args.wtypes.split(",") if args.wtypes else None
    if only and any(t not in WTYPES for t in only):
        ap.error(f"--wtypes takes some of {', '.join(WTYPES)}")
    kind = G.backend()
    if kind == "reference":
        print("no GPU backend (Metal or CUDA): nothing to check", file=sys.stderr)
        return 2
    mx.random.seed(0)
    t0 = time.time()
    checks = [] if args.skip_check else check(kind, args.quick, only)
    bad = [r for r in checks if not (r["rel_err"] < 1e-2) or r.get("ws_reset") is False
           or r.get("zero_pattern_match") is False and r["kernel"] == "gate_up_channel"]
    if args.skip_check:
        print("correctness: not checked (--skip-check)")
    else:
        print(f"correctness: {len(checks) - len(bad)}/{len(checks)} passed (rel err < 1e-2, NaN-poisoned outputs) "
              f"in {time.time() - t0:.0f}s; worst {max((r['rel_err'] for r in checks), default=float('nan')):.2e}")
    for r in bad:
        print("  FAIL", r)
    result = {"date": time.strftime("%Y-%m-%d"), "backend": kind, "mlx": mx.__version__,
              "device": mx.device_info() if hasattr(mx, "device_info") else platform.node(),
              "checks": checks}
    if not args.skip_bench:
        bw = copy_bandwidth(kind)
        print(f"copy bandwidth (read+write): {bw / 1e12:.2f} TB/s")
        rows: list[dict] = []
        result.update(copy_bw=bw, bench=rows)
        print("eqB: MLX's dense product over the same bytes (us, % of copy bandwidth); x eqB: its time / the kernel's")
        print(f"{'kernel':<14}{'weights':<9}{'shape':<12}{'s':>5}{'us':>9}{'dense':>9}{'x':>6}{'bw%':>6}"
              f"{'eqB':>8}{'eqB%':>6}{'x eqB':>7}")
        timed = only or (["float16", "q4g64"] if args.quick else WTYPES)  # gate_up keeps its own three
        timings = ((bench(kind, bw, timed) if "gemv" in benches else iter(()),
                    bench_gate_up(kind, bw, only) if "gate_up" in benches else iter(()),
                    bench_qkv(kind, bw, timed) if "qkv" in benches else iter(())))
        for r in (r for part in timings for r in part):
            # each row as it is timed (and the JSON so far): a call cut short by its time limit
            # still leaves the rows it finished (session 28 lost a whole table to one)
            rows.append(r)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=1, default=str))
            if r["kernel"] in ("crossover", "qkv_split"):
                continue
            eq = (f"{r['equal_bytes_dense_us']:>8.1f}{100 * r['equal_bytes_bw_fraction']:>6.0f}{r['vs_equal_bytes']:>7.2f}"
                  if "equal_bytes_dense_us" in r else "")
            print(f"{r['kernel']:<14}{r['wtype']:<9}{r['shape']:<12}{r['sparsity']:>5}{r['us']:>9.1f}"
                  f"{r['dense_us']:>9.1f}{r['speedup']:>6.2f}{100 * r['bw_fraction']:>6.0f}{eq}", flush=True)
        print("q, k, v under CHESS+attention: one split launch vs q's launch + the [Wk; Wv] product:")
        for r in rows:
            if r["kernel"] == "qkv_split":
                print(f"  {r['wtype']:<9} s={r['sparsity']}: split {r['us']:.1f} us, two launches "
                      f"{r['two_launch_us']:.1f} us, dense qkv {r['dense_us']:.1f} us")
        print("crossover (50% per token, union grows with M):")
        for r in rows:
            if r["kernel"] == "crossover":
                print(f"  {r['wtype']:<9} M={r['M']}: dense {r['dense_us']:.1f} us, sparse-out {r['sparse_output_us']:.1f} us"
                      + (f", sparse-in {r['sparse_input_us']:.1f} us" if "sparse_input_us" in r else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1, default=str))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
