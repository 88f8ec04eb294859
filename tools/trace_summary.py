"""Sums up the kernels' phase-trace lines (ffi/common.cuh PhaseTrace).

Usage: python tools/trace_summary.py TRACE.log [...]

A trace line says, for one block of one op, the time (ns) from the block's
start to each phase mark, and the block's start (%globaltimer mod 1 s). Lines
printed by two GPUs at once can come out interleaved; a line that does not
parse whole, or whose times decrease or names repeat, is skipped (and
counted). For each (kernel, rank), every mark's
spread over blocks and traced ops is printed in microseconds, as min / median
/ max, plus "start": each block's start after the op's first block (one GPU's
clock, so blocks of one rank only).
"""
import collections
import re
import statistics
import sys

LINE = re.compile(r"jax_ep phase trace: (?P<op>[a-z0-9 ]+?) rank (?P<rank>\d+) block "
                  r"(?P<block>\d+) seq (?P<seq>\d+) start (?P<start>\d+) ns"
                  r"(?P<marks>(?: \| [a-z0-9 _-]+ \d+)+)\s*$")


def parse(lines):
  """(records, skipped): records as dicts op, rank, block, seq, start, marks."""
  records, skipped = [], 0
  for line in lines:
    if "phase trace" not in line:
      continue
    m = LINE.search(line)
    if not m or line.count("jax_ep phase trace") != 1:
      skipped += 1
      continue
    marks = []
    for part in m.group("marks").split("|")[1:]:
      name, value = part.strip().rsplit(" ", 1)
      if name != "-":  # lines before 002b4fd padded unused marks with "- 0"
        marks.append((name, int(value)))
    # One thread notes its marks in turn, so their times never decrease; a
    # line glued from two (interleaved output) would have to be that too.
    times = [v for _, v in marks]
    if times != sorted(times) or len({n for n, _ in marks}) != len(marks):
      skipped += 1
      continue
    records.append(dict(op=m.group("op"), rank=int(m.group("rank")),
                        block=int(m.group("block")), seq=int(m.group("seq")),
                        start=int(m.group("start")), marks=marks))
  return records, skipped


def summarize(records):
  """{(op, rank): {mark: [us values]}}, marks in order of first appearance."""
  first_start = {}
  for r in records:
    key = (r["op"], r["rank"], r["seq"])
    first_start[key] = min(first_start.get(key, r["start"]), r["start"])
  out = collections.OrderedDict()
  for r in records:
    marks = out.setdefault((r["op"], r["rank"]), collections.OrderedDict())
    skew = (r["start"] - first_start[(r["op"], r["rank"], r["seq"])]) % 10**9
    marks.setdefault("start", []).append(skew / 1e3)
    for name, ns in r["marks"]:
      marks.setdefault(name, []).append(ns / 1e3)
  return out


def main(paths):
  lines = []
  for p in paths:
    with open(p, errors="replace") as f:
      lines.extend(f)
  records, skipped = parse(lines)
  print(f"{len(records)} trace lines parsed, {skipped} skipped (interleaved or cut)")
  for (op, rank), marks in summarize(records).items():
    n = len(marks["start"])
    print(f"\n{op}, rank {rank} ({n} block lines)")
    print(f"  {'mark':<18} {'min us':>8} {'median':>8} {'max us':>8} {'blocks':>6}")
    for name, vals in marks.items():
      print(f"  {name:<18} {min(vals):8.1f} {statistics.median(vals):8.1f} "
            f"{max(vals):8.1f} {len(vals):6d}")


if __name__ == "__main__":
  if len(sys.argv) < 2:
    sys.exit(__doc__)
  main(sys.argv[1:])
