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
