"""Seconds-long GPU smoke test of the sparse-input and fused gate/up kernels (run before kernels.py),
and of the compiled one-token decode paths against the op-by-op kernel path on a tiny random model,
float16 and 4-bit (the quantized paths switched on for the run)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx.core as mx  # noqa: E402

import kernels as K  # noqa: E402


def decode(model, tokens):
    """Logits of 4 teacher-forced one-token steps after an 8-token prefill."""
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(tokens[None, :8], cache=cache)
    return mx.concatenate([model(tokens[None, i:i + 1], cache=cache)[:, -1].astype(mx.float32)
                           for i in range(8, 12)])


def tiny_case(bits=None):
    """The tiny random model (float16, or quantized to ``bits``), thresholds calibrated at 50% on
    random tokens, and 12 teacher-forced tokens: the same every call."""
    from chess_mlx import calibrate
    from chess_mlx.bench import random_model

    model = random_model("tiny", dtype=mx.float16, bits=bits)
    th = calibrate(model, mx.random.randint(0, 512, (2, 64), key=mx.random.key(1)), [0.5])
    return model, th, mx.random.randint(0, 512, (12,), key=mx.random.key(2))


def repeat_check(reps: int = 3) -> None:
    """Run-to-run stability on the tiny float16 model: each path (op by op, compiled) decoded
    ``reps`` times against the reference path. A path whose runs disagree with each other is
    nondeterministic (a race); one that is stable but far from the reference flips decisions."""
    from chess_mlx import decode_paths, set_method
    from chess_mlx import sparse_gemv as G

    model, th, tokens = tiny_case()
    for method in ("chess-attn", "teal"):
        set_method(model, method, th, 0.5)
        G.force_reference(True)
        ref = decode(model, tokens)
        G.force_reference(False)
        scale = float(mx.max(mx.abs(ref)))
        for comp in (False, True):
            decode_paths.enable(comp)
            d = [float(mx.max(mx.abs(decode(model, tokens) - ref))) / scale for _ in range(reps)]
            print(f"repeat {method} {'compiled' if comp else 'op-by-op'} vs reference: "
                  + " ".join(f"{v:.2e}" for v in d), flush=True)
        decode_paths.enable(True)
    set_method(model, "dense")


def decode_paths_check() -> None:
    """Logits of 4 teacher-forced decode steps, compiled paths vs op by op, per method."""
    from chess_mlx import decode_paths, linear_ops, set_method

    for bits in (None, 4):
        linear_ops.QUANTIZED_KERNELS = bits is not None
        model, th, tokens = tiny_case(bits)
        for method in ("chess", "chess-attn", "teal"):
            set_method(model, method, th, 0.5)
            decode_paths.enable(False)
            want = decode(model, tokens)
            decode_paths.enable(True)
            got = decode(model, tokens)
            rel = float(mx.max(mx.abs(got - want)) / mx.max(mx.abs(want)))
            same = float(mx.mean(mx.argmax(got, -1) == mx.argmax(want, -1)))
            print(f"decode paths {bits or 16}-bit {method}: rel diff {rel:.2e}, same argmax {same:.2f}", flush=True)
        set_method(model, "dense")
        if bits is None:
            teal_module_check(model, th)
    linear_ops.QUANTIZED_KERNELS = False


def teal_module_check(model, th) -> None:
    """Layer 0's TEAL modules on one fixed input, compiled vs op by op vs the reference path. Their
    inputs are identical, so the only admissible difference is rounding, plus (MLP) a down-input
    channel whose |h| lies at its threshold; with the down threshold at 0 no decision can flip."""
    from chess_mlx import decode_paths, set_method
    from chess_mlx import sparse_gemv as G
    from chess_mlx.sparse_layers import sparse_modules

    set_method(model, "teal", th, 0.5)
    projs, mlp = sparse_modules(model.model.layers[0])
    x = mx.random.normal((1, 1, mlp.gate_proj.weight.shape[1]), key=mx.random.key(3)).astype(mx.float16)
    for label, mod, down in [(f"attn {p}", m, None) for p, m in projs.items()] + [("mlp", mlp, None), ("mlp t_down=0", mlp, 0.0)]:
        if down is not None:
            mod.ctl.down = down
            mod.ctl.plans.clear()
        xin = x if label[-1] != "o" else mx.random.normal((1, 1, mod.weight.shape[1]), key=mx.random.key(4)).astype(mx.float16)
        outs = {}
        for name, ref, comp in (("op", False, False), ("compiled", False, True), ("reference", True, False)):
            G.force_reference(ref)
            decode_paths.enable(comp)
            outs[name] = mod(xin).astype(mx.float32)
        G.force_reference(False)
        decode_paths.enable(True)
        scale = float(mx.max(mx.abs(outs["reference"])))
        d = {k: float(mx.max(mx.abs(outs[k] - outs["reference"]))) / scale for k in ("op", "compiled")}
        print(f"teal module {label}: op vs reference {d['op']:.2e}, compiled vs reference {d['compiled']:.2e}",
              flush=True)
    set_method(model, "dense")


if "--repeat" in sys.argv:
    repeat_check()
    sys.exit(0)
if "--decode-only" in sys.argv:
    decode_paths_check()
    sys.exit(0)
mx.random.seed(0)
t0 = time.time()
for wtype in ("float16", "q4g64"):
    w, wt, x, a, xs = K.random_case(wtype, 4096, 14336, 0.5)
    print(wtype, "spin", K.spin_check("cuda", xs, wt), flush=True)
    print(wtype, "spin thr", K.spin_check("cuda", x, wt, mx.array([0.6], dtype=mx.float16)), flush=True)
w, wt, x, a, xs = K.random_case("float16", 14336, 4096, 0.5)
wu = K.make_weight(14336, 4096, "float16", False)
print("gateup", K.gateup_check("cuda", x, w, wu, K.robust_channel_thresholds(x, w, 0.5)), flush=True)
decode_paths_check()
print("smoke done in %.1fs" % (time.time() - t0), flush=True)
