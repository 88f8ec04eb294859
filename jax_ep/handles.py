"""Pytrees that carry dispatch state through jit, shard_map and scan.

Both are registered dataclasses whose leaves are all jax arrays, so they can be
returned from jitted functions, stored in a carry, or passed to ``combine`` in
a different jitted function. Every backend produces the same handle; the
meaning of each leaf is fixed by ``docs/design.md``.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchLayout:
  """Where each token goes, as ``get_dispatch_layout`` computes it.

  Unpacks in the documented order:
  ``num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank = layout``.
  """

  num_tokens_per_rank: jax.Array  # [R] int32: tokens this rank sends to rank d.
  num_tokens_per_expert: jax.Array  # [E] int32: (token, k) slots per expert.
  is_token_in_rank: jax.Array  # [N, R] bool: token i goes to rank d.

  def __iter__(self):
    return iter((self.num_tokens_per_rank, self.num_tokens_per_expert,
                 self.is_token_in_rank))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DispatchHandle:
  """The routing of one dispatch, reused by ``combine`` and cached dispatch.

  ``N`` is the number of local tokens, ``R`` the number of ranks and ``M`` the
  receive capacity (``num_worst_tokens``). Every leaf has a leading axis, so
  the handle leaves ``shard_map`` with ``out_specs=P(axis)`` (stacked over the
  ranks: ``num_recv_tokens`` becomes ``[R]``) and comes back into another
  ``shard_map`` with ``in_specs=P(axis)``. The properties describe one rank's
  view: use them inside ``shard_map``.
  """

  send_pos: jax.Array  # [N, R] int32: row of token i on rank d, or -1.
  recv_src_idx: jax.Array  # [M] int32: source token of each row, -1 = padding.
  recv_src_rank: jax.Array  # [M] int32: source rank of each row, -1 = padding.
  num_recv_tokens: jax.Array  # [1] int32: tokens routed here (may exceed M).

  @property
  def num_tokens(self) -> int:
    return self.send_pos.shape[0]

  @property
  def num_ranks(self) -> int:
    return self.send_pos.shape[1]

  @property
  def capacity(self) -> int:
    """``M``: rows in the receive buffers."""
    return self.recv_src_idx.shape[0]

  @property
  def num_dropped_tokens(self) -> jax.Array:
    """Tokens routed to this rank that did not fit in ``M`` rows ([] int32).

    Dropped tokens are not received, and ``combine`` counts them as zero.
    """
    return jnp.maximum(self.num_recv_tokens.reshape(()) - self.capacity, 0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowLatencyHandle:
  """The routing of one ``low_latency_dispatch``, reused by ``low_latency_combine``.

  ``R`` ranks, ``T = num_max_dispatch_tokens_per_rank``, ``K`` top-k slots,
  ``E_local`` experts on this rank. A "slot" is one ``(source rank s, source
  token i, k)`` triple, numbered ``(s * T + i) * K + k``. Every leaf has a
  leading axis, so the handle leaves ``shard_map`` with ``out_specs=P(axis)``
  and comes back with ``in_specs=P(axis)``; the properties describe one rank's
  view.
  """

  src_slot: jax.Array    # [E_local, R*T] int32: slot of receive row (e, r), -1 past the count.
  recv_slot: jax.Array   # [R*T, K] int32: flat row e*R*T + r of slot (s, i, k) here, or -1.
  recv_count: jax.Array  # [E_local] int32: rows of each local expert.

  @property
  def num_local_experts(self) -> int:
    return self.src_slot.shape[0]

  @property
  def num_rows(self) -> int:
    """``R * T``: rows per local expert in ``recv_x``."""
    return self.src_slot.shape[1]

  @property
  def num_topk(self) -> int:
    return self.recv_slot.shape[1]
