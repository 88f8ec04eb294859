"""Expert parallelism over two mesh axes ("node", "local"), in DeepEP's internode shape.

``Buffer(mesh, axis_name=("node", "local"))`` keeps the flat contract over the
``R = |node| * |local|`` ranks (rank ``n * L + l``, the order of
``lax.axis_index(("node", "local"))``), but moves rows in two hops:

- **node hop**: a token crosses the node axis once per destination node, to
  the rank with its own local index there (its *forwarder*), in a slot of ``F``
  rows per (source rank, destination node) pair (``num_worst_forward_tokens``;
  default ``N``, which cannot overflow). The home node's slot stays on the rank.
- **local hop**: the forwarder hands its rows over the local axis to the ranks
  of its node; each keeps the rows routed to it, in the flat receive order.
- combine goes back the same way: each forwarder sums its node's copies of a
  token (float32 accumulation, rounded to ``y``'s dtype) and sends one row per
  token back over the node hop; the home rank sums the nodes' partials.

Both hops are the xla backend's padded ``lax.all_to_all`` pieces (the node
axis is where XLA's collectives cross hosts: NCCL, DCN). A cuda local hop is
not built: see ``make``.

What differs from a flat Buffer, and only there: combine (so also the gradient
of dispatch) adds a token's copies per node first, then the nodes. Every
backend's combine adds a token's copies in pairwise rank order
(``xla.pairwise_sum``), and with a local axis of a power of two the per-node
sums are subtrees of that order: float32 results are bit-identical to the flat
Buffer's. In bfloat16 the node partials are rounded to bfloat16 for the node
hop (the one difference the contract allows). With a local axis that is not a
power of two the nodes do not line up with the tree, and float32 sums can
differ in their last bits. Everything else (rows, their order, ids, weights,
counts, the handle's flat leaves) is bit-identical while nothing overflows the
forwarding capacity.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import _ops
from jax_ep.backends.xla import (_broadcast_exchange, compute_layout, gather_rows,
                                 pairwise_sum, receive_metadata, send_positions)
from jax_ep.handles import DispatchHandle


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class HierarchicalDispatchHandle(DispatchHandle):
  """A ``DispatchHandle`` (the same four leaves, with the flat meaning) plus the
  routing of the two hops. ``Nn`` nodes, ``F`` the forwarding capacity.

  Overflow at either hop is counted: ``num_dropped_tokens`` is every routed
  token this rank did not keep, ``num_forward_dropped_tokens`` the part lost at
  the node hop. Every leaf has a leading axis, so the handle leaves and enters
  ``shard_map`` with ``P(("node", "local"))`` like the flat one.
  """

  forward_pos: jax.Array  # [N, Nn] int32: row of token i in its slot for node n, or -1.
  forward_src_idx: jax.Array  # [Nn, F] int32: as forwarder, source token of each row
  #                            received from node n (same local index), -1 = padding.
  recv_forward_pos: jax.Array  # [M] int32: each receive row's row in its slot, -1 = padding.
  num_arrived_tokens: jax.Array  # [1] int32: routed tokens that got past the node hop.

  @property
  def num_nodes(self) -> int:
    return self.forward_pos.shape[1]

  @property
  def forward_capacity(self) -> int:
    """``F``: rows per (source rank, destination node) slot of the node hop."""
    return self.forward_src_idx.shape[1]

  @property
  def num_forward_dropped_tokens(self) -> jax.Array:
    """Tokens routed to this rank lost at the node hop (slot past ``F``) ([] int32)."""
    return self.num_recv_tokens.reshape(()) - self.num_arrived_tokens.reshape(())

  @property
  def num_dropped_tokens(self) -> jax.Array:
    """Tokens routed to this rank that it did not receive, at either hop ([] int32)."""
    kept = jnp.minimum(self.num_arrived_tokens.reshape(()), self.capacity)
    return self.num_recv_tokens.reshape(()) - kept


def check_no_dropped(handle: HierarchicalDispatchHandle) -> None:
  """``check_no_dropped_tokens`` for a hierarchical handle: a check per hop."""
  from jax.experimental import checkify
  routed = handle.num_recv_tokens.reshape(())
  arrived = handle.num_arrived_tokens.reshape(())
  checkify.check(arrived == routed,
                 "jax_ep: {lost} of the {routed} tokens routed to this rank were dropped "
                 "at the node hop: num_worst_forward_tokens is {cap}.",
                 lost=routed - arrived, routed=routed,
                 cap=jnp.int32(handle.forward_capacity))
  checkify.check(arrived <= handle.capacity,
                 "jax_ep: {arrived} tokens reached this rank but num_worst_tokens is "
                 "{cap}; the excess was dropped.", arrived=arrived,
                 cap=jnp.int32(handle.capacity))


def make(mesh, axis_name, backend: str, is_nvidia_gpu: bool):
  """(axis_name tuple, R, backend object, backend name) for ``Buffer``; errors name
  the argument."""
  names = tuple(axis_name)
  if len(names) != 2 or len(set(names)) != 2 or not all(isinstance(a, str) for a in names):
    raise ValueError(f"jax_ep.Buffer: a tuple axis_name must name two different mesh "
                     f"axes, (node, local), got {axis_name!r}.")
  for a in names:
    if a not in mesh.axis_names:
      raise ValueError(f"jax_ep.Buffer: axis_name {a!r} (in {names!r}) is not an axis "
                       f"of the mesh (axes: {mesh.axis_names}).")
  if backend == "ragged":
    raise ValueError("jax_ep.Buffer: backend='ragged' is flat only; with "
                     f"axis_name={names!r} use backend='xla'.")
  if backend == "cuda" or (backend == "auto" and is_nvidia_gpu):
    # The design puts the local hop on our NVLink kernels; they dispatch
    # over one axis in the flat order, and the permutation into the two-axis
    # order is not written (nor tested on GPUs) yet. Refuse rather than run
    # something other than asked.
    raise ValueError(f"jax_ep.Buffer: backend={backend!r} with axis_name={names!r} "
                     "would run the local hop on the cuda backend, which is not built "
                     "yet; pass backend='xla' (both hops on XLA's collectives).")
  num_nodes, num_local = int(mesh.shape[names[0]]), int(mesh.shape[names[1]])
  return names, num_nodes * num_local, HierarchicalBackend(names, num_nodes, num_local), "xla"


def _take(a: jax.Array, src: jax.Array) -> jax.Array:
  """``a[src]`` for an index array of any shape, zero rows where ``src`` is -1."""
  if a.shape[0] == 0:
    return jnp.zeros(src.shape + a.shape[1:], a.dtype)
  rows = a[jnp.maximum(src, 0)]
  mask = (src >= 0).reshape(src.shape + (1,) * (a.ndim - 1))
  return jnp.where(mask, rows, jnp.zeros((), a.dtype))


class HierarchicalBackend:
  name = "xla"

  def __init__(self, axis_name: tuple, num_nodes: int, num_local: int):
    self.axis_name = axis_name
    self.node_axis, self.local_axis = axis_name
    self.num_nodes, self.num_local = num_nodes, num_local
    self.num_ranks = num_nodes * num_local

  def check_handle(self, handle, op: str) -> HierarchicalDispatchHandle:
    """The hop leaves of a handle ``_ops.check_handle`` already accepted."""
    if not isinstance(handle, HierarchicalDispatchHandle):
      raise TypeError(f"jax_ep.{op}: handle must come from this Buffer's dispatch "
                      f"(a HierarchicalDispatchHandle for axis_name={self.axis_name!r}), "
                      f"got {type(handle).__name__}.")
    N, M, Nn = handle.num_tokens, handle.capacity, self.num_nodes
    expected = {"forward_pos": (N, Nn), "recv_forward_pos": (M,), "num_arrived_tokens": (1,)}
    for field, shape in expected.items():
      got = tuple(getattr(handle, field).shape)
      if got != shape:
        raise ValueError(f"jax_ep.{op}: handle.{field} has shape {got}, expected {shape} "
                         f"(one rank's view: pass the handle into shard_map with "
                         f"in_specs=P({self.axis_name!r})).")
    got = tuple(handle.forward_src_idx.shape)
    if len(got) != 2 or got[0] != Nn:
      raise ValueError(f"jax_ep.{op}: handle.forward_src_idx has shape {got}, expected "
                       f"({Nn}, forward capacity).")
    return handle

  def layout(self, topk_idx, num_experts):
    return compute_layout(topk_idx, num_experts, self.num_ranks)

  # -- the two hops (data moves only through these) ----------------------------------
  def _node_hop(self, a, forward_pos, capacity):
    """Token rows ``a [N, ...]`` into slots ``[Nn, F, ...]`` by ``forward_pos``, sent to
    the same local index on every node: the result's slot n came from node n."""
    slots = self._slot_sources(forward_pos, capacity)
    return lax.all_to_all(_take(a, slots), self.node_axis, 0, 0)

  def _local_hop(self, forwarded):
    """Every forwarder's ``[Nn, F, ...]`` to every rank of its node, as ``[R, F, ...]``
    indexed by source rank ``n * L + l`` (the flat receive order)."""
    b = _broadcast_exchange(forwarded, self.num_local, self.local_axis)  # [L, Nn, F, ...]
    return jnp.swapaxes(b, 0, 1).reshape((self.num_ranks,) + b.shape[2:])

  def _slot_sources(self, forward_pos, capacity):
    """[Nn, F]: the token in each slot row, -1 for padding."""
    N, Nn = forward_pos.shape
    where = jnp.where(forward_pos >= 0, jnp.arange(Nn)[None, :] * capacity + forward_pos,
                      Nn * capacity)
    tokens = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, Nn))
    return jnp.full((Nn * capacity,), -1, jnp.int32).at[where.reshape(-1)].set(
        tokens.reshape(-1), mode="drop").reshape(Nn, capacity)

  def _deliver(self, a, handle):
    """``a [N, ...]`` of every rank to the receive rows of ``handle`` (cached dispatch)."""
    received = self._local_hop(self._node_hop(a, handle.forward_pos,
                                              handle.forward_capacity))
    return gather_rows(received, handle.recv_src_rank, handle.recv_forward_pos)

  # -- ops -----------------------------------------------------------------------------
  def dispatch(self, x, topk_idx, topk_weights, layout, num_experts, num_worst_tokens,
               num_worst_forward_tokens=None):
    Nn, L, R, M = self.num_nodes, self.num_local, self.num_ranks, num_worst_tokens
    N = x.shape[0]
    F = num_worst_forward_tokens or max(N, 1)  # a token goes to a node at most once
    experts_per_rank = num_experts // R
    me = lax.axis_index(self.axis_name)
    if layout is None:
      layout = self.layout(topk_idx, num_experts)
    is_in = layout.is_token_in_rank  # [N, R], R node-major

    # Node hop: one slot row per (token, destination node), in token order.
    to_node = is_in.reshape(N, Nn, L).any(axis=2)
    to_node_i32 = to_node.astype(jnp.int32)
    pos = jnp.cumsum(to_node_i32, axis=0) - to_node_i32
    forward_pos = jnp.where(to_node & (pos < F), pos, -1).astype(jnp.int32)
    forward_src_idx = lax.all_to_all(self._slot_sources(forward_pos, F), self.node_axis,
                                     0, 0)
    # What reaches each destination rank: rows are numbered as in the flat case
    # among the tokens that got past the node hop (all of them unless F overflows).
    arrives = is_in & jnp.repeat(forward_pos >= 0, L, axis=1)
    counts = lax.all_gather(jnp.stack([layout.num_tokens_per_rank,
                                       arrives.sum(axis=0, dtype=jnp.int32)]),
                            self.axis_name)  # [R(s), 2, R(d)]: routed, arriving
    send_pos = send_positions(arrives, counts[:, 1], me, M)
    num_recv_tokens = counts[:, 0, me].sum().astype(jnp.int32).reshape(1)

    # Local hop: the forwarders' rows and ids, indexed by (source rank, slot row).
    def hops(a):
      return self._local_hop(self._node_hop(a, forward_pos, F))

    src_idx = self._local_hop(forward_src_idx)  # [R, F]
    global_idx = hops(topk_idx)  # [R, F, K]
    valid_id = (global_idx >= 0) & (global_idx < num_experts)
    for_me = (src_idx >= 0) & (valid_id & (global_idx // experts_per_rank == me)).any(-1)
    came = for_me.reshape(-1)  # flat order: source rank, then token
    came_i32 = came.astype(jnp.int32)
    row = jnp.cumsum(came_i32) - came_i32
    target = jnp.where(came & (row < M), row, M)  # M: dropped
    src_rank = jnp.repeat(jnp.arange(R, dtype=jnp.int32), F)
    slot_row = jnp.tile(jnp.arange(F, dtype=jnp.int32), R)

    def scatter(values):
      return jnp.full((M,), -1, jnp.int32).at[target].set(values, mode="drop")

    handle = HierarchicalDispatchHandle(
        send_pos, scatter(src_idx.reshape(-1)), scatter(src_rank), num_recv_tokens,
        forward_pos, forward_src_idx, scatter(slot_row),
        came_i32.sum().astype(jnp.int32).reshape(1))

    recv_x = self._deliver(x, handle)
    recv_global = gather_rows(global_idx, handle.recv_src_rank, handle.recv_forward_pos)
    recv_w = (None if topk_weights is None else
              gather_rows(hops(topk_weights), handle.recv_src_rank, handle.recv_forward_pos))
    return (recv_x, *receive_metadata(recv_global, recv_w, handle.recv_src_rank, me,
                                      num_experts, R), handle)

  def cached_dispatch(self, x, weights, handle):
    recv_w = None if weights is None else self._deliver(weights, handle)
    return self._deliver(x, handle), recv_w

  def _send_back(self, rows, handle, out_dtype):
    """The transpose of ``_deliver``: rows back to their forwarders, summed per node
    there (float32, rounded to ``out_dtype`` for the node hop), then per token at home."""
    Nn, L, R = self.num_nodes, self.num_local, self.num_ranks
    F, N = handle.forward_capacity, handle.num_tokens
    src = handle.recv_src_rank
    # Row of (source rank n*L + l, slot row p) goes to local rank l, at [n, p].
    slot = jnp.where(src >= 0, (src % L) * (Nn * F) + (src // L) * F
                     + handle.recv_forward_pos, R * F)
    rest = rows.shape[1:]
    outgoing = jnp.zeros((R * F,) + rest, rows.dtype).at[slot].set(rows, mode="drop")
    back = lax.all_to_all(outgoing.reshape((L, Nn, F) + rest), self.local_axis, 0, 0)
    # The node's copies, then the nodes' partials, each in pairwise order: with
    # L a power of two that is the flat combine's tree, split at the nodes.
    partial = pairwise_sum([back[l].astype(jnp.float32) for l in range(L)])
    home = lax.all_to_all(partial.astype(out_dtype), self.node_axis, 0, 0)  # [Nn, F, ...]
    if N == 0:
      return jnp.zeros((N,) + rest, out_dtype)
    parts = [_take(home[n], handle.forward_pos[:, n]).astype(jnp.float32) for n in range(Nn)]
    return pairwise_sum(parts).astype(out_dtype)

  def combine(self, y, weights, handle):
    combined_w = None if weights is None else self._send_back(weights, handle,
                                                               jnp.float32)
    return self._send_back(y, handle, y.dtype), combined_w
