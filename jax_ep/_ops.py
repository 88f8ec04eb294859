"""Argument checks and autodiff around a backend's per-rank ops.

Checks run at trace time and raise ValueError/TypeError naming the argument.
Autodiff follows DeepEP's pairing, made exact on ``jax_ep.linear.linear_call``
so every backend inherits it: the cotangent of dispatch (and of cached
dispatch) is a combine, the cotangent of combine is a cached dispatch, and a
tangent goes through the same op as the data. Forward and reverse mode, every
order, and vmap of either work.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from jax_ep.handles import DispatchHandle, DispatchLayout
from jax_ep.linear import linear_call

_DATA_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32))


# --------------------------------------------------------------------------
# Typing the results of opaque kernels inside shard_map.

def varying_axes(a) -> frozenset:
  """Mesh axes a value inside shard_map varies over (JAX's manual axis type)."""
  t = jax.typeof(a)
  manual = getattr(t, "manual_axis_type", None)
  if manual is not None:
    return frozenset(manual.varying)
  return frozenset(getattr(t, "vma", ()))


def mark_varying(out, inputs, axes=()):
  """``out`` marked varying over ``axes`` and every axis an input varies over.

  An ffi_call's or a Pallas kernel's result type says nothing about varying
  axes, yet it differs per rank like its inputs, and autodiff inside shard_map
  checks that cotangents are typed like their primals.
  """
  want = frozenset(axes).union(*(varying_axes(a) for a in inputs))
  missing = tuple(sorted(want - varying_axes(out)))
  return lax.pcast(out, missing, to="varying") if missing else out


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
# Differentiable ops, on jax_ep.linear.linear_call.
#
# Cached dispatch and combine are linear in their data (rows and weights) for
# a fixed handle, and each is the other's transpose: each is one linear_call,
# so jvp applies the op to the tangent, grad applies the other op, and every
# order of either works. Dispatch also computes the routing (not linear, and in
# the same kernel as the rows), so it is a custom_jvp whose tangent is a cached
# dispatch of the tangent (a linear_call): reverse mode transposes that into
# one combine, as before, and the forward pass is still one dispatch.
#
# `backend` and the static ints are closed over. The functions are cached on
# the backend object (not in a global cache, which would keep every Buffer and
# its GPU memory alive), so repeated traces reuse one per configuration.

def _cached_on(backend, key, make):
  cache = backend.__dict__.setdefault("_jax_ep_op_cache", {})
  if key not in cache:
    cache[key] = make()
  return cache[key]


def _leaves(handle: DispatchHandle) -> tuple:
  # Every leaf: a backend's handle may carry more than DispatchHandle's four
  # (the hierarchical backend's hop routing).
  return tuple(jax.tree_util.tree_leaves(handle))


def _send_and_back(backend, weighted: bool, masked: bool, handle_tree):
  """(cached dispatch, combine) as linear maps for linear_call, each the other's
  transpose. Residuals: the handle's leaves (``handle_tree`` rebuilds it), then
  with ``masked`` the receive ids: a weight arrives only in slots of a local
  expert (dispatch's weights)."""
  def make():
    num_leaves = handle_tree.num_leaves

    def split(residuals, operands):
      handle = jax.tree_util.tree_unflatten(handle_tree, residuals[:num_leaves])
      weights = operands[1] if weighted else None
      if masked and weighted:
        weights_mask = residuals[num_leaves] >= 0
      else:
        weights_mask = None
      return handle, operands[0], weights, weights_mask

    def send(residuals, operands):
      handle, x, w, mask = split(residuals, operands)
      recv_x, recv_w = backend.cached_dispatch(x, w, handle)
      if mask is not None:
        recv_w = jnp.where(mask, recv_w, 0.0)
      return (recv_x,) if w is None else (recv_x, recv_w)

    def back(residuals, operands):
      handle, y, w, mask = split(residuals, operands)
      if mask is not None:
        w = jnp.where(mask, w, 0.0)
      out, out_w = backend.combine(y, w, handle)
      return (out,) if w is None else (out, out_w)

    return send, back
  return _cached_on(backend, ("send_and_back", weighted, masked, handle_tree), make)


def _float0_zeros(tree):
  """Tangents of integer outputs: symbolic zeros, typed like the outputs
  (inside shard_map that includes the axes they vary over)."""
  return jax.tree_util.tree_map(
      lambda a: jax.custom_derivatives.SymbolicZero(jax.typeof(a).to_tangent_aval()), tree)


def _is_zero(tangent) -> bool:
  return tangent is None or isinstance(tangent, jax.custom_derivatives.SymbolicZero)


def _dispatch_fn(backend, num_experts: int, num_worst_tokens: int, options: tuple):
  return _cached_on(backend, ("dispatch", num_experts, num_worst_tokens, options),
                    lambda: _make_dispatch(backend, num_experts, num_worst_tokens,
                                           dict(options)))


def _make_dispatch(backend, num_experts: int, num_worst_tokens: int, options: dict):

  @jax.custom_jvp
  def dispatch(x, topk_idx, topk_weights, layout):
    return backend.dispatch(x, topk_idx, topk_weights, layout, num_experts,
                            num_worst_tokens, **options)

  def jvp(primals, tangents):
    x, _, topk_weights, _ = primals
    x_dot, _, w_dot, _ = tangents
    out = dispatch(*primals)
    recv_x, recv_topk_idx, recv_w, counts, handle = out
    weighted = topk_weights is not None and not _is_zero(w_dot)
    if _is_zero(x_dot) and not weighted:
      t_x, t_w = jnp.zeros_like(recv_x), None
    else:
      # A zero x tangent with a live weight tangent still rides along: the
      # rows and weights move in one op, as in the primal.
      x_dot = jnp.zeros_like(x) if _is_zero(x_dot) else x_dot
      send, back = _send_and_back(backend, weighted, True,
                                  jax.tree_util.tree_structure(handle))
      t = linear_call(send, back, _leaves(handle) + (recv_topk_idx,),
                      (x_dot, w_dot) if weighted else (x_dot,))
      t_x, t_w = t[0], (t[1] if weighted else None)
    if recv_w is not None and t_w is None:
      t_w = jnp.zeros_like(recv_w)
    return out, (t_x, _float0_zeros(recv_topk_idx), t_w, _float0_zeros(counts),
                 _float0_zeros(handle))

  dispatch.defjvp(jvp, symbolic_zeros=True)
  return dispatch


def dispatch(backend, x, topk_idx, topk_weights, layout, num_experts,
             num_worst_tokens, **options):
  """``options``: static keyword arguments of this backend's dispatch (the
  hierarchical backend's ``num_worst_forward_tokens``)."""
  return _dispatch_fn(backend, num_experts, num_worst_tokens,
                      tuple(sorted(options.items())))(
      x, topk_idx, topk_weights, layout)


def cached_dispatch(backend, x, handle, weights=None):
  send, back = _send_and_back(backend, weights is not None, False,
                              jax.tree_util.tree_structure(handle))
  out = linear_call(send, back, _leaves(handle),
                    (x,) if weights is None else (x, weights))
  return out[0], (None if weights is None else out[1])


def combine(backend, y, handle, weights=None):
  send, back = _send_and_back(backend, weights is not None, False,
                              jax.tree_util.tree_structure(handle))
  out = linear_call(back, send, _leaves(handle),
                    (y,) if weights is None else (y, weights))
  return out[0], (None if weights is None else out[1])
