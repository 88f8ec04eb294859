"""The portable backend: pure JAX on ``lax.all_to_all``.

Every rank sends every token to every rank (one padded slot of ``N`` rows per
rank pair: the capacity-padding scheme JAX users write by hand), then compacts
what it received into the contract's order. It runs wherever XLA runs, serves
as the oracle for the CUDA backend and is the baseline that backend must beat.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep.handles import DispatchHandle, DispatchLayout


def compute_layout(topk_idx: jax.Array, num_experts: int,
                   num_ranks: int) -> DispatchLayout:
  """Local routing summary; pure jnp, shared by every backend's fallback."""
  experts_per_rank = num_experts // num_ranks
  valid = (topk_idx >= 0) & (topk_idx < num_experts)
  dest = jnp.where(valid, topk_idx // experts_per_rank, -1)
  is_token_in_rank = (dest[:, :, None] == jnp.arange(num_ranks)).any(axis=1)
  num_tokens_per_rank = is_token_in_rank.sum(axis=0, dtype=jnp.int32)
  # Invalid ids map to index E, which mode="drop" discards.
  slot_expert = jnp.where(valid, topk_idx, num_experts).reshape(-1)
  num_tokens_per_expert = jnp.zeros((num_experts,), jnp.int32).at[
      slot_expert].add(1, mode="drop")
  return DispatchLayout(num_tokens_per_rank, num_tokens_per_expert,
                        is_token_in_rank)


def _exchange(per_destination: jax.Array, axis_name: str) -> jax.Array:
  """[R, ...] with row d meant for rank d -> [R, ...] with row s from rank s."""
  return lax.all_to_all(per_destination, axis_name, split_axis=0,
                        concat_axis=0)


def _broadcast_exchange(a: jax.Array, num_ranks: int,
                        axis_name: str) -> jax.Array:
  """Send all of ``a`` [N, ...] to every rank: result [R, N, ...], row s = rank s's."""
  return _exchange(jnp.broadcast_to(a[None], (num_ranks,) + a.shape), axis_name)


def _gather_rows(received: jax.Array, handle: DispatchHandle) -> jax.Array:
  """Pick each receive row out of the [R, N, ...] exchange result; zero padding."""
  return gather_rows(received, handle.recv_src_rank, handle.recv_src_idx)


def gather_rows(received: jax.Array, src_rank: jax.Array, src_row: jax.Array) -> jax.Array:
  """Row ``received[src_rank[r], src_row[r]]`` for each r, zero where src_rank is -1."""
  num_ranks, num_tokens = received.shape[:2]
  if num_tokens == 0:  # Nothing was sent anywhere (and XLA cannot gather from 0 rows).
    return jnp.zeros(src_row.shape + received.shape[2:], received.dtype)
  flat = received.reshape((num_ranks * num_tokens,) + received.shape[2:])
  valid = src_rank >= 0
  index = jnp.where(valid, src_rank * num_tokens + src_row, 0)
  rows = flat[index]
  mask = valid.reshape(valid.shape + (1,) * (rows.ndim - 1))
  return jnp.where(mask, rows, jnp.zeros((), rows.dtype))


def pairwise_sum(terms):
  """Sum a list of equally shaped arrays in the order of a balanced binary tree
  over its positions, padded with zeros to a power of two:
  ``((t0 + t1) + (t2 + t3)) + ((t4 + t5) + ...)``.

  Combine adds a token's copies in this order over the ranks (every backend;
  an absent copy is a zero). A block of 2^k ranks starting at a multiple of
  2^k is then a subtree, so a two-axis Buffer that sums each node's copies
  first, then the nodes' partial sums in this order, adds exactly the same
  floats in exactly the same way as the flat Buffer (issue 13) when its local
  axis is a power of two.
  """
  terms = list(terms)
  while len(terms) > 1:
    if len(terms) % 2:
      terms.append(jnp.zeros_like(terms[0]))
    terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
  return terms[0]


def receive_metadata(recv_global_idx, recv_weights, recv_src_rank, me, num_experts: int,
                     num_ranks: int):
  """What dispatch returns beside the rows, from the received rows' global ids
  ``[M, K]`` (and weights, or None): ``recv_topk_idx`` (local expert ids of
  this rank's experts, else -1), ``recv_topk_weights`` (the matching weights,
  else 0; None without weights) and ``num_recv_tokens_per_expert`` (kept
  (row, k) slots per local expert). Padding rows (``recv_src_rank`` -1) count
  for nothing."""
  experts_per_rank = num_experts // num_ranks
  keep = ((recv_src_rank >= 0)[:, None] & (recv_global_idx >= 0)
          & (recv_global_idx < num_experts) & (recv_global_idx // experts_per_rank == me))
  local_idx = recv_global_idx - me * experts_per_rank
  recv_topk_idx = jnp.where(keep, local_idx, -1).astype(jnp.int32)
  recv_topk_weights = None
  if recv_weights is not None:
    recv_topk_weights = jnp.where(keep, recv_weights, 0.0).astype(jnp.float32)
  slot_expert = jnp.where(keep, local_idx, experts_per_rank).reshape(-1)
  counts = jnp.zeros((experts_per_rank,), jnp.int32).at[slot_expert].add(1, mode="drop")
  return recv_topk_idx, recv_topk_weights, counts


def send_positions(is_in: jax.Array, counts: jax.Array, me, capacity: int) -> jax.Array:
  """``send_pos`` [N, R]: the receive row of each (token, destination) this rank
  sends (``is_in``), given ``counts[s, d]`` of every rank; -1 past ``capacity``."""
  rows_before_source = jnp.cumsum(counts, axis=0) - counts  # [R(s), R(d)]
  is_in_i32 = is_in.astype(jnp.int32)
  rank_in_destination = jnp.cumsum(is_in_i32, axis=0) - is_in_i32  # [N, R]
  pos = rows_before_source[me][None, :] + rank_in_destination
  return jnp.where(is_in & (pos < capacity), pos, -1).astype(jnp.int32)


class XlaBackend:
  name = "xla"

  def __init__(self, axis_name: str, num_ranks: int):
    self.axis_name = axis_name
    self.num_ranks = num_ranks

  def layout(self, topk_idx, num_experts):
    return compute_layout(topk_idx, num_experts, self.num_ranks)

  def dispatch(self, x, topk_idx, topk_weights, layout, num_experts,
               num_worst_tokens):
    R, M, axis = self.num_ranks, num_worst_tokens, self.axis_name
    N = x.shape[0]
    me = lax.axis_index(axis)
    if layout is None:
      layout = self.layout(topk_idx, num_experts)
    is_in = layout.is_token_in_rank

    # counts[s, d]: tokens rank s sends to rank d.
    counts = lax.all_gather(layout.num_tokens_per_rank, axis)
    send_pos = send_positions(is_in, counts, me, M)
    num_recv_tokens = counts[:, me].sum().astype(jnp.int32).reshape(1)

    # Receive side: which (source rank, source token) fills each row.
    came_from = _exchange(is_in.T, axis)  # [R(s), N]: token i of s is for me
    came_i32 = came_from.astype(jnp.int32)
    recv_counts = counts[:, me]
    row = (jnp.cumsum(recv_counts) - recv_counts)[:, None] + (
        jnp.cumsum(came_i32, axis=1) - came_i32)
    target = jnp.where(came_from & (row < M), row, M).reshape(-1)  # M: dropped
    src_rank = jnp.repeat(jnp.arange(R, dtype=jnp.int32), N)
    src_idx = jnp.tile(jnp.arange(N, dtype=jnp.int32), R)
    recv_src_rank = jnp.full((M,), -1, jnp.int32).at[target].set(src_rank, mode="drop")
    recv_src_idx = jnp.full((M,), -1, jnp.int32).at[target].set(src_idx, mode="drop")
    handle = DispatchHandle(send_pos, recv_src_idx, recv_src_rank, num_recv_tokens)

    recv_x = _gather_rows(_broadcast_exchange(x, R, axis), handle)
    global_idx = _gather_rows(_broadcast_exchange(topk_idx, R, axis), handle)
    recv_w = (None if topk_weights is None else
              _gather_rows(_broadcast_exchange(topk_weights, R, axis), handle))
    return (recv_x, *receive_metadata(global_idx, recv_w, handle.recv_src_rank, me,
                                      num_experts, R), handle)

  def cached_dispatch(self, x, weights, handle):
    R, axis = self.num_ranks, self.axis_name
    recv_x = _gather_rows(_broadcast_exchange(x, R, axis), handle)
    recv_w = None
    if weights is not None:
      recv_w = _gather_rows(_broadcast_exchange(weights, R, axis), handle)
    return recv_x, recv_w

  def _send_back(self, rows, handle, accumulate_dtype, out_dtype):
    """Row r goes to slot (src_idx) of rank src_rank; sum the R copies of each token."""
    R, N = self.num_ranks, handle.num_tokens
    valid = handle.recv_src_rank >= 0
    slot = jnp.where(valid, handle.recv_src_rank * N + handle.recv_src_idx, R * N)
    outgoing = jnp.zeros((R * N,) + rows.shape[1:], rows.dtype).at[slot].set(
        rows, mode="drop")
    back = _exchange(outgoing.reshape((R, N) + rows.shape[1:]), self.axis_name)
    # The copies in pairwise rank order (see pairwise_sum), as the CUDA reduce adds them.
    total = pairwise_sum([back[d].astype(accumulate_dtype) for d in range(R)])
    return total.astype(out_dtype)

  def combine(self, y, weights, handle):
    combined_x = self._send_back(y, handle, jnp.float32, y.dtype)
    combined_w = None
    if weights is not None:
      combined_w = self._send_back(weights, handle, jnp.float32, jnp.float32)
    return combined_x, combined_w
