"""Sum `ncu --csv --metrics gpu__time_duration.sum` output of a decode run by kernel kind.

    python benchmarks/ncu_decode_sum.py ncu.csv [TOKENS]

TOKENS defaults to the number of greedy-sampling kernels (``arg_reduce``) in the file, one per
token: ``nsys_decode.py --tokens 2`` leaves one decode step inside the profiled range, not two
(generate_step computes one token ahead), so a count passed by hand is easily off.
The sparse kernels are also listed per instance (weight shape and split-K chunk in the name).
"""

import sys
from collections import defaultdict

from ncu_table import kernel_launches


def kind(name: str) -> str:
    if "chess_" in name:
        return "chess_" + name.split("chess_")[1].split("_")[0]
    return name.split("(")[0].split("<")[0][:50]


def main(path: str, tokens: int = 0) -> None:
    launches = [(k["name"], k["gpu__time_duration.sum"] / 1e3) for k in kernel_launches(path)
                if "gpu__time_duration.sum" in k]
    tokens = tokens or sum("arg_reduce" in n for n, _ in launches) or 1
    by, inst = defaultdict(float), defaultdict(list)
    for name, us in launches:
        by[kind(name)] += us
        if "chess_" in name:
            inst[name.split("(")[0]].append(us)
    total = sum(by.values())
    print(f"{tokens} token(s), {len(launches) / tokens:.0f} kernels/token, GPU kernel time {total / 1e3 / tokens:.3f} ms/token")
    for k, v in sorted(by.items(), key=lambda kv: -kv[1])[:12]:
        print(f"  {v / 1e3 / tokens:8.3f} ms/token  {k}")
    for name, us in sorted(inst.items()):
        print(f"  {sum(us) / len(us):8.1f} us mean, {len(us) / tokens:.0f}/token  {name}")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0)
