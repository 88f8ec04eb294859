"""Run N JAX processes as the N ranks of one mesh, on one machine.

Two process models: by default every process uses GPU 0 (N ranks emulated on
one GPU: how the CUDA backend is tested on a single GPU); with ``gpus=G``
rank r uses GPU r % G (one process per GPU when G == N, or several ranks per
GPU). ``jax.distributed.initialize`` joins the processes into one N-device
mesh, and the communication buffers are shared through CUDA IPC. (XLA's own NCCL
collectives refuse that setup, so references must be computed without them:
``jax_ep.testing`` rebuilds every rank's inputs from a seed.) With an MPS
daemon running the processes' kernels run concurrently; without it they
time-slice, which is slow but correct.

    results = launch("jax_ep.testing:check_contract", num_ranks=4,
                     kwargs=dict(seed=0))

The target ``"module:function"`` is called in every process as
``function(rank, num_ranks, **kwargs)`` after ``jax.distributed.initialize``;
its JSON-serialisable return value comes back in rank order.

Command line: ``python -m jax_ep.multiprocess --ranks 4 [--gpus 2] MODULE:FUNCTION [JSON_KWARGS]``.

Every process imports the same jax_ep as the launching one (its package
folder and its ``_C`` extension), whatever the interpreter would find by
itself: under ``bazel test`` that is the runfiles' build, not a pip copy.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time

_RESULT_TAG = "JAX_EP_RESULT:"
_IMPORT_FROM = "JAX_EP_IMPORT_FROM"  # env: {"package": dir, "extension": file or None}
# A child runs this file by path (it imports only the standard library at the
# top), pins jax_ep to the parent's files, then runs the worker. `-m
# jax_ep.multiprocess` would import jax_ep before anything could pin it.
_CHILD = ("import importlib.util, sys; "
          "spec = importlib.util.spec_from_file_location('_jax_ep_launcher', sys.argv[1]); "
          "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
          "sys.exit(m._child_main(sys.argv[2:]))")


class RankFailure(RuntimeError):
  """A rank process failed or timed out; carries every rank's output."""

  def __init__(self, message, outputs):
    super().__init__(message)
    self.outputs = outputs


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _parent_jax_ep() -> dict:
  """Where this process's jax_ep and its extension were imported from."""
  import jax_ep
  from jax_ep import _ext
  c = _ext.load()
  return {"package": os.path.dirname(os.path.abspath(jax_ep.__file__)),
          "extension": os.path.abspath(c.__file__) if c is not None else None}


class _ParentJaxEp:
  """A meta-path finder, first in line, that resolves ``jax_ep`` and its
  submodules to the parent's files. Putting the folder on PYTHONPATH would
  not do: an editable install's finder (a stale one included) comes first."""

  def __init__(self, package: str, extension):
    self.package, self.extension = package, extension

  def find_spec(self, name, path=None, target=None):
    if name == "jax_ep":
      return importlib.util.spec_from_file_location(
          name, os.path.join(self.package, "__init__.py"),
          submodule_search_locations=[self.package])
    if name == "jax_ep._C" and self.extension:
      return importlib.util.spec_from_file_location(name, self.extension)
    if name.startswith("jax_ep."):  # `path` is the parent package's, i.e. ours
      return importlib.machinery.PathFinder.find_spec(name, path)
    return None


def _child_main(argv) -> int:
  where = json.loads(os.environ.pop(_IMPORT_FROM))
  sys.meta_path.insert(0, _ParentJaxEp(where["package"], where["extension"]))
  return main(argv)


def launch(target: str, num_ranks: int, *, kwargs: dict | None = None,
           timeout_s: float = 600.0, env: dict | None = None,
           mem_fraction: float | None = None, expect_failure: bool = False,
           gpus: int = 0, grace_s: float | None = None):
  """Run ``target`` in ``num_ranks`` processes; return their results in rank order.

  ``gpus=0`` puts every process on GPU 0 (ranks emulated on one GPU);
  ``gpus=G`` puts process r on GPU r % G; ``gpus=-1`` gives every process every
  GPU (with one process: one process driving all GPUs, one rank per GPU).
  XLA's memory preallocation per process is ``mem_fraction`` of the GPU
  (default: shared evenly by the ranks on a GPU, at most 0.4).

  Fails fast: once one process exits non-zero the others get a short grace
  period to finish on their own (``grace_s``; ranks that fail too then print
  why, e.g. the rank whose error made the first one stop), and the rest are
  stopped (they would otherwise wait for it until some collective times out).
  Raises
  ``RankFailure`` (with every rank's stdout/stderr) when a process fails or the
  run passes ``timeout_s``. With ``expect_failure=True`` it returns the list of
  ``(returncode, stdout, stderr)`` instead of raising.
  """
  import tempfile
  port = _free_port()
  if mem_fraction is None:
    per_gpu = num_ranks if gpus == 0 else (1 if gpus < 0 else -(-num_ranks // gpus))
    mem_fraction = min(0.4, 0.6 / per_gpu)
  base_env = dict(os.environ)
  base_env.update({"XLA_PYTHON_CLIENT_MEM_FRACTION": str(mem_fraction),
                   "PYTHONUNBUFFERED": "1", _IMPORT_FROM: json.dumps(_parent_jax_ep())})
  base_env.update(env or {})
  with tempfile.TemporaryDirectory(prefix="jax_ep_ranks_") as logs:
    procs, files = [], []
    for rank in range(num_ranks):
      cmd = [sys.executable, "-c", _CHILD, os.path.abspath(__file__), "--worker",
             "--rank", str(rank), "--ranks", str(num_ranks), "--port", str(port),
             "--gpus", str(gpus), target, json.dumps(kwargs or {})]
      # Files, not pipes: a chatty rank can never block on a full pipe.
      out = open(os.path.join(logs, f"{rank}.out"), "w+")
      err = open(os.path.join(logs, f"{rank}.err"), "w+")
      files.append((out, err))
      procs.append(subprocess.Popen(cmd, env=base_env, stdout=out, stderr=err, text=True))
    if grace_s is None:
      grace_s = 20.0 if expect_failure else 3.0
    deadline = time.monotonic() + timeout_s
    timed_out, failed, stop_at = False, [], None
    while True:
      codes = [p.poll() for p in procs]
      failed = [r for r, c in enumerate(codes) if c not in (None, 0)]
      if all(c is not None for c in codes):
        break
      now = time.monotonic()
      if failed and stop_at is None:
        stop_at = now + grace_s
      if stop_at is not None and now > stop_at:
        break
      if now > deadline:
        timed_out = True
        break
      time.sleep(0.1)
    for p in procs:  # Stop the ranks still waiting for a failed or slow one.
      if p.poll() is None:
        p.kill()
      p.wait()
    outputs = []
    for p, (out, err) in zip(procs, files):
      out.seek(0)
      err.seek(0)
      outputs.append((p.returncode, out.read(), err.read()))
      out.close()
      err.close()
  if expect_failure:
    return outputs
  if timed_out or failed:
    detail = "\n".join(f"--- rank {r} (exit {code}) ---\n{out[-3000:]}\n{err[-6000:]}"
                       for r, (code, out, err) in enumerate(outputs))
    what = (f"timed out after {timeout_s:.0f} s" if timed_out else
            f"ranks {failed} failed (the others were stopped)")
    raise RankFailure(f"jax_ep.multiprocess: {target} on {num_ranks} ranks {what}.\n"
                      f"{detail}", outputs)
  results = []
  for out in (o for _, o, _ in outputs):
    lines = [l for l in out.splitlines() if l.startswith(_RESULT_TAG)]
    results.append(json.loads(lines[-1][len(_RESULT_TAG):]) if lines else None)
  return results


def _worker(rank: int, num_ranks: int, port: int, target: str, kwargs: dict,
            gpus: int = 0) -> None:
  import jax
  local = None if gpus < 0 else [rank % gpus if gpus else 0]
  jax.distributed.initialize(f"127.0.0.1:{port}", num_ranks, rank, local_device_ids=local)
  module, fn = target.split(":")
  try:
    result = getattr(importlib.import_module(module), fn)(rank, num_ranks, **kwargs)
  except BaseException:
    # Leave at once: the normal exit would wait in jax.distributed's shutdown
    # for ranks that may be waiting for us.
    import traceback
    traceback.print_exc()
    cuda = sys.modules.get("jax_ep.backends.cuda")
    message = cuda.fault_message() if cuda is not None else None
    if message:
      print(message, file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
  print(_RESULT_TAG + json.dumps(result), flush=True)
  jax.distributed.shutdown()


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_ep.multiprocess")
  ap.add_argument("--ranks", type=int, required=True)
  ap.add_argument("--rank", type=int)
  ap.add_argument("--port", type=int)
  ap.add_argument("--gpus", type=int, default=0,
                  help="G > 0: process r on GPU r %% G; 0: every process on GPU 0; "
                       "-1: every process sees every GPU")
  ap.add_argument("--worker", action="store_true")
  ap.add_argument("target")
  ap.add_argument("kwargs", nargs="?", default="{}")
  args = ap.parse_args(argv)
  kwargs = json.loads(args.kwargs)
  if args.worker:
    _worker(args.rank, args.ranks, args.port, args.target, kwargs, args.gpus)
    return 0
  for rank, result in enumerate(launch(args.target, args.ranks, kwargs=kwargs,
                                       gpus=args.gpus)):
    print(f"rank {rank}: {json.dumps(result)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
