"""Run kernels.py or the ``chess-mlx`` CLI with a probe's kernel variant in place, so a variant gets
the shipped kernels' whole check and timing on the same warm GPU machine as its probe, before it is
adopted in the sources:

    python benchmarks/variant_check.py VARIANT kernels [kernels.py arguments]
    python benchmarks/variant_check.py VARIANT cli [chess-mlx arguments]

VARIANT: ``shipped`` (nothing changed); ``kcN`` (one-token half-weight sparse-input launches whose
split-K chunk is the longest, 512 rows, take N rows instead, e.g. ``kc1024``: the FFN shapes;
chain_sweep.py --only spinlong; lost on the H100 in session 24); ``u8``, ``pfb``, ``pfl``, ``hs``
(spin_rounds.py's edits: 8 rows in flight, L2 prefetch of the active rows, a head start for the
float kernels' first loads) join as one edit of the spin sources, e.g. ``u8+pfb``; several joined
by ``+``. Checked this way and adopted:
spin_rounds' ``relatom`` (session 25) and ``redi`` (session 26); the float4 last-block sum
(``tail4``, session 24) and the other edits of the chunk-partial sum went with that sum.
check_all_wtypes.sh takes it as ``KERNELS="benchmarks/variant_check.py u8 kernels"``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chess_mlx import sparse_gemv as G  # noqa: E402


def apply(variant: str) -> None:
    """Put ``variant``'s kernel texts or geometry in place for this process."""
    from node_cost import launch_with

    import spin_rounds

    if why := spin_rounds.clash(variant):
        raise SystemExit(f"variant_check: {why}")
    rounds = [p for p in variant.split("+") if p in spin_rounds.PARTS]  # its own list: session 25 lost
    if rounds:  # a call to a copy of it here that missed a new part
        launch_with(spin_rounds.variant_launch_source("+".join(rounds)))
    for part in variant.split("+"):
        if part == "shipped" or part in rounds:
            continue
        if why := spin_rounds.refusal(part):
            raise SystemExit(f"variant_check: {why}")
        elif part.startswith("kc") and part[2:].isdigit():
            longest, shipped = int(part[2:]), G.spin_geometry

            def geometry(m, k, n, bits=None, kind="cuda", words=None, kc=None, _n=longest, _ship=shipped):
                w, tiles, c = _ship(m, k, n, bits, kind, words, kc)
                # one token only (more would pass 48 KB of shared memory at 2048 rows), and only
                # where the shipped rule kept its longest chunk
                return w, tiles, (_n if kc is None and bits is None and m == 1 and c == 512 else c)

            G.spin_geometry = geometry
            launch_with(G.launch_source)
        else:
            known = ", ".join(("shipped", "kcN", *spin_rounds.PARTS))
            raise SystemExit(f"variant_check: unknown variant {part!r} ({known})")


def main() -> int:
    if len(sys.argv) < 3 or sys.argv[2] not in ("kernels", "cli"):
        raise SystemExit(__doc__.split("\n\n")[1])
    variant, what, rest = sys.argv[1], sys.argv[2], sys.argv[3:]
    apply(variant)
    print(f"variant: {variant}", flush=True)
    if what == "kernels":
        import kernels

        sys.argv = ["kernels.py", *rest]
        return kernels.main()
    from chess_mlx import cli

    return cli.main(rest)


if __name__ == "__main__":
    raise SystemExit(main())
