"""The benchmark on CPU: 8 virtual ranks by itself, times only, numbers in results.json."""
import json
import os
import subprocess
import sys

import numpy as np

from jax_ep import bench
from jax_ep import testing as ept


def test_bench_on_cpu_sets_up_ranks_and_prints_only_meaningful_figures(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)  # The bench must set up the virtual devices itself.
  res = subprocess.run([sys.executable, "-m", "jax_ep.bench", "--backends", "xla,ragged",
                        "--iters", "1", "--reps", "1", "--out", str(tmp_path)],
                       check=True, env=env, capture_output=True, text=True, timeout=600)
  # The main job's 8 virtual ranks; no HBM or bandwidth figures for host memory.
  assert "jax_ep.bench on 8 x cpu" in res.stdout, res.stdout
  assert "hbm" not in res.stdout.lower() and "gbps" not in res.stdout, res.stdout
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["device"] == "8 x cpu"
  xla, ragged = result["rows"]
  assert (xla["backend"], xla["ranks"], xla["processes"], xla["shape"]) == ("xla", 8, "one",
                                                                          "small")
  for key in ("layout_us", "dispatch_us", "cached_us", "combine_us"):
    # A JSON number; a difference of two host timings, so 0 where the op is
    # lost in the host's noise (no timing order in tests).
    assert type(xla[key]) is float and xla[key] >= 0, (key, xla[key])
  for key in ("dispatch_gbps", "cached_gbps", "combine_gbps", "gbps_of",
              "dispatch_crossing_gbps", "combine_crossing_gbps"):
    assert xla.get(key) is None, key
  # XLA:CPU has no ragged all-to-all: the row has no numbers and says so.
  assert ragged["backend"] == "ragged" and ragged["dispatch_us"] is None
  assert "ragged-all-to-all" in ragged["note"]
  assert (tmp_path / "bench.png").stat().st_size > 0


def test_bench_moe_writes_both_tables(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run([sys.executable, "-m", "jax_ep.bench", "--moe", "--backends", "xla",
                  "--iters", "2", "--out", str(tmp_path)],
                 check=True, env=env, capture_output=True, timeout=600)
  result = json.loads((tmp_path / "results.json").read_text())
  gemm, blocks = result["gemm_rows"], result["moe_rows"]
  # On CPU only the fallback runs: the einsum ceiling and three ops per case.
  assert {(r["case"], r["impl"], r["op"]) for r in gemm} == {
      (c, i, o) for c in ("train", "decode")
      for i, o in [("einsum (equal groups)", "forward"), ("ragged_dot", "forward"),
                   ("ragged_dot", "input grad"), ("ragged_dot", "weight grad")]}
  for r in gemm:
    assert r["ms"] > 0 and r["tflops"] > 0, r
  (block,) = blocks
  assert (block["backend"], block["ranks"], block["expert_impl"]) == ("xla", 2, "ragged_dot")
  for key in ("step_ms", "comm_ms", "decode_ms"):
    assert block[key] > 0, key
  # Only consistency: on a loaded CPU the two host timings may come in any
  # order (speed belongs in the benchmark, not in a test).
  assert block["comm_share"] == block["comm_ms"] / block["step_ms"]


def test_bench_compiles_each_program_once():
  # Issue 11.4/11.5: the input generator used to compile once per input.
  mesh = ept.make_mesh(4)
  with ept.count_compilations() as compiles:
    res = bench.time_backend(mesh, "xla", 16, 64, 2, 8, iters=3, reps=2)
  assert all(len(res[op]) == 2 for op in bench.OPS)
  # Per op one program with the calls and one without them (the host clock's baseline).
  assert compiles["jit(f)"] == 2 * len(bench.OPS), compiles
  assert compiles["jit(make)"] == 2, compiles  # one input generator per shape


def test_byte_counts_deepep_received_and_crossing():
  import numpy as np
  # Rank 0's tokens: to ranks {0, 1}, {0}, {1}; rank 1's: {0}, {0, 1}, none.
  masks = [np.array([[1, 1], [1, 0], [0, 1]], bool), np.array([[1, 0], [1, 1], [0, 0]], bool)]
  # Received (DeepEP: recv_x rows, own included): rank 0 gets 2 + 2, rank 1 gets 2 + 1.
  assert bench.received_bytes_per_rank(masks, 10) == (4 + 3) / 2 * 10
  # Crossing: rank 0 sends 2 rows to rank 1, rank 1 sends 2 rows to rank 0.
  assert bench.crossing_bytes_per_rank(masks, 10) == (2 + 2) / 2 * 10


def test_bench_low_latency_and_fp8_rows():
  # Issue 10: the same rows and fields for the low-latency mode and FP8 rows.
  mesh = ept.make_mesh(4)
  N, H, K, E = 8, 256, 2, 8
  for mode, dtype, timed in [("normal", "fp8", ("dispatch", "cached_dispatch")),
                             ("low_latency", "bf16", ("dispatch", "combine")),
                             ("low_latency", "fp8", ("dispatch",))]:
    res = bench.time_backend(mesh, "xla", N, H, K, E, iters=2, reps=1, mode=mode, dtype=dtype)
    assert set(timed) == set(res) & set(bench.OPS), (mode, dtype, res.keys())
    row = bench._row("xla", 4, "one", "tiny", None, res, res, None, mode=mode, dtype=dtype)
    assert (row["mode"], row["dtype"]) == (mode, dtype)
    for op, key in bench._US_KEYS.items():
      assert (row[f"{key}_us"] is not None) == (op in timed), (mode, dtype, key, row)
    # Bytes: FP8 rows carry H + H/32 bytes, bf16 rows 2H; the low-latency
    # count is one row per valid (token, k) (no -1 ids here: N * K a rank).
    fp8_row, bf16_row = H + H // 32, 2 * H
    moved = fp8_row if dtype == "fp8" else bf16_row
    if mode == "low_latency":
      assert res["op_bytes"]["dispatch"] == N * K * moved
      assert res["op_bytes"]["combine"] == N * K * bf16_row
    else:
      ratio = res["op_bytes"]["dispatch"] / res["op_bytes"]["combine"]
      assert ratio == fp8_row / bf16_row


def test_rank_bench_carries_mode_and_dtype_to_the_rows():
  # The --ranks path: each process's runs name their dtype; the merged rows keep them.
  out = bench.rank_bench(0, 1, ["tiny"], ["xla"], 1, 1, [None], mode="low_latency",
                         dtypes=["bf16", "fp8"])
  assert [r["dtype"] for r in out["runs"]] == ["bf16", "fp8"]
  rows = [bench._row(r["backend"], out["num_ranks"], "emulated", r["shape"], r["num_sms"],
                     bench._merge([r["res"]]), r["res"], None, mode="low_latency",
                     dtype=r["dtype"]) for r in out["runs"]]
  assert [(r["mode"], r["dtype"]) for r in rows] == [("low_latency", "bf16"),
                                                     ("low_latency", "fp8")]
  assert rows[0]["combine_us"] is not None and rows[1]["combine_us"] is None


def test_local_hop_bytes_count_forwarded_rows_to_other_local_ranks():
  # A two-axis Buffer's local hop: the forwarder of (token, node n) is rank
  # (n, l) with the token's own local index l; it sends the row to each other
  # rank of node n that needs it. Counted here loop by loop, against the bench.
  rng = np.random.default_rng(4)
  Nn, L, N, row = 2, 3, 11, 8
  R = Nn * L
  masks = [rng.random((N, R)) < 0.4 for _ in range(R)]
  rows = 0
  for s, m in enumerate(masks):
    for i in range(N):
      for n in range(Nn):
        rows += sum(int(m[i, n * L + l]) for l in range(L) if l != s % L)
  assert rows > 0
  assert bench.local_hop_bytes_per_rank(masks, L, row) == rows * row / R
  assert bench.local_hop_bytes_per_rank(masks, 1, row) == 0  # one local rank: no local hop


def test_two_axis_rows_time_the_node_hop_and_count_both_hops():
  # Issue 13: a two-axis run reports each hop's bytes and the node hop's time
  # (XLA's all-to-all of the forwarding rows alone) beside the ops.
  import jax
  import numpy as np
  from jax.sharding import Mesh
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("node", "local"))
  N, H = 16, 64
  res = bench.time_backend(mesh, "xla", N, H, 2, 16, iters=2, reps=1)
  assert set(bench.OPS) | {"node_hop"} <= set(res)
  row = bench._row("xla", 8, "one, mesh 2x4", "tiny", None, res, res, None, bandwidth=False)
  assert row["node_hop_us"] is not None and row["node_hop_us"] >= 0
  # At most one row per (token, other node) crosses: N rows a rank here.
  assert 0 < res["node_hop_bytes"] <= N * 2 * H
  assert res["local_hop_bytes"] > 0 and res["crossing_bytes"] >= res["node_hop_bytes"]
  assert {"node_hop_mb", "local_hop_mb", "flat_crossing_mb"} <= set(row)
  assert "node_hop_us" in bench._columns(False, [row])


def test_rounds_fold_every_rounds_runs_and_keep_errors():
  # --rounds: each op's runs of all rounds feed one median; a failed round names why.
  a = {"dispatch": [1.0, 2.0], "combine": [5.0], "op_bytes": {"dispatch": 10}}
  b = {"dispatch": [3.0], "combine": [6.0, 7.0], "op_bytes": {"dispatch": 10}}
  bad = {"error": "RuntimeError: gone"}
  folded = bench._fold_rounds([(("xla", "small"), a), (("cuda", "small"), bad),
                               (("xla", "small"), b), (("cuda", "small"), a)])
  assert list(folded) == [("xla", "small"), ("cuda", "small")]  # first-seen order
  assert folded[("xla", "small")]["dispatch"] == [1.0, 2.0, 3.0]
  assert folded[("xla", "small")]["combine"] == [5.0, 6.0, 7.0]
  assert folded[("xla", "small")]["op_bytes"] == {"dispatch": 10}
  assert folded[("cuda", "small")] == bad
  assert a["dispatch"] == [1.0, 2.0]  # the inputs are left as they were


def test_bench_rounds_give_one_row_per_backend(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  res = subprocess.run([sys.executable, "-m", "jax_ep.bench", "--backends", "xla",
                        "--iters", "1", "--reps", "1", "--rounds", "2", "--out",
                        str(tmp_path)], check=True, env=env, capture_output=True, text=True,
                       timeout=600)
  assert "median of 2 runs" in res.stdout, res.stdout
  (row,) = json.loads((tmp_path / "results.json").read_text())["rows"]
  assert row["backend"] == "xla" and type(row["dispatch_us"]) is float
  bad = subprocess.run([sys.executable, "-m", "jax_ep.bench", "--rounds", "0"], env=env,
                       capture_output=True, text=True, timeout=600)
  assert bad.returncode != 0 and "--rounds must be at least 1" in bad.stderr
