"""The cuda backend against the NumPy reference and the xla backend, on real GPUs.

Every multi-rank feature runs in up to three process models
(``jax_ep.multiprocess``):

- ``emulated``: R processes sharing GPU 0 (any machine with one GPU);
- ``one``: one process driving every local GPU, one rank per GPU (peer access);
- ``per-gpu``: R processes, process r on GPU r % G (CUDA IPC; with R > G
  several ranks share a GPU).

The last two need several GPUs and are skipped without them. Skipped entirely
where there is no NVIDIA GPU or the extension was built without CUDA. Start an
MPS daemon first to make the emulated runs fast (tools/gpu_check.sh does).
"""
import shutil
import subprocess

import pytest

from jax_ep import _ext
from jax_ep.multiprocess import launch


def _num_gpus():
  if not _ext.has_cuda() or shutil.which("nvidia-smi") is None:
    return 0
  res = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
  return len(res.stdout.splitlines()) if res.returncode == 0 else 0


NUM_GPUS = _num_gpus()
pytestmark = pytest.mark.skipif(NUM_GPUS == 0, reason="needs an NVIDIA GPU and a CUDA build")
GPU_ENV = {"JAX_PLATFORMS": "cuda", "JAX_EP_DEBUG_POISON": "1"}


def run(target, model, num_ranks, expect_failure=False, timeout_s=600, **kwargs):
  """Launch `target` as `num_ranks` ranks in a process model."""
  if model == "emulated":
    procs, gpus = num_ranks, 0
  elif model == "per-gpu":
    if NUM_GPUS < 2:
      pytest.skip("per-gpu needs several GPUs")
    procs, gpus = num_ranks, NUM_GPUS
  else:  # one process, every GPU
    if NUM_GPUS != num_ranks:
      pytest.skip(f"one process drives {NUM_GPUS} GPU(s), not {num_ranks} ranks")
    procs, gpus = 1, -1
  return launch(target, procs, env=GPU_ENV, gpus=gpus, kwargs=kwargs, timeout_s=timeout_s,
                expect_failure=expect_failure)


def ranks_checked(results):
  return sorted(r for res in results for r in res["ranks"])


CONTRACT = ([("bfloat16", m, r) for m, r in [("emulated", 1), ("emulated", 2), ("emulated", 4),
                                             ("emulated", 8), ("one", 2), ("per-gpu", 2),
                                             ("per-gpu", 4)]] +
            [("float32", m, r) for m, r in [("emulated", 1), ("emulated", 2), ("one", 2),
                                            ("per-gpu", 2)]])


@pytest.mark.parametrize("dtype,model,num_ranks", CONTRACT)
def test_contract(model, num_ranks, dtype):
  res = run("jax_ep.testing:check_contract", model, num_ranks, seed=num_ranks, dtype=dtype,
            num_tokens=96, hidden=128 + 64, num_topk=6, num_experts=4 * num_ranks)
  assert ranks_checked(res) == list(range(num_ranks))


@pytest.mark.parametrize("model,num_ranks", [("emulated", 1), ("emulated", 8), ("one", 2)])
def test_contract_with_overflow(model, num_ranks):
  res = run("jax_ep.testing:check_contract", model, num_ranks, seed=100 + num_ranks,
            num_tokens=40, hidden=64, num_topk=3, num_experts=2 * num_ranks,
            num_worst_tokens=37)
  routed = {k: v for r in res for k, v in r["num_recv_tokens"].items()}
  assert any(n > res[0]["capacity"] for n in routed.values()), "no rank overflowed"


@pytest.mark.parametrize("model,num_ranks", [("emulated", 4), ("one", 2)])
def test_large_hidden_and_topk_32(model, num_ranks):
  # 7168 f32 = 28 KB rows: several bulk copies per row.
  run("jax_ep.testing:check_contract", model, num_ranks, seed=7, num_tokens=33, hidden=7168,
      num_topk=32, num_experts=16 * num_ranks, dtype="float32", repeats=1)


@pytest.mark.parametrize("model,num_ranks", [("emulated", 1), ("one", 2)])
def test_cuda_matches_xla(model, num_ranks):
  res = run("jax_ep.testing:check_cuda_vs_xla", model, num_ranks, seed=3)
  assert res[0]["compared"] > 0 and res[0]["num_ranks"] == num_ranks


@pytest.mark.parametrize("mode", ["normal", "low_latency"])
@pytest.mark.parametrize("model", ["emulated", "one"])
def test_command_buffers_capture_and_match(model, mode):
  res = run("jax_ep.testing:check_command_buffers", model, 2, mode=mode)
  assert res[0]["captured_in_command_buffer"], res


@pytest.mark.parametrize("model,num_ranks,hidden", [("emulated", 2, 256), ("one", 2, 7168),
                                                   ("per-gpu", 2, 256), ("per-gpu", 4, 7168)])
def test_fp8_dispatch_moves_bytes_exactly(model, num_ranks, hidden):
  # Packed FP8 rows ride the bf16 kernels (264-byte rows padded to 272; 7392 not).
  res = run("jax_ep.testing:check_fp8_dispatch", model, num_ranks, hidden=hidden)
  assert ranks_checked(res) == list(range(num_ranks))


@pytest.mark.parametrize("model,num_ranks", [("emulated", 2), ("emulated", 4), ("one", 2),
                                             ("per-gpu", 2)])
def test_stale_row_bytes_never_pass_for_flags(model, num_ranks):
  # Flags sit where each op's shapes put them; bytes an earlier op left there
  # (laid out as flags of every small sequence number) must not pass for them.
  res = run("jax_ep.testing:check_stale_flags", model, num_ranks)
  assert ranks_checked(res) == list(range(num_ranks))


@pytest.mark.parametrize("model,num_ranks", [("emulated", 1), ("emulated", 2), ("one", 2)])
def test_layout_every_path_matches_reference(model, num_ranks):
  # get_dispatch_layout (XLA's fusions for small batches, the kernel for
  # large ones), and the kernel itself at every case: few or many blocks, with
  # shared- or global-memory histograms (ffi/layout.cu), each called twice.
  res = run("jax_ep.testing:check_layouts", model, num_ranks)
  assert ranks_checked(res) == list(range(num_ranks))
  assert all(r["paths"] == ["get_dispatch_layout", "layout kernel"] for r in res)
  assert all(r["checked"] == 16 * len(r["ranks"]) for r in res)


@pytest.mark.parametrize("model,num_ranks", [("one", 2), ("per-gpu", 4)])
def test_two_axes_contract(model, num_ranks):
  # Issue 13: (node 2, local 1) in one process (node hop on NCCL, local hop on
  # the one-rank kernels); four processes as (2, 2), rank (n, l) on GPU n (the
  # local hop over CUDA IPC on one GPU, the node hop across the two).
  res = run("jax_ep.testing:check_contract", model, num_ranks, nodes=2, dtype="float32",
            num_experts=4 * num_ranks)
  assert ranks_checked(res) == list(range(num_ranks))


LOW_LATENCY = [("emulated", 1), ("emulated", 2), ("emulated", 4), ("emulated", 8), ("one", 2),
               ("per-gpu", 2), ("per-gpu", 4)]


@pytest.mark.parametrize("model,num_ranks", LOW_LATENCY)
def test_low_latency_matches_reference(model, num_ranks):
  # bf16 + FP8, f32, drops past R*T rows, and (R <= 2) DeepEP's decode shape.
  res = run("jax_ep.testing:check_low_latency_cases", model, num_ranks)
  assert ranks_checked(res) == list(range(num_ranks))
  assert all(r["dropped"] for r in res), "no case dropped copies"


@pytest.mark.parametrize("command_buffers", [False, True])
def test_timeout_names_op_and_rank(command_buffers):
  outputs = run("jax_ep.testing:check_timeout", "emulated", 2, expect_failure=True,
                timeout_s=90, command_buffers=command_buffers)
  code, out, err = outputs[0]
  detail = f"exit {code}\n--- stdout ---\n{out[-2000:]}\n--- stderr ---\n{err[-4000:]}"
  assert code != 0, detail
  assert "jax_ep: dispatch timed out on rank 0 waiting for rank 1" in err, detail


def _messages(outputs):
  # stdout holds what the kernels printed (device printf) before trapping,
  # stderr what Python reported. Both count: with two processes sharing a GPU
  # without MPS, the process whose kernel trapped first can stay blocked in
  # XLA's block_until_ready until the launcher stops it, its kernel's message
  # printed but never reported by Python (seen on two H200s, 2026-11-26).
  return "\n".join(out + "\n" + err for _, out, err in outputs)


@pytest.mark.parametrize("model", ["emulated", "one"])
def test_ranks_running_different_ops_stop(model):
  outputs = run("jax_ep.testing:check_op_mismatch", model, 2, expect_failure=True,
                timeout_s=120)
  text = _messages(outputs)
  assert any(code != 0 for code, _, _ in outputs), text[-4000:]
  assert ("jax_ep: dispatch on rank 0 met combine from rank 1" in text or
          "jax_ep: combine on rank 1 met dispatch from rank 0" in text), text[-4000:]


def test_op_during_a_pending_receive_stops():
  outputs = run("jax_ep.testing:check_receive_pending", "emulated", 2, expect_failure=True,
                timeout_s=120)
  text = _messages(outputs)
  assert any(code != 0 for code, _, _ in outputs), text[-4000:]
  assert ("jax_ep: dispatch on rank 0: the low_latency_dispatch sent before it was not "
          "received yet" in text or "jax_ep: dispatch on rank 1: the low_latency_dispatch "
          "sent before it was not received yet" in text), text[-4000:]


def test_stale_layout_is_an_error():
  outputs = run("jax_ep.testing:check_stale_layout", "emulated", 2, expect_failure=True,
                timeout_s=120)
  text = _messages(outputs)
  assert outputs[0][0] != 0, text[-4000:]
  assert "jax_ep: dispatch on rank 0: the layout does not match topk_idx" in text, text[-4000:]


@pytest.mark.parametrize("command_buffers", [False, True])
def test_use_after_destroy_fails(command_buffers):
  outputs = run("jax_ep.testing:check_use_after_destroy", "emulated", 1, expect_failure=True,
                timeout_s=120, command_buffers=command_buffers)
  code, out, err = outputs[0]
  assert code != 0, err[-4000:]
  assert ("unknown buffer_id" in err or "used a Buffer after destroy()" in err), err[-4000:]
