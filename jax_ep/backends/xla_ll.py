"""The low-latency ops on ``lax.all_to_all``: the portable path and the oracle.

Design (per rank, ``R`` ranks, ``T`` tokens at most, ``K`` slots a token):

- **Dispatch** sends each rank's whole padded token block ``[T, H]`` (and its
  ``[T, K]`` ids) to every rank: one ``all_to_all`` of ``[R, T, H]``. That is
  the smallest fixed-shape buffer that carries any routing (a token may need
  every rank); one slot per ``(token, k)`` (``[R, T*K, H]``) or per
  ``(expert, token)`` (``[R, E_local, T, H]``) would multiply the bytes by
  ``K`` or ``E_local`` for nothing. The receiver then expands the block into
  one copy per local ``(token, k)``, grouped by local expert: a local gather,
  HBM traffic instead of network traffic. Rows past an expert's count are
  whatever the gather reads (a real token's row): the contract leaves them
  unspecified, so nothing is spent zeroing them.
- **Combine** weights and sums a token's local copies on the expert's rank
  first, in float32, and sends that one ``[T, H]`` float32 partial sum back
  per rank pair (an ``all_to_all`` of ``[R, T, H]``); the home rank adds the
  ``R`` partial sums in rank order. Float32 on the wire (twice bf16) keeps the
  whole sum in float32, as the contract asks; per-copy rows would be ``K``
  times the bytes. Rows of ``y`` past the counts are never selected (a select,
  not a multiply, so NaN or Inf there cannot leak).

Each op is split in two halves, the collective (``*_send``) and the local work
after it (``*_recv``), which the ``return_recv_hook`` form exposes.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep.handles import LowLatencyHandle


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyDispatchState:
  """What a split dispatch has in flight: every rank's padded rows and ids."""

  rows: jax.Array  # [R, T, W]: row block of each source rank.
  ids: jax.Array   # [R, T, K] int32: its global expert ids (-1 = none).


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyCombineState:
  """What a split combine has in flight: each expert rank's partial sums."""

  partial: jax.Array  # [R, T, H] float32: from rank d, the sum of its weighted copies.


def _exchange(a, axis_name):
  return lax.all_to_all(a, axis_name, split_axis=0, concat_axis=0)


def _pad_rows(a, rows, value):
  extra = rows - a.shape[0]
  if extra == 0:
    return a
  return jnp.concatenate([a, jnp.full((extra,) + a.shape[1:], value, a.dtype)])


class XlaLowLatency:
  """``low_latency_dispatch`` / ``low_latency_combine`` for the xla backend."""

  name = "xla"

  def __init__(self, axis_name: str, num_ranks: int):
    self.axis_name = axis_name
    self.num_ranks = num_ranks

  def _broadcast(self, a):
    """``a [T, ...]`` to every rank; result ``[R, T, ...]``, row s from rank s."""
    R = self.num_ranks
    return _exchange(jnp.broadcast_to(a[None], (R,) + a.shape), self.axis_name)

  # -- dispatch ------------------------------------------------------------------
  def dispatch_send(self, rows, topk_idx, num_max_tokens, num_experts=None, split=0):
    """Issue the exchange of ``rows [N, W]`` (any dtype) and ``topk_idx [N, K]``
    (every rank gets every row, so ``num_experts`` is not needed; FP8 rows,
    ``split`` = H, arrive packed and ``dispatch_recv`` takes them apart)."""
    T = num_max_tokens
    return LowLatencyDispatchState(self._broadcast(_pad_rows(rows, T, 0)),
                                   self._broadcast(_pad_rows(topk_idx, T, -1)))

  def routing(self, ids, num_experts) -> LowLatencyHandle:
    """Receive rows of each local expert from every rank's ids ``[R, T, K]``."""
    R, T, K = ids.shape
    El = num_experts // R
    S, rows = R * T * K, R * T
    me = lax.axis_index(self.axis_name)
    ids = ids.reshape(S)
    here = (ids >= 0) & (ids < num_experts) & (ids // El == me)
    expert = jnp.where(here, ids - me * El, El)  # El: not for this rank
    # Row of each slot in its expert's list: the number of earlier slots of that
    # expert, slots taken in (source rank, token, k) order.
    onehot = (expert[:, None] == jnp.arange(El)).astype(jnp.int32)  # [S, El]
    before = jnp.cumsum(onehot, axis=0) - onehot
    pos = jnp.take_along_axis(before, jnp.minimum(expert, El - 1)[:, None], 1)[:, 0]
    # More than R*T copies for one expert can only come from an id repeated
    # within a token's row; the copies past R*T rows are dropped.
    keep = here & (pos < rows)
    flat = jnp.where(keep, expert * rows + pos, El * rows)
    src_slot = jnp.full((El * rows,), -1, jnp.int32).at[flat].set(
        jnp.arange(S, dtype=jnp.int32), mode="drop")
    recv_count = jnp.minimum(onehot.sum(0), rows).astype(jnp.int32)
    recv_slot = jnp.where(keep, flat, -1).astype(jnp.int32).reshape(rows, K)
    return LowLatencyHandle(src_slot.reshape(El, rows), recv_slot, recv_count)

  def dispatch_recv(self, state: LowLatencyDispatchState, num_experts, split=0):
    """``(recv [E_local, R*T, W], recv_count [E_local], handle)`` from the exchange.
    ``split`` = H: the rows are FP8 rows packed by ``fp8.pack_rows``, and
    ``recv`` is ``(values [.., H] float8_e4m3fn, scales [.., H/128] float32)``."""
    R, T, W = state.rows.shape
    K = state.ids.shape[2]
    handle = self.routing(state.ids, num_experts)
    # Rows past the count read row 0: unspecified by the contract, not zeroed.
    src_row = jnp.maximum(handle.src_slot, 0) // K
    recv = state.rows.reshape(R * T, W)[src_row]
    if split:
      from jax_ep import fp8
      recv = fp8.unpack_rows(recv, split)
    return recv, handle.recv_count, handle

  def dispatch(self, rows, topk_idx, num_max_tokens, num_experts, split=0):
    return self.dispatch_recv(self.dispatch_send(rows, topk_idx, num_max_tokens), num_experts,
                              split)

  def cached_dispatch(self, x, handle: LowLatencyHandle, weights=None, topk_idx=None):
    """Dispatch ``x [N, H]`` along ``handle`` with rows past the counts zero; with
    ``weights [N, K]`` each copy of ``(token, k)`` is scaled by ``weights[i, k]``.
    (``topk_idx``, the dispatch's, is for backends that send only where needed.)

    The exact transpose of ``combine`` (hence zeroed padding): autodiff uses it.
    """
    R = self.num_ranks
    rows, K = handle.recv_slot.shape
    T = rows // R
    X = self._broadcast(_pad_rows(x, T, 0)).reshape(rows, x.shape[1])
    valid = (handle.src_slot >= 0)[..., None]
    slot = jnp.maximum(handle.src_slot, 0)
    picked = X[slot // K]
    if weights is None:
      return jnp.where(valid, picked, jnp.zeros((), x.dtype))
    Wt = self._broadcast(_pad_rows(weights, T, 0.0)).reshape(rows * K)
    out = Wt[slot][..., None] * picked.astype(jnp.float32)
    return jnp.where(valid, out, 0.0).astype(x.dtype)

  # -- combine -------------------------------------------------------------------
  def combine_send(self, y, handle: LowLatencyHandle, weights=None):
    """Weight and sum each received token's copies here, in float32, and issue
    the exchange that brings the partial sums home."""
    R = self.num_ranks
    El, rows, H = y.shape
    K = handle.recv_slot.shape[1]
    T = rows // R
    flat_y = y.reshape(El * rows, H)
    Wt = None
    if weights is not None:
      Wt = self._broadcast(_pad_rows(weights, T, 0.0)).reshape(rows, K)
    partial = jnp.zeros((rows, H), jnp.float32)
    for k in range(K):  # K gathers of [R*T, H]; no [R*T, K, H] temporary.
      slot = handle.recv_slot[:, k]
      row = flat_y[jnp.maximum(slot, 0)].astype(jnp.float32)
      if Wt is not None:
        row = Wt[:, k:k + 1] * row
      partial = partial + jnp.where((slot >= 0)[:, None], row, 0.0)
    return LowLatencyCombineState(_exchange(partial.reshape(R, T, H), self.axis_name))

  def combine_recv(self, state: LowLatencyCombineState, num_tokens, dtype):
    """Sum the partial sums of every rank (in rank order) for this rank's tokens."""
    back = state.partial
    total = back[0, :num_tokens]
    for d in range(1, back.shape[0]):
      total = total + back[d, :num_tokens]
    return total.astype(dtype)

  def combine(self, y, handle, weights, num_tokens):
    return self.combine_recv(self.combine_send(y, handle, weights), num_tokens, y.dtype)
