"""Grouped matmuls for MoE experts, with every derivative a grouped matmul too.

Rows of ``x`` come grouped by expert (``group_sizes[g]`` consecutive rows for
expert ``g``, then padding rows). Three products cover an expert FFN and all
its derivatives:

- ``"nn"``: ``out[i] = a[i] @ b[g(i)]``     a ``[M,K]``, b ``[G,K,N]`` -> ``[M,N]``
- ``"nt"``: ``out[i] = a[i] @ b[g(i)].T``   a ``[M,N]``, b ``[G,K,N]`` -> ``[M,K]``
- ``"tn"``: ``out[g] = sum_{i in g} a[i].T b[i]``  a ``[M,K]``, b ``[M,N]`` -> ``[G,K,N]``

Each is bilinear, and its transpose in either factor is one of the others
(``nn``'s input gradient is ``nt``, its weight gradient ``tn``), so the three
close under differentiation: ``linear_call`` ties them together and forward
mode, reverse mode and higher orders all run the fast kernels.

Implementations (``impl``):
- ``"mosaic"``: JAX's Pallas Mosaic-GPU Hopper kernels,
  ``jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`` (``nn``, and ``nt`` via
  ``transpose_rhs``) and ``transposed_ragged_dot_mgpu`` (``tn``). bf16/f16
  operands, float32 accumulation, results rounded to the operand dtype.
- ``"ragged_dot"``: ``lax.ragged_dot`` / ``lax.ragged_dot_general``; runs
  everywhere. On GPUs XLA lowers it slowly and ``tn`` with large temporaries.
- ``"auto"``: ``"mosaic"`` where it runs (a Hopper GPU, a jax that ships the
  kernels, bf16/f16, shapes the tilings divide), else ``"ragged_dot"``.
  ``resolve_impl`` says which one a call gets.

Rows from ``sum(group_sizes)`` on are zero in the ``nn``/``nt`` results, as
with ``lax.ragged_dot`` (the Mosaic kernels leave them unwritten; a select
that XLA fuses into the consumer clears them).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import _ops
from jax_ep.linear import linear_call

IMPLS = ("auto", "ragged_dot", "mosaic")
MODES = ("nn", "nt", "tn")
_MOSAIC_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


# --------------------------------------------------------------------------
# Where the Mosaic kernels run, and with which tiles.

@functools.lru_cache(maxsize=None)
def _mosaic_modules():
  """(ragged_dot_mgpu, transposed_ragged_dot_mgpu), or the reason they are absent."""
  try:
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    from jax.experimental.pallas.ops.gpu import transposed_ragged_dot_mgpu
  except Exception as e:  # ImportError, or a jaxlib without Mosaic GPU.
    return None, f"this jax lacks the Mosaic GPU ragged-dot kernels ({e})"
  return (ragged_dot_mgpu, transposed_ragged_dot_mgpu), None


def mosaic_unavailable_reason(device=None) -> Optional[str]:
  """None when the Mosaic kernels can run on ``device`` (default: the first
  device of the default backend), else why not."""
  device = jax.devices()[0] if device is None else device
  if device.platform != "gpu":
    return f"the device is {device.platform}, not a GPU"
  cc = str(getattr(device, "compute_capability", ""))
  if cc != "9.0":  # wgmma: Hopper only (Blackwell has other kernels).
    return f"the GPU ({device.device_kind}, compute capability {cc or '?'}) is not Hopper"
  return _mosaic_modules()[1]


@dataclasses.dataclass(frozen=True)
class Tiling:
  """Tile sizes of one Mosaic kernel call (see the jax kernels' arguments)."""
  block_m: int
  block_n: int
  block_k: int
  max_concurrent_steps: int
  grid_block_n: int

  def as_kwargs(self) -> dict:
    return dataclasses.asdict(self)


# Candidates per mode, best first, from tools/gmm_sweep.py on an H100 (jax
# 0.11.2; E = 32 groups, H = 7168, F = 2048; benchmarks/RESULTS.md). The first
# one the shape admits is used. "small": at most 128 rows per group on average
# (decode), where wide, short tiles read the weights with fewer passes.
_TILINGS = {
    "nn": {"large": (Tiling(192, 128, 64, 4, 8), Tiling(128, 128, 64, 6, 4),
                     Tiling(64, 128, 64, 4, 1)),
           "small": (Tiling(64, 256, 64, 4, 4), Tiling(128, 128, 64, 6, 4),
                     Tiling(64, 128, 64, 4, 1))},
    "nt": {"large": (Tiling(192, 128, 64, 4, 8), Tiling(128, 128, 64, 6, 4),
                     Tiling(64, 128, 64, 4, 1)),
           "small": (Tiling(64, 128, 64, 6, 4), Tiling(64, 128, 64, 6, 1))},
    "tn": {"large": (Tiling(128, 128, 64, 4, 8), Tiling(128, 128, 64, 4, 1),
                     Tiling(64, 64, 64, 4, 1)),
           "small": (Tiling(128, 128, 64, 4, 8), Tiling(128, 128, 64, 4, 1),
                     Tiling(64, 64, 64, 4, 1))},
}
_tiling_override: dict = {}  # mode -> Tiling; the benchmark's sweep sets it.


def _dims(mode, a_shape, b_shape):
  """(rows, contracted, output columns) the kernel sees for ``mode``: nn
  contracts a's K with b [G,K,N]; nt contracts a's N with b [G,K,N]; tn
  contracts the rows and tiles the output [K, N] (k = a's K, n = b's N)."""
  return a_shape[0], a_shape[1], b_shape[2] if mode == "nn" else b_shape[1]


def _fits(mode, t: Tiling, m, k, n) -> bool:
  if mode in ("nn", "nt"):
    # k is contracted (whole blocks only); n is stored in whole tiles.
    return k % t.block_k == 0 and n % (t.block_n * t.grid_block_n) == 0
  # tn: the output [K, N] is tiled by (block_m, block_n); rows are masked.
  return k % t.block_m == 0 and n % t.block_n == 0


def pick_tiling(mode, a_shape, b_shape, num_groups) -> Optional[Tiling]:
  """The tiling the Mosaic kernel gets for these shapes, or None if none fits."""
  m, k, n = _dims(mode, a_shape, b_shape)
  if mode in _tiling_override:
    t = _tiling_override[mode]
    return t if _fits(mode, t, m, k, n) else None
  size = "small" if m <= 128 * num_groups else "large"
  for t in _TILINGS[mode][size]:
    if _fits(mode, t, m, k, n):
      return t
  return None


def resolve_impl(impl: str, mode: str, a, b, num_groups: int, device=None) -> str:
  """``"mosaic"`` or ``"ragged_dot"``: what ``impl`` means for this call.

  ``impl="mosaic"`` where the kernels cannot run is a ValueError naming why.
  """
  if impl not in IMPLS:
    raise ValueError(f"jax_ep.grouped_matmul: impl must be one of {IMPLS}, got {impl!r}.")
  if impl == "ragged_dot":
    return impl
  why = mosaic_unavailable_reason(device)
  if why is None and jnp.dtype(a.dtype) not in _MOSAIC_DTYPES:
    why = f"the operands are {jnp.dtype(a.dtype).name}; the kernels take bf16 or f16"
  if why is None and pick_tiling(mode, a.shape, b.shape, num_groups) is None:
    why = (f"no tiling divides the {mode} shapes {tuple(a.shape)} x {tuple(b.shape)} "
           f"(contracted and output sizes must be multiples of 64 or 128)")
  if why is None:
    return "mosaic"
  if impl == "mosaic":
    raise ValueError(f"jax_ep.grouped_matmul: impl='mosaic' cannot run: {why}.")
  return "ragged_dot"


# --------------------------------------------------------------------------
# The kernels behind each (impl, mode).

def _rows_below(out, group_sizes):
  """Zero the rows at or past ``sum(group_sizes)``."""
  total = jnp.sum(group_sizes)
  rows = lax.broadcasted_iota(jnp.int32, out.shape, 0)
  return jnp.where(rows < total, out, jnp.zeros((), out.dtype))


def _mosaic(mode, a, b, group_sizes, out_dtype):
  (ragged, transposed), _ = _mosaic_modules()
  tiling = pick_tiling(mode, a.shape, b.shape, group_sizes.shape[0])
  if tiling is None:  # A derivative whose shapes no tile divides.
    return _ragged_dot(mode, a, b, group_sizes, out_dtype)
  t = tiling.as_kwargs()
  rows = a.shape[0]
  pad = -rows % 8  # The kernels tile rows by 8; padding rows are in no group.
  if pad:
    a = jnp.pad(a, ((0, pad), (0, 0)))
    if mode == "tn":
      b = jnp.pad(b, ((0, pad), (0, 0)))
  if mode == "tn":
    out = transposed.transposed_ragged_dot(a, b, group_sizes=group_sizes, **t)
  else:
    out = ragged.ragged_dot(a, b, group_sizes=group_sizes,
                            transpose_rhs=(mode == "nt"), **t)
    out = _rows_below(out[:rows], group_sizes)
  # A Pallas kernel's result type omits shard_map's varying axes.
  return _ops.mark_varying(out.astype(out_dtype), (a, b, group_sizes))


def _ragged_dot(mode, a, b, group_sizes, out_dtype):
  if mode == "nn":
    return lax.ragged_dot(a, b, group_sizes, preferred_element_type=out_dtype)
  if mode == "nt":
    return lax.ragged_dot(a, jnp.swapaxes(b, 1, 2), group_sizes,
                          preferred_element_type=out_dtype)
  numbers = lax.RaggedDotDimensionNumbers(
      dot_dimension_numbers=(((0,), (0,)), ((), ())),
      lhs_ragged_dimensions=[0], rhs_group_dimensions=[])
  return lax.ragged_dot_general(a, b, group_sizes, numbers,
                                preferred_element_type=out_dtype)


_IMPLEMENTATIONS = {"mosaic": _mosaic, "ragged_dot": _ragged_dot}


# --------------------------------------------------------------------------
# The differentiable products.

@dataclasses.dataclass(frozen=True)
class _Spec:
  mode: str
  impl: str              # "mosaic" or "ragged_dot", resolved.
  compute_dtype: jnp.dtype  # Both factors are cast to it (cotangents included).
  out_dtype: jnp.dtype

  def derived(self, mode, out_dtype):
    return _Spec(mode, self.impl, self.compute_dtype, jnp.dtype(out_dtype))


# The transpose of each product in one factor, as another product: given the
# other factor and the output's cotangent, the factor's cotangent.
def _transpose_in_a(spec: _Spec, b, group_sizes, ct, a_dtype):
  if spec.mode == "nn":   # d a[i] = ct[i] @ b[g].T
    return _product(ct, b, group_sizes, spec.derived("nt", a_dtype))
  if spec.mode == "nt":   # d a[i] = ct[i] @ b[g]
    return _product(ct, b, group_sizes, spec.derived("nn", a_dtype))
  # tn: d a[i] = b[i] @ ct[g].T
  return _product(b, ct, group_sizes, spec.derived("nt", a_dtype))


def _transpose_in_b(spec: _Spec, a, group_sizes, ct, b_dtype):
  if spec.mode == "nn":   # d b[g] = sum a[i].T ct[i]
    return _product(a, ct, group_sizes, spec.derived("tn", b_dtype))
  if spec.mode == "nt":   # d b[g] = sum ct[i].T a[i]
    return _product(ct, a, group_sizes, spec.derived("tn", b_dtype))
  # tn: d b[i] = a[i] @ ct[g]
  return _product(a, ct, group_sizes, spec.derived("nn", b_dtype))


@functools.lru_cache(maxsize=None)
def _kernel(spec: _Spec):
  """The product for ``spec``; under ``vmap`` it runs once per batch member
  (neither ``lax.ragged_dot`` nor the Mosaic kernels batch every operand)."""
  impl = _IMPLEMENTATIONS[spec.impl]

  @jax.custom_batching.custom_vmap
  def kernel(a, b, group_sizes):
    cd = spec.compute_dtype
    return impl(spec.mode, a.astype(cd), b.astype(cd), group_sizes, spec.out_dtype)

  @kernel.def_vmap
  def _(axis_size, in_batched, a, b, group_sizes):
    batched = [x if flag else None for x, flag in zip((a, b, group_sizes), in_batched)]

    def one(members):
      args = [m if m is not None else x
              for m, x in zip(members, (a, b, group_sizes))]
      return kernel(*args)
    return lax.map(one, batched), True

  return kernel


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def _product(a, b, group_sizes, spec: _Spec):
  return _kernel(spec)(a, b, group_sizes)


def _product_jvp(spec, primals, tangents):
  a, b, group_sizes = primals
  da, db, _ = tangents
  out = _product(a, b, group_sizes, spec)
  terms = []
  if not isinstance(da, jax.custom_derivatives.SymbolicZero):
    terms.append(linear_call(
        lambda r, o: (_product(o[0], r[0], r[1], spec),),
        lambda r, c: (_transpose_in_a(spec, r[0], r[1], c[0], a.dtype),),
        (b, group_sizes), (da,))[0])
  if not isinstance(db, jax.custom_derivatives.SymbolicZero):
    terms.append(linear_call(
        lambda r, o: (_product(r[0], o[0], r[1], spec),),
        lambda r, c: (_transpose_in_b(spec, r[0], r[1], c[0], b.dtype),),
        (a, group_sizes), (db,))[0])
  if not terms:
    return out, jnp.zeros_like(out)
  return out, functools.reduce(lambda x, y: x + y, terms)


_product.defjvp(_product_jvp, symbolic_zeros=True)


def _check(name, a, b, group_sizes, a_rank, b_rank):
  if a.ndim != a_rank or b.ndim != b_rank:
    raise ValueError(f"jax_ep.{name}: expected ranks {a_rank} and {b_rank}, got "
                     f"{tuple(a.shape)} and {tuple(b.shape)}.")
  if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
    raise ValueError(f"jax_ep.{name}: group_sizes must be a 1-D integer array, got "
                     f"{group_sizes.dtype}{tuple(group_sizes.shape)}.")


def grouped_matmul(x, w, group_sizes, *, impl: str = "auto", transpose_w: bool = False,
                   preferred_element_type=None, device=None) -> jax.Array:
  """``out[i] = x[i] @ w[g(i)]``: ``x [M,K]`` grouped by ``group_sizes [G]``,
  ``w [G,K,N]``; rows past ``sum(group_sizes)`` are zero. Like
  ``lax.ragged_dot``, differentiable to any order in ``x`` and ``w``.

  ``transpose_w=True``: ``out[i] = x[i] @ w[g(i)].T`` with ``w [G,N,K]`` (the
  input gradient's product), without transposing ``w`` in memory.
  """
  _check("grouped_matmul", x, w, group_sizes, 2, 3)
  contracted = w.shape[2] if transpose_w else w.shape[1]
  if x.shape[1] != contracted or w.shape[0] != group_sizes.shape[0]:
    layout = "[M,K] x [G,N,K]" if transpose_w else "[M,K] x [G,K,N]"
    raise ValueError(f"jax_ep.grouped_matmul: x {tuple(x.shape)}, w {tuple(w.shape)} "
                     f"and group_sizes {tuple(group_sizes.shape)} do not fit "
                     f"{layout} with G groups.")
  return _call("nt" if transpose_w else "nn", x, w, group_sizes, impl,
               preferred_element_type, device)


def grouped_matmul_transposed(a, b, group_sizes, *, impl: str = "auto",
                              preferred_element_type=None, device=None) -> jax.Array:
  """``out[g] = sum_{i in group g} a[i].T @ b[i]``: ``a [M,K]``, ``b [M,N]``
  -> ``[G,K,N]`` (the weight gradient of ``grouped_matmul``)."""
  _check("grouped_matmul_transposed", a, b, group_sizes, 2, 2)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f"jax_ep.grouped_matmul_transposed: a {tuple(a.shape)} and b "
                     f"{tuple(b.shape)} must have the same rows.")
  return _call("tn", a, b, group_sizes, impl, preferred_element_type, device)


def _call(mode, a, b, group_sizes, impl, preferred_element_type, device):
  compute = jnp.promote_types(a.dtype, b.dtype)
  a, b = a.astype(compute), b.astype(compute)
  out_dtype = jnp.dtype(compute if preferred_element_type is None
                        else preferred_element_type)
  resolved = resolve_impl(impl, mode, a, b, group_sizes.shape[0], device)
  return _product(a, b, group_sizes.astype(jnp.int32),
                  _Spec(mode, resolved, jnp.dtype(compute), out_dtype))
