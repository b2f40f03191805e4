"""Pick the probe variants worth a whole check from sparse_input_probes.sh's outputs, so the check
can follow the probes on the same warm GPU machine without a person in between:

    python benchmarks/pick_variant.py OUTDIR   ->  prints e.g. ``u8+kc1024`` or ``shipped``

spin_rounds.py's edits (OUTDIR/rounds.txt): of its variant columns, the one with the best mean
shipped/variant ratio, if every row was checked (``ALL OK``), the mean ratio is at least 1.02 and
no row is under 0.97, leaving out the parts whose output may change from run to run
(NONDETERMINISTIC: float atomics in the split-K sum; a user's greedy decode must repeat itself).
kcN (OUTDIR/long.txt): of the chunks past 512 rows, the one with the best mean speedup over
kc=512 on the float16 shapes whose shipped chunk is 512, at least 1.02 on average at 50% and 70%
sparsity, no row under 0.97 at any level, and no WRONG row. The variant is only a candidate:
adoption waits for its whole check (check_all_wtypes.sh with variant_check.py).
"""

from __future__ import annotations

import math
import re
import sys
from collections import defaultdict
from pathlib import Path

MIN_MEAN, MIN_ROW = 1.02, 0.97
NONDETERMINISTIC = ("redf", "redv")  # spin_rounds parts that add floats in the blocks' arrival order


def _gmean(xs: list[float]) -> float:
    return math.exp(sum(math.log(x) for x in xs) / len(xs)) if xs else 0.0


def best_chunk(text: str) -> int | None:
    """long.txt rows: ``spinlong-u4 float16 OUTxIN s=S kc=KC[*] T us  rel_err E[  WRONG]``."""
    if "WRONG" in text:
        return None
    rows = re.findall(r"^spinlong-u\d+ float16 (\d+x\d+) s=([\d.]+) kc=(\d+)(\*?)\s+([\d.]+) us", text, re.M)
    t = {(shape, float(s), int(kc)): float(us) for shape, s, kc, _, us in rows}
    shipped512 = {shape for shape, _, kc, star, _ in rows if star and int(kc) == 512}
    by_kc: dict[int, list[tuple[float, float]]] = defaultdict(list)  # kc -> (s, speedup over 512)
    for (shape, s, kc), us in t.items():
        if shape in shipped512 and kc > 512 and (shape, s, 512) in t:
            by_kc[kc].append((s, t[(shape, s, 512)] / us))
    best, best_mean = None, MIN_MEAN
    for kc, pairs in sorted(by_kc.items()):
        mid = [r for s, r in pairs if s in (0.5, 0.7)]
        mean = _gmean(mid)
        if mid and min(r for _, r in pairs) >= MIN_ROW and mean >= best_mean:
            best, best_mean = kc, mean
    return best


def best_rounds(text: str) -> str | None:
    """rounds.txt: a header ``wtype in->out s kc shipped us <v> us ... x<v> ... max err``, then per
    row the times of shipped and each variant and each variant's shipped/variant ratio."""
    if "ALL OK" not in text:
        return None
    header = next((line for line in text.splitlines() if line.startswith("wtype")), "")
    names = [tok[1:] for tok in header.split() if tok.startswith("x")]
    ratios: dict[str, list[float]] = defaultdict(list)
    for line in text.splitlines():
        tok = line.split()
        if len(tok) >= 5 + 2 * len(names) and re.fullmatch(r"\d+->\d+", tok[1] if len(tok) > 1 else ""):
            for v, r in zip(names, tok[5 + len(names):5 + 2 * len(names)]):
                ratios[v].append(float(r))
    best, best_mean = None, MIN_MEAN
    for v, rs in ratios.items():
        if set(v.split("+")) & set(NONDETERMINISTIC):
            continue
        if min(rs) >= MIN_ROW and _gmean(rs) >= best_mean:
            best, best_mean = v, _gmean(rs)
    return best


def pick(out: Path) -> str:
    parts = []
    rounds = out / "rounds.txt"
    if rounds.exists() and (v := best_rounds(rounds.read_text())):
        parts.append(v)
    long_ = out / "long.txt"
    kc = best_chunk(long_.read_text()) if long_.exists() else None
    if kc:
        parts.append(f"kc{kc}")
    return "+".join(parts) or "shipped"


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__.split("\n\n")[1].strip())
    print(pick(Path(sys.argv[1])))
