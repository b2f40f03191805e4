"""Launch facts per kernel from ``ncu --csv`` (registers, occupancy limit, waves, grid) with the
fastest time seen, to tell wave quantization from slow code:

    ncu --clock-control base --metrics gpu__time_duration.sum,launch__registers_per_thread,\
launch__occupancy_limit_registers,launch__waves_per_multiprocessor,launch__grid_size --csv python ... > x.csv
    python benchmarks/ncu_launch.py x.csv
"""

import csv, sys, collections
rows = list(csv.DictReader(l for l in open(sys.argv[1]) if l.startswith('"')))
ks = collections.OrderedDict()
for r in rows:
    k = ks.setdefault(r["ID"], {"name": r["Kernel Name"][:40]})
    k[r["Metric Name"]] = r["Metric Value"]
seen = collections.OrderedDict()
for k in ks.values():
    key = (k["name"], k.get("launch__registers_per_thread"), k.get("launch__occupancy_limit_registers"), k.get("launch__waves_per_multiprocessor"), k.get("launch__grid_size"))
    seen.setdefault(key, []).append(float(k["gpu__time_duration.sum"].replace(",", "")) / 1e3)
for key, v in seen.items():
    print(key, "min us %.1f n=%d" % (min(v), len(v)))
