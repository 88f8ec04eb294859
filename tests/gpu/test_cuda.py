"""The cuda backend against the NumPy reference, R ranks emulated on one GPU.

Each test launches R JAX processes that share the GPU (jax_ep.multiprocess).
Skipped where there is no NVIDIA GPU or the extension was built without CUDA.
Start an MPS daemon first to make the multi-rank runs fast (tools/gpu_check.sh
does).
"""
import shutil
import subprocess

import numpy as np
import pytest

from jax_ep import _ext
from jax_ep.multiprocess import launch


def _have_gpu():
  if not _ext.has_cuda() or shutil.which("nvidia-smi") is None:
    return False
  return subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0


pytestmark = pytest.mark.skipif(not _have_gpu(), reason="needs an NVIDIA GPU and a CUDA build")
GPU_ENV = {"JAX_PLATFORMS": "cuda", "JAX_EP_DEBUG_POISON": "1"}


@pytest.mark.parametrize("num_ranks", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_contract(num_ranks, dtype):
  res = launch("jax_ep.testing:check_contract", num_ranks, env=GPU_ENV,
               kwargs=dict(seed=num_ranks, dtype=dtype, num_tokens=96, hidden=128 + 64,
                           num_topk=6, num_experts=4 * num_ranks))
  assert [r["rank"] for r in res] == list(range(num_ranks))


@pytest.mark.parametrize("num_ranks", [1, 2, 8])
def test_contract_with_overflow(num_ranks):
  res = launch("jax_ep.testing:check_contract", num_ranks, env=GPU_ENV,
               kwargs=dict(seed=100 + num_ranks, num_tokens=40, hidden=64, num_topk=3,
                           num_experts=2 * num_ranks, num_worst_tokens=37))
  assert any(r["num_recv_tokens"] > r["capacity"] for r in res), "no rank overflowed"


def test_large_hidden_and_topk_32():
  launch("jax_ep.testing:check_contract", 4, env=GPU_ENV,
         kwargs=dict(seed=7, num_tokens=33, hidden=7168, num_topk=32, num_experts=64,
                     repeats=1))


def test_cuda_matches_xla_on_one_gpu():
  res = launch("jax_ep.testing:check_cuda_vs_xla", 1, env=GPU_ENV, kwargs=dict(seed=3))
  assert res[0]["compared"] > 0


def test_timeout_names_op_and_rank():
  outputs = launch("jax_ep.testing:check_timeout", 2, env=GPU_ENV, timeout_s=90,
                   expect_failure=True, kwargs=dict(timeout_s=2.0))
  code, out, err = outputs[0]
  detail = f"exit {code}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-4000:]}"
  assert code != 0, detail
  assert "jax_ep: dispatch timed out on rank 0 waiting for rank 1" in err, detail
