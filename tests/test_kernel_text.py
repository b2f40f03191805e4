"""The kernel text handed to MLX (``kernel_text``): nothing lost that a kernel needs, much less to hash."""

from __future__ import annotations

import re

import pytest

from chess_mlx import kernel_text as KT
from chess_mlx import sparse_gemv as G

KINDS = ("cuda", "metal")


@pytest.mark.parametrize("kind", KINDS)
def test_header_splits_into_named_items_without_loss(kind):
    """Every top-level item of the shared header defines one chess_*/Chess* helper (the naming rule
    the helper selection relies on), and the items together are the whole comment-free header."""
    header, _ = G.read_source(kind, "spin_f")
    items = KT.header_items(header)
    assert len(items) >= 15
    assert "".join(items).split() == KT.strip_comments(header).split()
    assert [it[:50] for it in items if KT.defined_name(it) is None] == []


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", sorted(G._INPUTS))
def test_launched_text_defines_every_helper_it_uses(kind, name):
    """The launched header holds a definition of every helper that the launched text names (the
    Metal twin has no compiler here; the CUDA twin is also compiled, test_kernels_cpu), keeps the
    body's statements, and is far shorter than the source as written."""
    header, body = G.kernel_source(kind, name)
    lh, lb = G.launch_source(kind, name)
    defined = {KT.defined_name(it) for it in KT.header_items(lh)}
    assert KT.used_helpers(lh + lb) <= defined
    assert lb.split() == " ".join(KT.strip_comments(body).split()).split()
    # spin_q on Metal: 0.44 since its shared compaction and epilogue hold the fused norms (session
    # 20), 0.45 with the fused rope's tail in the epilogue too (session 21)
    assert len(lh) + len(lb) < 0.47 * (len(header) + len(body))
    assert "//" not in lh + lb and "/*" not in lh + lb


def test_helpers_follow_uses_through_other_helpers():
    header = """// a comment
template <int B>
__device__ float chess_a(float v);
template <>
__device__ float chess_a<1>(float v) { return v; }
struct ChessB {
  static float run(float v) { return chess_a<1>(v); }  // uses chess_a
};
__device__ float chess_unused(float v) {
  return v;
}
#define KEEP 1
"""
    got = KT.helpers_for(header, "y = ChessB::run(x);")
    assert "chess_a(float v);" in got and "chess_a<1>" in got and "struct ChessB" in got
    assert "chess_unused" not in got and "#define KEEP 1" in got
    assert [KT.defined_name(it) for it in KT.header_items(header)] == ["chess_a", "chess_a", "ChessB",
                                                                     "chess_unused", None]


def test_compact_keeps_preprocessor_lines_and_drops_comments():
    src = "  for (;;) {\n#pragma unroll 4\n    x += 1; /* two\n lines */ y = 2; // tail\n\n  }\n"
    out = KT.compact(src)
    assert out == "for (;;) {\n#pragma unroll 4\nx += 1; y = 2;\n}\n"
    assert re.search(r"^#pragma unroll 4$", out, re.M)


def test_unbalanced_header_is_refused():
    with pytest.raises(ValueError, match="unbalanced"):
        KT.header_items("__device__ void chess_x() {\n")


def test_native_profile_summary_counts_frames_per_thread(tmp_path):
    """benchmarks/native_profile.py's summary (how session 18 found the per-launch hash): shares of
    each thread's samples whose stack holds a frame, and the deepest MLX frame."""
    import gzip

    from test_kernels_cpu import bench_module

    P = bench_module("native_profile")
    enc = "thread (9): chess-mlx-encoder"
    raw = (f"{enc};mlx::core::eval_impl (libmlx.so);mlx::core::fast::CustomKernel::eval_gpu (libmlx.so);"
           f"std::_Hash_bytes (libstdc++.so) 3\n"
           f"{enc};mlx::core::eval_impl (libmlx.so);mlx::core::cu::CommandEncoder::commit_impl (libmlx.so) 1\n"
           "thread (1): MainThread;_one_token (block_step.py:160) 4\n")
    path = tmp_path / "m.txt.gz"
    path.write_bytes(gzip.compress(raw.encode()))
    out = P.summarize(path)
    assert f"{enc}: 4 samples" in out and "thread (1): MainThread: 4 samples" in out
    assert re.search(r"75\.0%  CustomKernel::eval_gpu", out) and re.search(r"25\.0%  CommandEncoder::commit", out)
    assert re.search(r"75\.0%  mlx::core::fast::CustomKernel::eval_gpu", out)  # the deepest MLX frame
    assert re.search(r"100\.0%  \(no MLX frame\)", out)
