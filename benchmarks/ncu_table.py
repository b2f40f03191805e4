"""Turn ``ncu --csv`` output of ncu_probe.py into a table of GPU-side times and bandwidth.

    python benchmarks/ncu_table.py ncu.csv ncu.err [COPY_BW_TB_S]
"""

from __future__ import annotations

import collections
import csv
import re
import sys


# ncu's CSV picks a unit per value; times are brought to nanoseconds and sizes to bytes.
_UNIT = {"ns": 1.0, "nsecond": 1.0, "us": 1e3, "usecond": 1e3, "ms": 1e6, "msecond": 1e6,
         "Kbyte": 1e3, "Mbyte": 1e6, "Gbyte": 1e9}


def kernel_launches(csv_path: str) -> list[dict]:
    """One dict per profiled launch, in launch order: its kernel ``name`` and each metric as a
    float (durations in ns, sizes in bytes)."""
    ks: dict = collections.OrderedDict()
    for r in csv.DictReader(l for l in open(csv_path) if l.startswith('"')):
        k = ks.setdefault(r["ID"], {"name": r["Kernel Name"]})
        k[r["Metric Name"]] = float(r["Metric Value"].replace(",", "")) * _UNIT.get(r.get("Metric Unit", ""), 1.0)
    return list(ks.values())


def main(csv_path: str, err_path: str, copy_bw: float = 2.82) -> None:
    sel = [k for k in kernel_launches(csv_path) if re.search(r"custom_kernel|gemv|qmv|gemm", k["name"])]
    calls = [l.split(" ", 1)[1].strip() for l in open(err_path) if l.startswith("CALL")]
    n_kernels = len(calls)  # one launch per call (spin's reduction is inside it since session 3)
    meas, i = sel[-n_kernels:], 0
    out = collections.defaultdict(list)
    for c in calls:
        cfg, kind, _rep = c.rsplit(" ", 2)
        n = 1
        out[(cfg, kind)].append((sum(k["gpu__time_duration.sum"] for k in meas[i:i + n]),
                                 sum(k["dram__bytes_read.sum"] for k in meas[i:i + n])))
        i += n
    dense = {cfg: min(t for t, _ in v) for (cfg, kind), v in out.items() if kind == "dense"}
    print("| config | kernel | GPU us | dense us | speedup | DRAM read MB | TB/s | % of copy bw |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for (cfg, kind), v in out.items():
        if kind == "dense":
            continue
        t, b = min(v)
        d = dense[cfg] * (2 if kind == "gateup" else 1)  # gate_up replaces two dense GEMVs
        name = {"spout": "sparse-output", "spin": "sparse-input", "gateup": "gate+up fused"}[kind]
        print(f"| {cfg} | {name} | {t / 1e3:.1f} | "
              f"{d / 1e3:.1f} | {d / t:.2f} | {b / 1e6:.1f} | {b / t / 1e3:.2f} | "
              f"{100 * b / t / 1e3 / copy_bw:.0f}% |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], *(float(a) for a in sys.argv[3:4]))
