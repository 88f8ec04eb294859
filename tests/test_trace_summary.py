"""tools/trace_summary.py: phase-trace lines (ffi/common.cuh PhaseTrace) summed up."""
import importlib.util
import pathlib

import pytest

_PATH = pathlib.Path(__file__).resolve().parents[1] / "tools" / "trace_summary.py"


@pytest.fixture(scope="module")
def ts():
  spec = importlib.util.spec_from_file_location("trace_summary", _PATH)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _line(block, start, marks, op="ll dispatch", rank=0, seq=69):
  tail = "".join(f" | {n} {v}" for n, v in marks)
  return f"jax_ep phase trace: {op} rank {rank} block {block} seq {seq} start {start} ns{tail}\n"


def test_blocks_spread_and_start_skew(ts):
  lines = [_line(0, 1_000_500, [("entry", 900), ("hello", 5_000), ("finish", 20_000)]),
           _line(7, 1_002_500, [("entry", 1_100), ("hello", 4_000), ("finish", 14_000)]),
           _line(3, 1_000_000, [("entry", 2_000), ("hello", 6_000), ("finish", 17_000)])]
  records, skipped = ts.parse(lines)
  assert skipped == 0 and len(records) == 3
  marks = ts.summarize(records)[("ll dispatch", 0)]
  assert list(marks) == ["start", "entry", "hello", "finish"]
  assert sorted(marks["start"]) == [0.0, 0.5, 2.5]  # after the op's first block (block 3)
  assert sorted(marks["finish"]) == [14.0, 17.0, 20.0]


def test_interleaved_and_cut_lines_are_skipped(ts):
  a = _line(0, 10, [("entry", 900), ("hello", 5_000)], rank=0)
  b = _line(1, 20, [("entry", 800), ("hello", 4_000)], rank=1)
  glued = a[:a.index("| hello")] + b  # rank 0's line cut by rank 1's, as two GPUs printed
  swapped = _line(2, 30, [("hello", 5_000), ("entry", 900)])  # times going back
  records, skipped = ts.parse([glued, swapped, a[:20] + "\n", b])
  assert skipped == 3
  assert [(r["rank"], r["block"]) for r in records] == [(1, 1)]
