"""Launch facts per kernel from ``ncu --csv`` (registers, occupancy limit, waves, grid) with the
fastest time seen, to tell wave quantization from slow code:

    ncu --clock-control base --metrics gpu__time_duration.sum,launch__registers_per_thread,\
launch__occupancy_limit_registers,launch__waves_per_multiprocessor,launch__grid_size --csv python ... > x.csv
    python benchmarks/ncu_launch.py x.csv
"""

from __future__ import annotations

import collections
import sys

from ncu_table import kernel_launches

FACTS = ("launch__registers_per_thread", "launch__occupancy_limit_registers", "launch__waves_per_multiprocessor",
         "launch__grid_size")


def main(csv_path: str) -> None:
    seen: dict = collections.OrderedDict()
    for k in kernel_launches(csv_path):
        key = (k["name"][:40], *(k.get(f) for f in FACTS))
        seen.setdefault(key, []).append(k["gpu__time_duration.sum"] / 1e3)
    for (name, regs, occ, waves, grid), us in seen.items():
        print(f"{name}: {regs:.0f} registers, {occ:.0f} blocks/SM by registers, {waves:.2f} waves, "
              f"grid {grid:.0f}: min {min(us):.1f} us over {len(us)}")


if __name__ == "__main__":
    main(sys.argv[1])
