"""Run N JAX processes as the N ranks of one mesh, on one machine.

This is how the CUDA backend is tested on a single GPU: every process sees the
same GPU, ``jax.distributed.initialize`` joins them into one N-device mesh,
and the communication buffers are shared through CUDA IPC. (XLA's own NCCL
collectives refuse that setup, so references must be computed without them:
``jax_ep.testing`` rebuilds every rank's inputs from a seed.) With an MPS
daemon running the processes' kernels run concurrently; without it they
time-slice, which is slow but correct.

    results = launch("jax_ep.testing:check_contract", num_ranks=4,
                     kwargs=dict(seed=0))

The target ``"module:function"`` is called in every process as
``function(rank, num_ranks, **kwargs)`` after ``jax.distributed.initialize``;
its JSON-serialisable return value comes back in rank order.

Command line: ``python -m jax_ep.multiprocess --ranks 4 MODULE:FUNCTION [JSON_KWARGS]``.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import socket
import subprocess
import sys
import time

_RESULT_TAG = "JAX_EP_RESULT:"


class RankFailure(RuntimeError):
  """A rank process failed or timed out; carries every rank's output."""

  def __init__(self, message, outputs):
    super().__init__(message)
    self.outputs = outputs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(target: str, num_ranks: int, *, kwargs: dict | None = None,
           timeout_s: float = 600.0, env: dict | None = None,
           mem_fraction: float = 0.08, expect_failure: bool = False):
  """Run ``target`` in ``num_ranks`` processes; return their results in rank order.

  Raises ``RankFailure`` (with every rank's stdout/stderr) when any process
  exits non-zero or the whole run passes ``timeout_s``. With
  ``expect_failure=True`` it returns the list of ``(returncode, stdout,
  stderr)`` instead of raising.
  """
  port = _free_port()
  base_env = dict(os.environ)
  base_env.update({"XLA_PYTHON_CLIENT_MEM_FRACTION": str(mem_fraction),
                   "PYTHONUNBUFFERED": "1"})
  base_env.update(env or {})
  procs = []
  for rank in range(num_ranks):
    cmd = [sys.executable, "-m", "jax_ep.multiprocess", "--worker",
           "--rank", str(rank), "--ranks", str(num_ranks), "--port", str(port),
           target, json.dumps(kwargs or {})]
    procs.append(subprocess.Popen(cmd, env=base_env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  deadline = time.monotonic() + timeout_s
  outputs, timed_out = [], False
  for p in procs:
    try:
      out, err = p.communicate(timeout=max(deadline - time.monotonic(), 1))
    except subprocess.TimeoutExpired:
      timed_out = True
      for q in procs:
        q.kill()
      out, err = p.communicate()
    outputs.append((p.returncode, out, err))
  if expect_failure:
    return outputs
  failed = [r for r, (code, _, _) in enumerate(outputs) if code != 0]
  if timed_out or failed:
    detail = "\n".join(f"--- rank {r} (exit {code}) ---\n{out[-3000:]}\n{err[-6000:]}"
                       for r, (code, out, err) in enumerate(outputs))
    what = "timed out" if timed_out else f"ranks {failed} failed"
    raise RankFailure(f"jax_ep.multiprocess: {target} on {num_ranks} ranks {what}.\n"
                      f"{detail}", outputs)
  results = []
  for out in (o for _, o, _ in outputs):
    lines = [l for l in out.splitlines() if l.startswith(_RESULT_TAG)]
    results.append(json.loads(lines[-1][len(_RESULT_TAG):]) if lines else None)
  return results


def _worker(rank: int, num_ranks: int, port: int, target: str, kwargs: dict) -> None:
  import jax
  jax.distributed.initialize(f"127.0.0.1:{port}", num_ranks, rank,
                             local_device_ids=[0])
  module, fn = target.split(":")
  result = getattr(importlib.import_module(module), fn)(rank, num_ranks, **kwargs)
  print(_RESULT_TAG + json.dumps(result), flush=True)
  jax.distributed.shutdown()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_ep.multiprocess")
  ap.add_argument("--ranks", type=int, required=True)
  ap.add_argument("--rank", type=int)
  ap.add_argument("--port", type=int)
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("target")
  ap.add_argument("kwargs", nargs="?", default="{}")
  args = ap.parse_args(argv)
  kwargs = json.loads(args.kwargs)
  if args.worker:
    _worker(args.rank, args.ranks, args.port, args.target, kwargs)
    return 0
  for rank, result in enumerate(launch(args.target, args.ranks, kwargs=kwargs)):
    print(f"rank {rank}: {json.dumps(result)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
