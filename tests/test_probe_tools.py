"""The probe session's decision tools (benchmarks/pick_variant.py, variant_check.py): a GPU call
runs them without a person in between, so their rule and their patching are checked here, on the
probes' real outputs of session 24 (where nothing won) and on those outputs turned into wins."""

from __future__ import annotations

import re
from pathlib import Path

from chess_mlx import sparse_gemv as G
from test_kernels_cpu import bench_module

RESULTS = Path(__file__).resolve().parents[1] / "benchmarks" / "results"


def _probe_dir(tmp_path: Path, tail: str, long_: str) -> Path:
    (tmp_path / "tail.txt").write_text(tail)
    (tmp_path / "long.txt").write_text(long_)
    return tmp_path


def _swap_tail(text: str) -> str:
    """The tail probe's rows with shipped and tail4 times swapped (so tail4 wins where it lost)."""
    def row(m: re.Match) -> str:
        a, b = float(m.group(2)), float(m.group(3))
        return f"{m.group(1)}{b:11.1f} {a:9.1f} {b / a:6.3f}"
    return re.sub(r"^(\S+\s+\d+->\d+\s+[\d.]+\s+\d+ )\s*([\d.]+)\s+([\d.]+)\s+[\d.]+", row, text, flags=re.M)


def _faster_chunk(text: str, kc: int, factor: float) -> str:
    """The chunk sweep with chunk ``kc``'s times divided by ``factor``."""
    def row(m: re.Match) -> str:
        return f"{m.group(1)}{float(m.group(2)) / factor:6.1f} us"
    return re.sub(rf"^(spinlong-u\d+ float16 \S+ s=\S+ kc={kc}\*?\s+)([\d.]+) us", row, text, flags=re.M)


def test_pick_variant_keeps_the_shipped_kernels_on_session_24s_losses(tmp_path):
    P = bench_module("pick_variant")
    tail = (RESULTS / "spin_tail_session24.txt").read_text()
    long_ = (RESULTS / "spin_long_session24.txt").read_text()
    assert P.pick(_probe_dir(tmp_path, tail, long_)) == "shipped"
    # the same rows as wins are picked: the parser reads the files the probes write
    swapped = _swap_tail(tail)
    assert swapped != tail and P.tail_wins(swapped)
    assert P.best_chunk(_faster_chunk(long_, 1024, 1.2)) == 1024
    assert P.pick(_probe_dir(tmp_path, swapped, _faster_chunk(long_, 1024, 1.2))) == "tail4+kc1024"
    # a chunk still slower after a 1% gain is not picked, nor a run with a wrong row
    assert P.best_chunk(_faster_chunk(long_, 768, 1.01)) is None
    assert not P.tail_wins(swapped.replace("ALL OK", "1 WRONG"))


def test_variant_check_kc_changes_one_token_float_launches_only(monkeypatch):
    V = bench_module("variant_check")
    monkeypatch.setattr(G, "spin_geometry", G.spin_geometry)  # restored after the test
    monkeypatch.setattr(G, "launch_source", G.launch_source)
    assert G.spin_geometry(1, 14336, 4096)[2] == 512
    V.apply("kc1024")
    assert G.spin_geometry(1, 14336, 4096)[2] == 1024  # the FFN shapes' longest chunk
    assert G.spin_geometry(1, 4096, 14336)[2] == 1024
    assert G.spin_geometry(1, 4096, 4096)[2] == 128  # halved by the shipped rule: untouched
    assert G.spin_geometry(2, 14336, 4096)[2] == 512  # more tokens: shared memory would overflow
    assert G.spin_geometry(1, 14336, 4096, 4)[2] == 256  # quantized: untouched
    assert G.spin_partials(1, 14336, 4096) == 14 * 4096  # the scratch follows the chunk
