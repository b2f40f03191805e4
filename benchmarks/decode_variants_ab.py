"""A/B/C of the one-token decode variants of a block, in one process.

    python benchmarks/decode_variants_ab.py [--quantize 4] [--methods dense,chess,chess-attn] [--tokens 128] [--runs 3]
                                       [--variants mlx_lm,fused,block]

Variants: ``mlx_lm`` (mlx-lm's attention and block), ``fused`` (chess_mlx/fused_attention.py),
``block`` (fused attention plus the compiled one-token block, chess_mlx/block_step.py), and
``fused_nosplit`` / ``block_nosplit``: the same with CHESS+attention's q, k and v as q's own launch
plus the ``[Wk; Wv]`` product instead of one split launch (``CHESS_MLX_QKV_LAUNCH=0``), and
``block_nonorm``: the compiled block with the RMSNorms in launches of their own instead of inside
CHESS+attention's q and o launches (``CHESS_MLX_NORM_FUSE=0``).
Per method, the variants interleaved run by run:
  - graph nodes of one decode token, by kind (``mx.export_to_dot``);
  - the synchronous host split of a token (build / encode / wait, as ``host_probe.py``);
  - tokens/s of ``chess_mlx.pipelined.generate_step`` (two threads, as ``chess-mlx bench``), and
    whether its greedy tokens equal those with the fusion off.
Summary: medians, and ratios paired run by run against dense with the fusion off (mlx-lm's
attention, the baseline of every earlier session) and on.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

import mlx.core as mx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chess_mlx import block_step, fused_attention  # noqa: E402
from chess_mlx import sparse_layers  # noqa: E402
from chess_mlx.sparse_layers import set_method  # noqa: E402
from host_probe import prefilled, split_times  # noqa: E402
from pipeline_probe import add_model_args, calibrated_model, library  # noqa: E402


def node_counts(model, vocab: int) -> dict:
    """Nodes of one decode token's graph by primitive (views included: they cost encoding too)."""
    cache, tok = prefilled(model, vocab)
    out = mx.argmax(model(tok[None], cache=cache)[:, -1], axis=-1)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "step.dot"
        mx.export_to_dot(str(path), out)
        labels = re.findall(r'label\s*=\s*"([A-Za-z]+)', path.read_text())
    mx.eval(out)
    c = collections.Counter(labels)
    return {"total": sum(c.values()), **dict(c.most_common(12))}


def main() -> None:
    ap = argparse.ArgumentParser()
    add_model_args(ap, "dense,chess,chess-attn")
    ap.add_argument("--variants", default="mlx_lm,fused,block")
    args = ap.parse_args()
    model, th, vocab, prompt = calibrated_model(args)
    methods = args.methods.split(",")
    variants = args.variants.split(",")
    switches = {"mlx_lm": (False, False, True, True), "fused": (True, False, True, True),
                "block": (True, True, True, True), "fused_nosplit": (True, False, False, True),
                "block_nosplit": (True, True, False, True), "block_nonorm": (True, True, True, False)}
    res: dict = collections.defaultdict(list)
    for run in range(args.runs + 1):  # run 0 warms up and counts nodes
        for m in methods:
            toks = {}
            for var in variants:
                fa, bs, split, norms = switches[var]
                fused_attention.enable(fa)
                block_step.enable(bs)
                block_step.enable_norms(norms)
                sparse_layers.enable_split(split)
                set_method(model, m, None if m == "dense" else th, 0.5)
                row = {"run": run, "method": m, "variant": var}
                if run == 0:
                    row["nodes"] = node_counts(model, vocab)
                row.update(split_times(model, 32, vocab))
                toks[var], row["tok_s"] = library(model, prompt, args.tokens)
                if var != variants[0]:
                    ref = toks[variants[0]]
                    row[f"tokens_same_as_{variants[0]}"] = f"{sum(a == b for a, b in zip(toks[var], ref))}/{len(ref)}"
                print(json.dumps(row), flush=True)
                if run:
                    res[(m, var)].append(row)
    fused_attention.enable(True)
    block_step.enable(True)
    block_step.enable_norms(True)
    sparse_layers.enable_split(True)
    med = lambda rows, k: round(statistics.median(r[k] for r in rows), 3)  # noqa: E731
    paired = lambda a, b: round(statistics.median(r["tok_s"] / x["tok_s"] for r, x in zip(a, b)), 3)  # noqa: E731
    for (m, var), rows in res.items():
        s = {"method": m, "variant": var, **{k: med(rows, k) for k in ("tok_s", "build_ms", "encode_ms", "wait_ms")}}
        for base in variants:
            if ("dense", base) in res:
                s[f"paired_vs_dense_{base}"] = paired(rows, res[("dense", base)])
        s[f"paired_vs_same_{variants[0]}"] = paired(rows, res[(m, variants[0])])
        print(json.dumps({"summary": s}), flush=True)

if __name__ == "__main__":
    main()
