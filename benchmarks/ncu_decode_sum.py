"""Sum `ncu --csv --metrics gpu__time_duration.sum` output of a decode run by kernel kind."""

import csv
import sys
from collections import defaultdict


def main(path: str, tokens: int) -> None:
    lines = open(path).read().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('"ID"'))
    by, n = defaultdict(float), 0
    for r in csv.DictReader(lines[start:]):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        v = float(r["Metric Value"].replace(",", "")) * (1e3 if r["Metric Unit"] == "usecond" else
                                                        1e6 if r["Metric Unit"] == "msecond" else 1)
        name = r["Kernel Name"]
        kind = ("chess_" + name.split("chess_")[1].split("_")[0]) if "chess_" in name else name.split("(")[0].split("<")[0][:50]
        by[kind] += v
        n += 1
    total = sum(by.values())
    print(f"{n / tokens:.0f} kernels/token, GPU kernel time {total / 1e6 / tokens:.3f} ms/token")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {v / 1e6 / tokens:8.3f} ms/token  {k}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
