"""Summarise an ncu CSV (metric gpu__time_duration.sum) per kernel: median device time.

    ncu --clock-control none --metrics gpu__time_duration.sum --csv \
        -k regex:'(Dispatch|Cached|Combine|Layout|Scan)' CMD > ncu.csv
    python3 tools/kernel_times.py ncu.csv --tokens 4096 --hidden 7168
"""
import argparse
import collections
import csv
import io
import statistics
import sys

SCALE = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
         "second": 1e6, "s": 1e6}


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("csv")
  ap.add_argument("--tokens", type=int, default=4096)
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--copy-gbps", type=float, default=0.0)
  args = ap.parse_args(argv)
  text = open(args.csv).read()
  start = text.find('"ID"')
  if start < 0:
    print("no ncu table in", args.csv)
    return 1
  times = collections.defaultdict(list)
  for row in csv.DictReader(io.StringIO(text[start:])):
    if row.get("Metric Name") != "gpu__time_duration.sum":
      continue
    name = row["Kernel Name"].split("(")[0].split("<")[0].strip()
    times[name].append(float(row["Metric Value"].replace(",", "")) * SCALE[row["Metric Unit"]])
  # At R = 1 each copy kernel reads and writes one [N, H] bf16 tensor.
  moved = 2 * args.tokens * args.hidden * 2
  print(f"{'kernel':<28} {'calls':>5} {'median us':>10} {'GB/s (R=1 copy)':>16}")
  for name, ts in sorted(times.items()):
    med = statistics.median(ts)
    copy_like = not any(k in name for k in ("Layout", "Scan", "Clock"))
    gbps = f"{moved / (med * 1e-6) / 1e9:.0f}" if copy_like else ""
    if gbps and args.copy_gbps:
      gbps += f" ({100 * float(gbps) / args.copy_gbps:.0f}% of copy)"
    print(f"{name:<28} {len(ts):>5} {med:>10.1f} {gbps:>16}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
