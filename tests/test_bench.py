"""The benchmark's output on CPU: results.json with numbers, and a row that says why."""
import json
import os
import subprocess
import sys


def test_bench_writes_numbers_and_explains_what_cannot_run(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2")
  subprocess.run([sys.executable, "-m", "jax_ep.bench", "--shapes", "small", "--backends",
                  "xla,ragged", "--iters", "2", "--reps", "1", "--out", str(tmp_path)],
                 check=True, env=env, capture_output=True, timeout=600)
  result = json.loads((tmp_path / "results.json").read_text())
  assert result["device"] == "2 x cpu"
  xla, ragged = result["rows"]
  assert (xla["backend"], xla["ranks"], xla["processes"], xla["shape"]) == ("xla", 2, "one",
                                                                          "small")
  for key in ("layout_us", "dispatch_us", "cached_us", "combine_us", "dispatch_gbps",
              "combine_gbps"):
    assert isinstance(xla[key], float) and xla[key] > 0, key
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
  assert 0 < block["comm_share"] < 1
