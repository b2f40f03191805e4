"""Sparse drop-in modules for mlx-lm Llama-style blocks, and the switch between methods.

``sparsify(model)`` swaps each block's MLP for a ``SparseMLP`` and each attention projection for a
``SparseInputLinear``, and gives attention and block their one-token decode paths
(``fused_attention``, ``block_step``). Parameter names stay exactly as they were, so checkpoints,
fingerprints and mlx-lm's KV cache and ``stream_generate`` are untouched. ``set_method`` then
picks dense, CATS, CHESS, CHESS+attention or TEAL at any time, without reloading weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import ChessError
from . import block_step
from . import decode_paths as D
from . import fused_attention
from . import sparse_gemv as G
from .linear_ops import (WORKSPACES, compiled_path_ok, dense_linear, gated_sparse_output_linear, kernel_workspace,
                         sparse_input_linear, stacked_transposed_weight, transposed_weight, weight_nbytes)
from .methods import ATTN_PROJS, CATS, CHESS, CHESS_ATTN, DENSE, PROJS, TEAL, check_method
from .model_io import model_layers
from .row_store import RowStore, fusable
from .stats import SparsityRecorder, WeightBytes
from .switches import env_switch

Collector = Callable[[str, mx.array], None]
_MISSING = object()

split_enabled, enable_split = env_switch(
    "CHESS_MLX_QKV_LAUNCH", "q, k and v as one sparse-input launch under CHESS+attention (off: q's launch, then "
    "the [Wk; Wv] product)")


class _Control:
    """Plain (non-parameter) state of a sparse module: thresholds, recorder, collector."""

    def __init__(self, layer: int, recorder: SparsityRecorder):
        self.layer = layer
        self.recorder = recorder
        self.threshold = None  # SparseInputLinear: None (dense) or a scalar
        self.mode = DENSE  # SparseMLP: dense | act | teal
        self.act = None  # |SiLU(gate)| threshold: scalar (CATS) or per-channel vector (CHESS)
        self.inp = None  # TEAL: gate/up input threshold
        self.down = None  # TEAL: down input threshold
        self.collector: Optional[Collector] = None
        self._arrays: dict = {}
        self.store = RowStore()  # SparseMLP: the gate and up rows stored as one block
        # One-token decode plans, per (dtype, kernel backend, compiled paths on, stream): the
        # compiled path with its arguments bound, or None where it does not apply. Decode is bound by
        # host time per token, so the checks and lookups run once, not at every layer and token.
        # set_method clears them, so weights loaded into a sparsified model take effect at the next
        # set_method (the kernels' transposed weights and the fused attention rows follow then too).
        self.plans: dict = {}

    def plan(self, x: mx.array, make: Callable[[mx.array], object], tag: str = ""):
        """The cached plan for a one-token step on ``x`` (None for several tokens: prefill);
        ``tag`` tells apart several plans of one module (a projection's with the residual add)."""
        if x.size != x.shape[-1]:
            return None
        key = (tag, x.dtype, G.backend(), D.enabled(), repr(mx.default_stream(mx.default_device())))
        p = self.plans.get(key, _MISSING)
        if p is _MISSING:
            p = self.plans[key] = make(x)
        return p

    def arr(self, name: str, dtype) -> mx.array:
        """A threshold as an array for the compiled paths: a scalar in the activation dtype (as the
        reference path compares a Python float), padded as ``sparse_gemv.scalar_threshold`` so the
        kernels never read it from MLX's small-buffer pool; a per-channel vector as calibrated
        (float32)."""
        v = getattr(self, name)
        if isinstance(v, mx.array):
            return v
        key = (name, dtype, v)
        a = self._arrays.get(key)
        if a is None:
            if len(self._arrays) > 8:
                self._arrays.clear()
            a = self._arrays[key] = G.scalar_threshold(v, dtype)
            mx.eval(a)  # lazy, it would belong to this thread's stream; a decode may run on another
        return a


def _threshold(x: mx.array, t) -> tuple[mx.array, mx.array]:
    keep = mx.abs(x) >= t
    return mx.where(keep, x, mx.zeros((), dtype=x.dtype)), keep


class SparseInputLinear(nn.Module):
    """An attention projection whose input may be thresholded (|x| < t -> 0) before the product."""

    def __init__(self, base: nn.Module, layer: int, proj: str, recorder: SparsityRecorder):
        super().__init__()
        for key in ("weight", "bias", "scales", "biases"):
            if key in base:
                self[key] = base[key]
        if "scales" in base:
            self.group_size, self.bits = base.group_size, base.bits
            self.mode = getattr(base, "mode", "affine")
        self.proj = proj
        self.ctl = _Control(layer, recorder)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.ctl
        if c.collector is not None:
            c.collector(self.proj, x)
        if c.threshold is None:
            return dense_linear(x, self)
        bound = c.plan(x, self._plan)
        if bound is not None:
            return self._recorded(*bound(x))
        xs, keep = _threshold(x, c.threshold)
        c.recorder.record(c.layer, self.proj, keep)
        return sparse_input_linear(xs, self)

    def _recorded(self, y: mx.array, density: mx.array) -> mx.array:
        """``y``, with its launch's input density recorded as this projection's."""
        self.ctl.recorder.record_density(self.ctl.layer, self.proj, density, 1)
        return y

    def with_dense(self, x: mx.array, others: list[nn.Module]) -> Optional[mx.array]:
        """``[self(x) | other(x) ...]`` for the dense projections ``others`` on the same input, as
        one launch (``split_plan``), the density recorded as this projection's; None where there
        is no such path (the caller takes the separate products)."""
        bound = self.split_plan(x, others)
        return None if bound is None else self._recorded(*bound(x))

    def _plan(self, x: mx.array, residual: bool = False, ynorm: Optional[G.Norm] = None):
        if not compiled_path_ok(x, self):
            return None
        return D.bind_spin(self.ctl.arr("threshold", x.dtype), transposed_weight(self), kernel_workspace(self, x),
                           residual=residual, ynorm=ynorm)

    def residual_plan(self, x: mx.array, ynorm: Optional[G.Norm] = None) -> Optional[D.Bound]:
        """The one-token path called as ``bound(x, r)``: ``(r + self(x), density)``, the add inside
        the kernel (the compiled block's attention residual, for o); None where ``self(x)`` has no
        compiled path. It shares the workspace with the plain path, so their launches stay ordered.
        ``ynorm`` = (weight, eps) of the RMSNorm that follows (the post-attention norm): the kernel
        applies it too, and the bound path gives ``(r + self(x), density, norm(r + self(x)))``."""
        if ynorm is None:
            return self.ctl.plan(x, partial(self._plan, residual=True), "residual")
        return self.ctl.plan(x, partial(self._plan, residual=True, ynorm=ynorm), "residual_ynorm")

    def split_plan(self, x: mx.array, others: list[nn.Module], xnorm: Optional[G.Norm] = None,
                   rope: Optional[G.Rope] = None) -> Optional[D.Bound]:
        """The one-token path of this thresholded projection and the dense projections ``others`` on
        the same input, as one launch over their W^T side by side (q with k and v under
        CHESS+attention, ``fused_attention``): ``bound(x)`` -> ``([self(x) | other(x) ...],
        density)``. None where there is none: no compiled path, this projection's outputs do not
        end a kernel tile, or ``CHESS_MLX_QKV_LAUNCH=0`` (read when the plan is made, so
        ``enable_split`` takes effect at the next ``set_method``). The stacked W^T it builds stays
        with the projections, like their own transposed copies, until new weights replace it.
        ``xnorm`` = (weight, eps): x is the input of that RMSNorm (the block's input norm), which
        the kernel applies before the threshold. ``rope`` (``fused_attention.rope_spec``): the
        launch rotates the q and k heads too, and is called as ``bound(x, pos)``; None where the
        kernel tiles do not fit that rope (``sparse_gemv.rope_fits``)."""
        key = "split" + ("_xnorm" if xnorm is not None else "") + ("_rope" if rope is not None else "")
        return self.ctl.plan(x, partial(self._split_plan, others, xnorm, rope), key)

    def _split_plan(self, others: list[nn.Module], xnorm: Optional[G.Norm], rope: Optional[G.Rope],
                    x: mx.array) -> Optional[D.Bound]:
        mods = [self, *others]
        if not split_enabled() or self.ctl.threshold is None or not compiled_path_ok(x, *mods) or not fusable(mods):
            return None
        nt = self["weight"].shape[0]
        if not G.split_fits(1, nt, self.bits if "scales" in self else None, G.backend()):
            return None
        bits = self.bits if "scales" in self else None
        n = sum(m["weight"].shape[0] for m in mods)
        if rope is not None and not G.rope_fits(rope, n, G.spin_tile(G.spin_words(1, bits, G.backend()) if bits else 0,
                                                                     bits)):
            return None
        wt = stacked_transposed_weight(mods)
        return D.bind_spin(self.ctl.arr("threshold", x.dtype), wt, kernel_workspace(self, x, n), nt=nt, xnorm=xnorm,
                           rope=rope)


class SparseMLP(nn.Module):
    """SwiGLU FFN, down(SiLU(gate(x)) * up(x)), with CATS/CHESS/TEAL sparsification."""

    def __init__(self, mlp: nn.Module, layer: int, recorder: SparsityRecorder):
        super().__init__()
        self.gate_proj = mlp.gate_proj
        self.up_proj = mlp.up_proj
        self.down_proj = mlp.down_proj
        self.ctl = _Control(layer, recorder)

    def __call__(self, x: mx.array) -> mx.array:
        c = self.ctl
        if c.collector is not None:
            return self._collect(x, c.collector)
        if c.mode == DENSE:
            a = nn.silu(dense_linear(x, self.gate_proj))
            return dense_linear(a * dense_linear(x, self.up_proj), self.down_proj)
        plan = c.plan(x, self._plan)
        if plan is not None:
            return self._run(plan.bound, plan.recorded, x)
        if c.mode == "act":
            a, keep = _threshold(nn.silu(dense_linear(x, self.gate_proj)), c.act)
            c.recorder.record(c.layer, ("up", "down"), keep)
            return sparse_input_linear(gated_sparse_output_linear(x, self.up_proj, a), self.down_proj)
        # TEAL: threshold the inputs of gate/up and of down.
        xs, keep_in = _threshold(x, c.inp)
        c.recorder.record(c.layer, ("gate", "up"), keep_in)
        h = nn.silu(sparse_input_linear(xs, self.gate_proj)) * sparse_input_linear(xs, self.up_proj)
        hs, keep_d = _threshold(h, c.down)
        c.recorder.record(c.layer, "down", keep_d)
        return sparse_input_linear(hs, self.down_proj)

    def add_to(self, r: mx.array, x: mx.array) -> mx.array:
        """``r + self(x)``: the block's last residual. Under CATS/CHESS on a GPU the add runs inside
        down's kernel (one graph node fewer per layer and token; ``block_step`` calls this)."""
        c = self.ctl
        if c.collector is None and c.mode == "act":
            plan = c.plan(x, self._plan)
            if plan is not None and plan.residual is not None and r.shape == x.shape and r.dtype == x.dtype:
                return self._run(plan.residual, plan.recorded, x, r)
        return r + self(x)

    def _run(self, bound: D.Bound, recorded: list, *xs: mx.array) -> mx.array:
        y, *dens = bound(*xs)
        for projs, d in zip(recorded, dens):
            self.ctl.recorder.record_density(self.ctl.layer, projs, d, 1)
        return y

    def _plan(self, x: mx.array):
        """The compiled one-token paths of the current mode, with their arguments (or None)."""
        c, g, u, d = self.ctl, self.gate_proj, self.up_proj, self.down_proj
        if not compiled_path_ok(x, g, u, d):
            return None
        if c.mode == "act":
            if not fusable([g, u]):
                return None
            args = (self._gate_up_rows(), c.arr("act", x.dtype), transposed_weight(d), kernel_workspace(d, x), x.dtype)
            return _MlpPlan(D.bind_act_mlp(*args), [("up", "down")], D.bind_act_mlp(*args, residual=True))
        return _MlpPlan(D.bind_teal_mlp(c.arr("inp", x.dtype), transposed_weight(g), transposed_weight(u),
                                        c.arr("down", x.dtype), transposed_weight(d), kernel_workspace(g, x),
                                        kernel_workspace(u, x), kernel_workspace(d, x)), [("gate", "up"), "down"], None)

    def _gate_up_rows(self):
        """The gate and up rows as the gate_up kernel reads them (``sparse_gemv.stack_gate_up``),
        stored once as one block whose views the two projections keep (no extra memory). Stored
        again if weights were loaded since (they take effect at the next set_method)."""
        g, u = self.gate_proj, self.up_proj
        rows = self.ctl.store.rows_of([g, u], pack_sb="scales" in g)
        if "sb" in rows:
            return G.QWeight.from_packed(rows["weight"], rows["sb"], g.bits, g.group_size)
        return rows["weight"]

    def _collect(self, x: mx.array, collect: Collector) -> mx.array:
        a = nn.silu(dense_linear(x, self.gate_proj))
        u = dense_linear(x, self.up_proj)
        h = a * u
        collect("mlp_in", x)
        collect("act", a)
        collect("up", u)
        collect("down_in", h)
        return dense_linear(h, self.down_proj)


@dataclass
class _MlpPlan:
    """A SparseMLP's one-token paths: ``bound(x)``, and ``residual(x, r)`` (None under TEAL)."""

    bound: D.Bound
    recorded: list
    residual: Optional[D.Bound]


@dataclass
class ChessState:
    """What ``sparsify`` attaches to a model: the recorder, byte sizes, and the active method."""

    recorder: SparsityRecorder
    weight_bytes: WeightBytes
    method: str = DENSE
    sparsity: float | None = None
    warm: set = field(default_factory=set)  # methods (with the decode paths on) that have run: generate.warm_up
    thresholds: object = None  # what set_method took the current level from (None for dense)


def sparsify(model: nn.Module) -> ChessState:
    """Install the sparse modules once (idempotent) and return the model's ``ChessState``."""
    state = getattr(model, "_chess", None)
    if state is not None:
        return state
    layers = model_layers(model)
    recorder = SparsityRecorder(len(layers))
    recorder.enabled = False
    per_proj = np.zeros((len(layers), len(PROJS)), dtype=np.float64)
    for i, layer in enumerate(layers):
        attn, mlp = layer.self_attn, layer.mlp
        for p in ("gate", "up", "down"):
            if not hasattr(mlp, f"{p}_proj"):
                raise ChessError("the model's MLP is not a gate/up/down SwiGLU block")
        for p in ATTN_PROJS:
            base = getattr(attn, f"{p}_proj")
            setattr(attn, f"{p}_proj", SparseInputLinear(base, i, p, recorder))
        layer.mlp = SparseMLP(mlp, i, recorder)
        fused_attention.install(attn)
        block_step.install(layer)
        for j, p in enumerate(PROJS):
            holder = attn if p in ATTN_PROJS else layer.mlp
            per_proj[i, j] = weight_nbytes(getattr(holder, f"{p}_proj"))
    head = model["lm_head"] if "lm_head" in model else model.model.embed_tokens
    state = ChessState(recorder, WeightBytes(per_proj, weight_nbytes(head)))
    model._chess = state
    return state


def settle(model: nn.Module) -> None:
    """Evaluate the lazy state the sparse modules carry from one call to the next (each sparse-input
    call site's ordering token, and its scratch if a launch made it), so that a decode evaluated
    on another thread (``pipelined``) never meets an array of this thread's stream."""
    tokens = [a for m in model.modules() for name in WORKSPACES
              if (ws := getattr(m, name, None)) is not None for a in (ws.last, ws.partial)]
    if tokens:
        mx.eval(tokens)


def sparse_modules(layer: nn.Module) -> tuple[dict[str, SparseInputLinear], SparseMLP]:
    attn = layer.self_attn
    return {p: getattr(attn, f"{p}_proj") for p in ATTN_PROJS}, layer.mlp


def set_method(model: nn.Module, method: str, thresholds=None, sparsity: float | None = None) -> ChessState:
    """Switch every block to ``method`` at the calibrated level ``sparsity`` (no weight reload)."""
    check_method(method)
    state = sparsify(model)
    level = None
    if method != DENSE:
        if thresholds is None:
            raise ChessError(f"method {method!r} needs calibrated thresholds; run 'chess-mlx calibrate' first")
        level = thresholds.level(sparsity)
    for i, layer in enumerate(model_layers(model)):
        projs, mlp = sparse_modules(layer)
        for p, mod in projs.items():
            t = None
            if method == CHESS_ATTN and p in ("q", "o"):
                t = level[f"attn_{'in' if p == 'q' else 'out'}"][i]
            elif method == TEAL:
                t = level["attn_out" if p == "o" else "attn_in"][i]
            mod.ctl.threshold = None if t is None else float(t)
            mod.ctl.plans.clear()
        fused_attention.reset(layer.self_attn)
        block_step.reset(layer)
        c = mlp.ctl
        c.mode, c.act, c.inp, c.down = DENSE, None, None, None
        c.plans.clear()
        if method == CATS:
            c.mode, c.act = "act", float(level["cats"][i])
        elif method in (CHESS, CHESS_ATTN):
            c.mode, c.act = "act", mx.array(level["chess"][i].astype(np.float32))
        elif method == TEAL:
            c.mode, c.inp, c.down = "teal", float(level["mlp_in"][i]), float(level["down_in"][i])
    state.method, state.sparsity = method, (None if method == DENSE else thresholds.match(sparsity))
    state.thresholds = None if method == DENSE else thresholds
    return state


def ensure_method(model: nn.Module, method: str, thresholds=None, sparsity: float | None = None) -> ChessState:
    """``set_method`` unless the model already runs ``method`` at that level of those thresholds.
    Why: ``set_method`` drops every compiled one-token trace, which the next token then traces
    again; a chat session puts its method in place at every reply (compare mode shares the model)."""
    state = sparsify(model)
    if state.method == method and (method == DENSE or (state.thresholds is thresholds
                                                       and state.sparsity == thresholds.match(sparsity))):
        return state
    return set_method(model, method, thresholds, sparsity)
