"""A baseline backend on ``lax.ragged_all_to_all``, written the way a JAX user would.

Each rank packs one copy of every token per destination rank into a send
buffer grouped by destination, exchanges the per-rank counts (``all_gather``),
and moves exactly the routed rows with ``ragged_all_to_all`` (rows and their
top-k metadata); combine sends every received row back the same way and sums
the copies of each token at home. No padding crosses the link, unlike the
``xla`` backend; the price is the ragged collective itself.

It is a benchmark baseline (``python -m jax_ep.bench`` times it as the
``ragged`` row), not a recommended backend: XLA:CPU does not implement
``ragged_all_to_all``, and on GPUs XLA's implementation is slow (see
``benchmarks/RESULTS.md``). Results follow the contract of ``docs/design.md``
exactly, like every backend.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep.backends.xla import compute_layout, pairwise_sum, receive_metadata
from jax_ep.handles import DispatchHandle


def _exclusive_cumsum(a, axis=0):
  return jnp.cumsum(a, axis=axis) - a


class RaggedBackend:
  name = "ragged"

  def __init__(self, axis_name: str, num_ranks: int):
    self.axis_name = axis_name
    self.num_ranks = num_ranks

  def layout(self, topk_idx, num_experts):
    return compute_layout(topk_idx, num_experts, self.num_ranks)

  # -- the exchange ---------------------------------------------------------------
  def _plan(self, kept_per_destination, capacity):
    """Offsets and sizes of one exchange from this rank's per-destination row counts.

    Returns (counts [S, D] of every rank, send_start [D], output_offsets [D],
    send_sizes [D], recv_offsets [S], recv_sizes [S]), with sizes clamped so
    nothing lands past ``capacity`` rows at a receiver.
    """
    me = lax.axis_index(self.axis_name)
    counts = lax.all_gather(kept_per_destination, self.axis_name)  # [S, D]
    before = _exclusive_cumsum(counts, axis=0)  # rows of lower sources, per destination
    send_start = _exclusive_cumsum(kept_per_destination)
    output_offsets = before[me]
    send_sizes = jnp.clip(kept_per_destination, 0, jnp.maximum(capacity - output_offsets, 0))
    recv_offsets = before[:, me]
    recv_sizes = jnp.clip(counts[:, me], 0, jnp.maximum(capacity - recv_offsets, 0))
    return counts, send_start, output_offsets, send_sizes, recv_offsets, recv_sizes

  def _exchange(self, send, capacity, send_start, send_sizes, output_offsets, recv_sizes):
    out = jnp.zeros((capacity,) + send.shape[1:], send.dtype)
    i32 = lambda a: a.astype(jnp.int32)
    return lax.ragged_all_to_all(send, out, i32(send_start), i32(send_sizes),
                                 i32(output_offsets), i32(recv_sizes),
                                 axis_name=self.axis_name)

  @staticmethod
  def _pack(rows, slot, num_slots):
    """Send buffer [num_slots, ...]: rows[i] at slot[i, d] for every d (-1: none)."""
    N, R = slot.shape
    index = jnp.where(slot >= 0, slot, num_slots).reshape(-1)
    token = jnp.broadcast_to(jnp.arange(N)[:, None], (N, R)).reshape(-1)
    token_of_slot = jnp.zeros((num_slots,), jnp.int32).at[index].set(token, mode="drop")
    return rows[token_of_slot]

  def _kept(self, send_pos):
    """Per destination: the slot of each kept token in this rank's send buffer."""
    kept = send_pos >= 0
    per_destination = kept.sum(axis=0, dtype=jnp.int32)
    rank_in_destination = _exclusive_cumsum(kept.astype(jnp.int32), axis=0)
    slot = jnp.where(kept, _exclusive_cumsum(per_destination)[None, :] + rank_in_destination, -1)
    return per_destination, slot

  # -- ops ------------------------------------------------------------------------
  def dispatch(self, x, topk_idx, topk_weights, layout, num_experts, num_worst_tokens):
    R, M, axis = self.num_ranks, num_worst_tokens, self.axis_name
    N, K = topk_idx.shape
    me = lax.axis_index(axis)
    if layout is None:
      layout = self.layout(topk_idx, num_experts)
    in_rank = layout.is_token_in_rank
    counts = lax.all_gather(layout.num_tokens_per_rank, axis)  # [S, D]
    rank_in_destination = _exclusive_cumsum(in_rank.astype(jnp.int32), axis=0)
    pos = _exclusive_cumsum(counts, axis=0)[me][None, :] + rank_in_destination
    send_pos = jnp.where(in_rank & (pos < M), pos, -1).astype(jnp.int32)
    kept, slot = self._kept(send_pos)
    _, send_start, out_off, send_sizes, _, recv_sizes = self._plan(kept, M)
    # Metadata travels with each row: global expert ids, weights (as bits), token.
    weights = (topk_weights if topk_weights is not None
               else jnp.zeros(topk_idx.shape, jnp.float32))
    meta = jnp.concatenate([topk_idx, lax.bitcast_convert_type(weights, jnp.int32),
                            jnp.arange(N, dtype=jnp.int32)[:, None]], axis=1)
    exchange = lambda rows: self._exchange(self._pack(rows, slot, N * R), M, send_start,
                                           send_sizes, out_off, recv_sizes)
    recv_x, recv_meta = exchange(x), exchange(meta)
    num_recv = counts[:, me].sum().astype(jnp.int32)
    valid = jnp.arange(M) < jnp.minimum(num_recv, M)
    # Source rank of receive row r: the sources' row ranges are consecutive.
    recv_ends = jnp.cumsum(counts[:, me])
    src_rank = jnp.searchsorted(recv_ends, jnp.arange(M), side="right").astype(jnp.int32)
    handle = DispatchHandle(send_pos, jnp.where(valid, recv_meta[:, 2 * K], -1),
                            jnp.where(valid, src_rank, -1), num_recv.reshape(1))
    recv_x = jnp.where(valid[:, None], recv_x, jnp.zeros((), recv_x.dtype))
    recv_w = (None if topk_weights is None else
              lax.bitcast_convert_type(recv_meta[:, K:2 * K], jnp.float32))
    return (recv_x, *receive_metadata(recv_meta[:, :K], recv_w, handle.recv_src_rank, me,
                                      num_experts, R), handle)

  def cached_dispatch(self, x, weights, handle):
    M = handle.capacity
    kept, slot = self._kept(handle.send_pos)
    _, send_start, out_off, send_sizes, _, recv_sizes = self._plan(kept, M)
    valid = handle.recv_src_rank >= 0
    exchange = lambda rows: jnp.where(
        valid.reshape((M,) + (1,) * (rows.ndim - 1)),
        self._exchange(self._pack(rows, slot, slot.size), M, send_start, send_sizes, out_off,
                       recv_sizes), jnp.zeros((), rows.dtype))
    return exchange(x), (exchange(weights) if weights is not None else None)

  def _send_back(self, rows, handle, out_dtype):
    """Row r returns to its token's home; each token's copies are summed in float32."""
    R, N, M = self.num_ranks, handle.num_tokens, handle.capacity
    kept, slot = self._kept(handle.send_pos)
    counts, send_start, out_off, _, recv_off, recv_sizes = self._plan(kept, M)
    me = lax.axis_index(self.axis_name)
    # Reverse exchange: our rows from source s go back into its send layout.
    back = lax.ragged_all_to_all(
        rows, jnp.zeros((N * R,) + rows.shape[1:], rows.dtype), recv_off.astype(jnp.int32),
        recv_sizes.astype(jnp.int32), _exclusive_cumsum(counts, axis=1)[:, me].astype(jnp.int32),
        jnp.minimum(kept, jnp.maximum(M - out_off, 0)).astype(jnp.int32),
        axis_name=self.axis_name)
    copies = []
    for d in range(R):
      copy = back[jnp.maximum(slot[:, d], 0)].astype(jnp.float32)
      keep = (slot[:, d] >= 0).reshape((N,) + (1,) * (rows.ndim - 1))
      copies.append(jnp.where(keep, copy, 0.0))
    # In pairwise rank order, as the other backends add them.
    return pairwise_sum(copies).astype(out_dtype)

  def combine(self, y, weights, handle):
    combined_x = self._send_back(y, handle, y.dtype)
    combined_w = None
    if weights is not None:
      combined_w = self._send_back(weights, handle, jnp.float32)
    return combined_x, combined_w
