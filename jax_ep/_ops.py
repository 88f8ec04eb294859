"""Argument checks and autodiff around a backend's per-rank ops.

Checks run at trace time and raise ValueError/TypeError naming the argument.
Autodiff follows DeepEP's pairing, made exact with custom_vjp so every backend
inherits it: the cotangent of dispatch is a combine, the cotangent of combine
(and of cached dispatch's inverse) is a cached dispatch. The backward rules call
the public wrapped ops, so higher-order derivatives work too.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep.handles import DispatchHandle, DispatchLayout

_DATA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# --------------------------------------------------------------------------
# Trace-time checks.

def check_axis(axis_name: str, num_ranks: int, op: str) -> None:
  try:
    size = lax.axis_size(axis_name)
  except NameError:
    raise ValueError(
        f"jax_ep.{op} must be called inside jax.shard_map over the mesh axis "
        f"{axis_name!r} of the Buffer (axis {axis_name!r} is not bound here)."
    ) from None
  if size != num_ranks:
    raise ValueError(
        f"jax_ep.{op}: axis {axis_name!r} has size {size} here but the Buffer "
        f"was made for {num_ranks} ranks.")


def check_static_int(value, name: str, op: str, minimum: int) -> int:
  """``value`` as an int if it is a static Python int >= ``minimum``; else an
  error naming ``name`` (floats such as 2.0 included: they fail deep in lax)."""
  if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
    raise TypeError(f"jax_ep.{op}: {name} must be a static Python int, got "
                    f"{type(value).__name__}.")
  if value < minimum:
    raise ValueError(f"jax_ep.{op}: {name} must be >= {minimum}, got {value}.")
  return int(value)


def check_num_experts(num_experts, num_ranks: int, op: str) -> int:
  num_experts = check_static_int(num_experts, "num_experts", op, 1)
  if num_experts % num_ranks:
    raise ValueError(f"jax_ep.{op}: num_experts={num_experts} is not divisible "
                     f"by the number of ranks {num_ranks}.")
  return num_experts


def check_num_worst_tokens(num_worst_tokens, num_tokens: int, num_ranks: int,
                           op: str) -> int:
  if num_worst_tokens is None:
    return num_tokens * num_ranks  # Can never overflow.
  return check_static_int(num_worst_tokens, "num_worst_tokens", op, 1)


def _shape_of(a, name: str, op: str):
  if not hasattr(a, "shape") or not hasattr(a, "dtype"):
    raise TypeError(f"jax_ep.{op}: {name} must be an array, got {type(a).__name__}.")
  return tuple(a.shape)


def check_x(x, op: str, name: str = "x"):
  shape = _shape_of(x, name, op)
  if len(shape) != 2:
    raise ValueError(f"jax_ep.{op}: {name} must have shape [num_tokens, hidden], "
                     f"got {shape}.")
  if jnp.dtype(x.dtype) not in _DATA_DTYPES:
    raise TypeError(f"jax_ep.{op}: {name} must be bfloat16 or float32, got {x.dtype}.")
  return x


def check_topk_idx(topk_idx, num_tokens: int, num_experts: int, op: str):
  shape = _shape_of(topk_idx, "topk_idx", op)
  if len(shape) != 2 or shape[0] != num_tokens:
    raise ValueError(f"jax_ep.{op}: topk_idx must have shape [{num_tokens}, num_topk] "
                     f"to match x, got {shape}.")
  if shape[1] < 1:
    raise ValueError(f"jax_ep.{op}: topk_idx needs at least one column.")
  if not jnp.issubdtype(topk_idx.dtype, jnp.integer):
    raise TypeError(f"jax_ep.{op}: topk_idx must be int32 or int64, got {topk_idx.dtype}.")
  # Out-of-range ids become -1 before the cast, so an int64 id can never wrap
  # into a valid int32 one.
  valid = (topk_idx >= 0) & (topk_idx < num_experts)
  return jnp.where(valid, topk_idx, -1).astype(jnp.int32)


def check_weights(weights, shape_expected, op: str, name: str):
  if weights is None:
    return None
  shape = _shape_of(weights, name, op)
  if shape != tuple(shape_expected):
    raise ValueError(f"jax_ep.{op}: {name} must have shape {tuple(shape_expected)}, "
                     f"got {shape}.")
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    raise TypeError(f"jax_ep.{op}: {name} must be a float array, got {weights.dtype}.")
  return weights.astype(jnp.float32)


def check_layout(layout, num_tokens: int, num_ranks: int, num_experts: int, op: str):
  if not isinstance(layout, DispatchLayout):
    raise TypeError(f"jax_ep.{op}: layout must be the DispatchLayout returned by "
                    f"get_dispatch_layout, got {type(layout).__name__}.")
  expected = {"num_tokens_per_rank": (num_ranks,),
              "num_tokens_per_expert": (num_experts,),
              "is_token_in_rank": (num_tokens, num_ranks)}
  for field, shape in expected.items():
    got = tuple(getattr(layout, field).shape)
    if got != shape:
      raise ValueError(f"jax_ep.{op}: layout.{field} has shape {got}, expected "
                       f"{shape} for these inputs.")
  return layout


def check_handle(handle, num_ranks: int, op: str, *, num_tokens=None,
                 capacity=None) -> DispatchHandle:
  if not isinstance(handle, DispatchHandle):
    raise TypeError(f"jax_ep.{op}: handle must be the DispatchHandle returned by "
                    f"dispatch, got {type(handle).__name__}.")
  leaves = {"send_pos": 2, "recv_src_idx": 1, "recv_src_rank": 1, "num_recv_tokens": 1}
  for field, ndim in leaves.items():
    shape = tuple(getattr(getattr(handle, field), "shape", ()))
    if len(shape) != ndim or (field == "num_recv_tokens" and shape != (1,)):
      raise ValueError(
          f"jax_ep.{op}: handle.{field} has shape {shape}, not one rank's view; pass "
          f"the handle into shard_map with in_specs=P(axis), as it left with "
          f"out_specs=P(axis).")
  if handle.recv_src_rank.shape != handle.recv_src_idx.shape:
    raise ValueError(f"jax_ep.{op}: handle.recv_src_rank has shape "
                     f"{handle.recv_src_rank.shape} but handle.recv_src_idx "
                     f"{handle.recv_src_idx.shape}.")
  if handle.num_ranks != num_ranks:
    raise ValueError(f"jax_ep.{op}: handle was made for {handle.num_ranks} ranks, "
                     f"this Buffer has {num_ranks}.")
  if num_tokens is not None and handle.num_tokens != num_tokens:
    raise ValueError(f"jax_ep.{op}: x has {num_tokens} tokens but the handle was "
                     f"made for {handle.num_tokens}.")
  if capacity is not None and handle.capacity != capacity:
    raise ValueError(f"jax_ep.{op}: y has {capacity} rows but the handle's receive "
                     f"capacity (num_worst_tokens) is {handle.capacity}.")
  return handle


# --------------------------------------------------------------------------
# Differentiable ops. `backend` and the static ints are closed over; the
# custom_vjp functions see arrays (and None) only. They are cached on the
# backend object (not in a global cache, which would keep every Buffer and its
# GPU memory alive), so repeated traces reuse one function per configuration.

def _cached_on(backend, key, make):
  cache = backend.__dict__.setdefault("_jax_ep_op_cache", {})
  if key not in cache:
    cache[key] = make()
  return cache[key]


def _dispatch_fn(backend, num_experts: int, num_worst_tokens: int):
  return _cached_on(backend, ("dispatch", num_experts, num_worst_tokens),
                    lambda: _make_dispatch(backend, num_experts, num_worst_tokens))


def _make_dispatch(backend, num_experts: int, num_worst_tokens: int):

  @jax.custom_vjp
  def dispatch(x, topk_idx, topk_weights, layout):
    return backend.dispatch(x, topk_idx, topk_weights, layout, num_experts,
                            num_worst_tokens)

  def fwd(x, topk_idx, topk_weights, layout):
    out = dispatch(x, topk_idx, topk_weights, layout)
    recv_topk_idx, handle = out[1], out[4]
    return out, (recv_topk_idx, handle)

  def bwd(residuals, cotangents):
    recv_topk_idx, handle = residuals
    ct_x, _, ct_w, _, _ = cotangents
    if ct_w is not None:
      # Only kept slots carried a weight forward.
      ct_w = jnp.where(recv_topk_idx >= 0, ct_w, 0.0)
    grad_x, grad_w = combine(backend, ct_x, handle, ct_w)
    return grad_x, None, grad_w, None

  dispatch.defvjp(fwd, bwd)
  return dispatch


def _cached_dispatch_fn(backend):
  return _cached_on(backend, ("cached_dispatch",), lambda: _make_cached_dispatch(backend))


def _make_cached_dispatch(backend):

  @jax.custom_vjp
  def cached(x, handle, weights):
    return backend.cached_dispatch(x, weights, handle)

  def fwd(x, handle, weights):
    return cached(x, handle, weights), handle

  def bwd(handle, cotangents):
    ct_x, ct_w = cotangents
    grad_x, grad_w = combine(backend, ct_x, handle, ct_w)
    return grad_x, None, grad_w

  cached.defvjp(fwd, bwd)
  return cached


def _combine_fn(backend):
  return _cached_on(backend, ("combine",), lambda: _make_combine(backend))


def _make_combine(backend):

  @jax.custom_vjp
  def combine_(y, handle, weights):
    return backend.combine(y, weights, handle)

  def fwd(y, handle, weights):
    return combine_(y, handle, weights), handle

  def bwd(handle, cotangents):
    ct_x, ct_w = cotangents
    grad_y, grad_w = cached_dispatch(backend, ct_x, handle, ct_w)
    return grad_y, None, grad_w

  combine_.defvjp(fwd, bwd)
  return combine_


def dispatch(backend, x, topk_idx, topk_weights, layout, num_experts,
             num_worst_tokens):
  return _dispatch_fn(backend, num_experts, num_worst_tokens)(
      x, topk_idx, topk_weights, layout)


def cached_dispatch(backend, x, handle, weights=None):
  return _cached_dispatch_fn(backend)(x, handle, weights)


def combine(backend, y, handle, weights=None):
  return _combine_fn(backend)(y, handle, weights)
