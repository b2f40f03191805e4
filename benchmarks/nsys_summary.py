"""Summarise an `nsys stats --report cuda_gpu_trace --format csv` file: kernel time per token by kind,
and how much of the wall time the GPU was busy."""

import csv
import sys
from collections import defaultdict


def main(path: str, tokens: int) -> None:
    rows = list(csv.DictReader(l for l in open(path) if "," in l))
    kern = [r for r in rows if r.get("Name") and "memcpy" not in r["Name"].lower() and "memset" not in r["Name"].lower()]
    by = defaultdict(float)
    for r in kern:
        name = r["Name"]
        kind = ("chess_" + name.split("chess_")[1].split("_")[0]) if "chess_" in name else name.split("<")[0][:60]
        by[kind] += float(r["Duration (ns)"])
    start = min(float(r["Start (ns)"]) for r in kern)
    end = max(float(r["Start (ns)"]) + float(r["Duration (ns)"]) for r in kern)
    busy = sum(by.values())
    print(f"span {(end - start) / 1e6 / tokens:.3f} ms/token, GPU kernels busy {busy / 1e6 / tokens:.3f} ms/token, "
          f"{len(kern) / tokens:.0f} kernels/token")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:14]:
        print(f"  {v / 1e6 / tokens:8.3f} ms/token  {k}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
