"""Loading the compiled extension ``jax_ep._C`` and saying what it was built with."""
from __future__ import annotations

import functools


@functools.lru_cache(maxsize=None)
def load():
  """The extension module, or None when the package runs from an unbuilt tree."""
  try:
    from jax_ep import _C
  except ImportError:
    return None
  return _C


def load_required():
  """The extension module; a clear error when the package was not built."""
  c = load()
  if c is None:
    raise RuntimeError("jax_ep._C is missing: install the package with "
                       "`pip install --no-build-isolation .` (see README).")
  return c


def ensure_host_devices(count: int = 8) -> None:
  """Without a GPU, have XLA's CPU platform emulate ``count`` devices (ranks).

  Call before jax creates its backends (the first ``jax.devices()``); an
  ``XLA_FLAGS`` that already sets the count wins.
  """
  import os
  import subprocess
  try:
    has_gpu = subprocess.run(["nvidia-smi", "-L"], capture_output=True).returncode == 0
  except OSError:
    has_gpu = False
  flags = os.environ.get("XLA_FLAGS", "")
  if not has_gpu and "xla_force_host_platform_device_count" not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()


def has_cuda() -> bool:
  c = load()
  return bool(c is not None and c.build_info().get("cuda"))


def build_info() -> dict:
  """What this install of jax_ep was built with.

  Keys: ``extension`` (bool: ``jax_ep._C`` imported), ``cuda`` (CUDA kernels
  compiled in), ``cuda_runtime_version_built``, ``ffi_api_version`` (the XLA FFI
  headers' version), ``cuda_archs``, and the running ``jax`` version.
  """
  import jax
  c = load()
  info = {"extension": c is not None, "cuda": False, "jax": jax.__version__}
  if c is not None:
    info.update(c.build_info())
  return info
