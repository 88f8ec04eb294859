"""Expert parallelism over two mesh axes ("node", "local"), in DeepEP's internode shape.

``Buffer(mesh, axis_name=("node", "local"))`` keeps the flat contract over the
``R = |node| * |local|`` ranks (rank ``n * L + l``, the order of
``lax.axis_index(("node", "local"))``), but moves rows in two hops:

- **node hop**: a token crosses the node axis once per destination node, to
  the rank with its own local index there (its *forwarder*), in a slot of ``F``
  rows per (source rank, destination node) pair (``num_worst_forward_tokens``;
  default ``N``, which cannot overflow). The home node's slot stays on the rank.
- **local hop**: a flat dispatch over the local axis, by the flat backend of
  that axis (``self.local``: the cuda backend on NVIDIA GPUs, else xla). The
  forwarder's ``Nn * F`` slot rows are its tokens, their experts on this node
  (renumbered from 0) their routing; the receiver then puts the rows that
  arrived in the flat receive order (source rank ``n * L + l``, then token),
  which the local dispatch's order (local source ``l``, then node ``n``)
  is not: one gather.
- combine goes back the same way: the local hop's combine sums the node's
  copies of a token (float32 accumulation, rounded to ``y``'s dtype) on the
  forwarder, which sends one row per token back over the node hop; the home
  rank sums the nodes' partials.

The node hop is the xla backend's padded ``lax.all_to_all`` (the node axis is
where XLA's collectives cross hosts: NCCL, DCN).

What differs from a flat Buffer, and only there: combine (so also the gradient
of dispatch) adds a token's copies per node first, then the nodes. Every
backend's combine adds a token's copies in pairwise rank order
(``xla.pairwise_sum``; the local hop's combine over the local ranks is such a
sum), and with a local axis of a power of two the per-node sums are subtrees
of that order: float32 results are bit-identical to the flat Buffer's. In bfloat16 the node partials are rounded to bfloat16 for the node
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
from jax_ep.backends.xla import (XlaBackend, compute_layout, pairwise_sum, receive_metadata,
                                 send_positions)
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
  num_arrived_tokens: jax.Array  # [1] int32: routed tokens that got past the node hop.
  # The local hop: the flat handle of the dispatch over the local axis (its
  # tokens are the forwarder's Nn * F slot rows, its capacity L * Nn * F), and
  # each receive row's row in that dispatch's output, -1 = padding.
  local_send_pos: jax.Array  # [Nn * F, L] int32
  local_recv_src_idx: jax.Array  # [L * Nn * F] int32
  local_recv_src_rank: jax.Array  # [L * Nn * F] int32
  local_num_recv_tokens: jax.Array  # [1] int32
  local_row: jax.Array  # [M] int32

  @property
  def local_handle(self) -> DispatchHandle:
    return DispatchHandle(self.local_send_pos, self.local_recv_src_idx,
                          self.local_recv_src_rank, self.local_num_recv_tokens)

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


def make(mesh, axis_name, backend: str, is_nvidia_gpu: bool, **cuda_options):
  """(axis_name tuple, R, backend object, backend name) for ``Buffer``; errors name
  the argument. ``cuda_options``: the cuda backend's (num_nvl_bytes, num_sms,
  timeout_s), for the local hop."""
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
  num_nodes, num_local = int(mesh.shape[names[0]]), int(mesh.shape[names[1]])
  if backend == "cuda" or (backend == "auto" and is_nvidia_gpu):
    from jax_ep.backends.cuda import CudaBackend
    local, name = CudaBackend(mesh, names[1], **cuda_options), "cuda"
  else:
    local, name = XlaBackend(names[1], num_local), "xla"
  return (names, num_nodes * num_local, HierarchicalBackend(names, num_nodes, num_local, local),
          name)


def _take(a: jax.Array, src: jax.Array) -> jax.Array:
  """``a[src]`` for an index array of any shape, zero rows where ``src`` is -1."""
  if a.shape[0] == 0:
    return jnp.zeros(src.shape + a.shape[1:], a.dtype)
  rows = a[jnp.maximum(src, 0)]
  mask = (src >= 0).reshape(src.shape + (1,) * (a.ndim - 1))
  return jnp.where(mask, rows, jnp.zeros((), a.dtype))


def gather_local(local, local_axis: str, num_local: int, a: jax.Array) -> jax.Array:
  """``[L, n]``: every local rank's int32 vector ``a [n]``, in local index order.

  With the xla local hop this is ``lax.all_gather``. With the cuda local hop it is a
  dispatch of one row to every local rank on our kernels: the ranks of a node may share
  a GPU (emulated ranks), where XLA's NCCL refuses a communicator ("Duplicate GPU
  detected"), and the local axis is the local hop's anyway. Rows arrive in source rank
  order, bit for bit, so the two agree exactly.
  """
  if num_local == 1:
    return a[None]
  if local.name != "cuda":
    return lax.all_gather(a, local_axis)
  return gather_by_dispatch(local, num_local, a)


def gather_by_dispatch(local, num_local: int, a: jax.Array) -> jax.Array:
  """``gather_local`` on a flat backend's dispatch (one expert per local rank, the
  one token routed to all of them). Any flat backend does it; the CPU tests check it
  on the xla one against ``lax.all_gather``."""
  n, L = a.shape[0], num_local
  width = max(4, -(-n // 4) * 4)  # rows of a multiple of 16 bytes
  row = jnp.zeros((1, width), jnp.int32).at[0, :n].set(a.astype(jnp.int32))
  to_all = jnp.arange(L, dtype=jnp.int32)[None, :]
  # The kernels move bfloat16 or float32 rows, bit for bit: int32 travels as float32.
  rows = local.dispatch(lax.bitcast_convert_type(row, jnp.float32), to_all, None, None,
                        L, L)[0]
  return lax.bitcast_convert_type(rows[:, :n], jnp.int32)


class HierarchicalBackend:
  def __init__(self, axis_name: tuple, num_nodes: int, num_local: int, local):
    self.axis_name = axis_name
    self.node_axis, self.local_axis = axis_name
    self.num_nodes, self.num_local = num_nodes, num_local
    self.num_ranks = num_nodes * num_local
    self.local = local  # the flat backend of the local axis (the local hop)
    self.name = local.name

  def destroy(self) -> None:
    destroy = getattr(self.local, "destroy", None)
    if destroy is not None:
      destroy()

  def check_handle(self, handle, op: str) -> HierarchicalDispatchHandle:
    """The hop leaves of a handle ``_ops.check_handle`` already accepted."""
    if not isinstance(handle, HierarchicalDispatchHandle):
      raise TypeError(f"jax_ep.{op}: handle must come from this Buffer's dispatch "
                      f"(a HierarchicalDispatchHandle for axis_name={self.axis_name!r}), "
                      f"got {type(handle).__name__}.")
    N, M, Nn, L = handle.num_tokens, handle.capacity, self.num_nodes, self.num_local
    got = tuple(handle.forward_src_idx.shape)
    if len(got) != 2 or got[0] != Nn:
      raise ValueError(f"jax_ep.{op}: handle.forward_src_idx has shape {got}, expected "
                       f"({Nn}, forward capacity).")
    F = got[1]
    expected = {"forward_pos": (N, Nn), "num_arrived_tokens": (1,), "local_row": (M,),
                "local_send_pos": (Nn * F, L), "local_recv_src_idx": (L * Nn * F,),
                "local_recv_src_rank": (L * Nn * F,), "local_num_recv_tokens": (1,)}
    for field, shape in expected.items():
      got = tuple(getattr(handle, field).shape)
      if got != shape:
        raise ValueError(f"jax_ep.{op}: handle.{field} has shape {got}, expected {shape} "
                         f"(one rank's view: pass the handle into shard_map with "
                         f"in_specs=P({self.axis_name!r})).")
    return handle

  def layout(self, topk_idx, num_experts):
    return compute_layout(topk_idx, num_experts, self.num_ranks)

  # -- the node hop ----------------------------------------------------------------------
  def _node_hop(self, a, forward_pos, capacity):
    """Token rows ``a [N, ...]`` into slots ``[Nn, F, ...]`` by ``forward_pos``, sent to
    the same local index on every node: the result's slot n came from node n. Returned
    as the forwarder's ``Nn * F`` rows."""
    slots = self._slot_sources(forward_pos, capacity)
    out = lax.all_to_all(_take(a, slots), self.node_axis, 0, 0)
    return out.reshape((self.num_nodes * capacity,) + a.shape[1:])

  def _slot_sources(self, forward_pos, capacity):
    """[Nn, F]: the token in each slot row, -1 for padding."""
    N, Nn = forward_pos.shape
    where = jnp.where(forward_pos >= 0, jnp.arange(Nn)[None, :] * capacity + forward_pos,
                      Nn * capacity)
    tokens = jnp.broadcast_to(jnp.arange(N, dtype=jnp.int32)[:, None], (N, Nn))
    return jnp.full((Nn * capacity,), -1, jnp.int32).at[where.reshape(-1)].set(
        tokens.reshape(-1), mode="drop").reshape(Nn, capacity)

  def _home(self, partial, handle, out_dtype):
    """The forwarders' per-token partial sums ``[Nn * F, ...]`` back over the node hop,
    added at home over the nodes in pairwise order."""
    Nn, F, N = self.num_nodes, handle.forward_capacity, handle.num_tokens
    rest = partial.shape[1:]
    home = lax.all_to_all(partial.reshape((Nn, F) + rest), self.node_axis, 0, 0)
    if N == 0:
      return jnp.zeros((N,) + rest, out_dtype)
    parts = [_take(home[n], handle.forward_pos[:, n]).astype(jnp.float32) for n in range(Nn)]
    return pairwise_sum(parts).astype(out_dtype)

  # -- ops -------------------------------------------------------------------------------
  def dispatch(self, x, topk_idx, topk_weights, layout, num_experts, num_worst_tokens,
               num_worst_forward_tokens=None):
    Nn, L, R, M = self.num_nodes, self.num_local, self.num_ranks, num_worst_tokens
    N = topk_idx.shape[0]
    F = num_worst_forward_tokens or max(N, 1)  # a token goes to a node at most once
    experts_per_rank = num_experts // R
    me = lax.axis_index(self.axis_name)
    node = lax.axis_index(self.node_axis)
    if layout is None:
      layout = self.layout(topk_idx, num_experts)
    is_in = layout.is_token_in_rank  # [N, R], R node-major

    # Node hop: one slot row per (token, destination node), in token order.
    to_node = is_in.reshape(N, Nn, L).any(axis=2)
    to_node_i32 = to_node.astype(jnp.int32)
    pos = jnp.cumsum(to_node_i32, axis=0) - to_node_i32
    forward_pos = jnp.where(to_node & (pos < F), pos, -1).astype(jnp.int32)
    forward_src_idx = lax.all_to_all(self._slot_sources(forward_pos, F), self.node_axis,
                                     0, 0)  # [Nn, F]
    # What reaches each destination rank: rows are numbered as in the flat case
    # among the tokens that got past the node hop (all of them unless F overflows).
    arrives = is_in & jnp.repeat(forward_pos >= 0, L, axis=1)
    # Every rank's counts, and every forwarder of this node's slot sources (for the
    # rows' source tokens below): gathered over the node axis by XLA, then over the
    # local axis by the local hop (see gather_local).
    node_counts = lax.all_gather(jnp.stack([layout.num_tokens_per_rank,
                                            arrives.sum(axis=0, dtype=jnp.int32)]),
                                 self.node_axis)  # [Nn, 2, R(d)]: routed, arriving
    gathered = gather_local(self.local, self.local_axis, L, jnp.concatenate(
        [node_counts.reshape(-1), forward_src_idx.reshape(-1)]))
    counts = gathered[:, :Nn * 2 * R].reshape(L, Nn, 2, R).transpose(1, 0, 2, 3).reshape(
        R, 2, R)  # [R(s) = n * L + l, 2, R(d)]
    all_src = gathered[:, Nn * 2 * R:].reshape(L, Nn, F)  # forwarder l's forward_src_idx
    send_pos = send_positions(arrives, counts[:, 1], me, M)
    num_recv_tokens = counts[:, 0, me].sum().astype(jnp.int32).reshape(1)

    # Local hop: the forwarder's slot rows dispatched over the local axis to the
    # ranks of this node that hold their experts (renumbered from this node's first).
    fwd_x = self._node_hop(x, forward_pos, F)
    fwd_idx = self._node_hop(topk_idx, forward_pos, F)  # [Nn * F, K] global ids
    fwd_w = None if topk_weights is None else self._node_hop(topk_weights, forward_pos, F)
    node_experts = L * experts_per_rank
    here = ((forward_src_idx.reshape(-1, 1) >= 0) & (fwd_idx >= 0)
            & (fwd_idx < num_experts) & (fwd_idx // node_experts == node))
    local_idx = jnp.where(here, fwd_idx - node * node_experts, -1).astype(jnp.int32)
    local_cap = L * Nn * F  # every slot row of every forwarder: never overflows
    lx, lidx, lw, _, lh = self.local.dispatch(fwd_x, local_idx, fwd_w, None, node_experts,
                                              local_cap)

    # The flat receive order: source rank n * L + l, then token (= slot row p).
    valid = lh.recv_src_rank >= 0
    n_s, p = lh.recv_src_idx // F, lh.recv_src_idx % F
    past = R * F
    key = jnp.where(valid, (n_s * L + lh.recv_src_rank) * F + p, past)
    order = jnp.argsort(key).astype(jnp.int32)
    if M <= local_cap:
      order = order[:M]
    else:
      order = jnp.concatenate([order, jnp.zeros((M - local_cap,), jnp.int32)])
    row_key = jnp.where(jnp.arange(M) < local_cap, key[order], past)
    local_row = jnp.where(row_key < past, order, -1)
    # Each row's source token: its forwarder's slot source.
    src_l = jnp.maximum(_take(lh.recv_src_rank, local_row), 0)
    src_n = jnp.maximum(_take(n_s, local_row), 0)
    src_p = jnp.maximum(_take(p, local_row), 0)
    src_idx = jnp.where(local_row >= 0, all_src[src_l, src_n, src_p], -1)
    recv_src_rank = jnp.where(local_row >= 0, src_n * L + src_l, -1).astype(jnp.int32)

    handle = HierarchicalDispatchHandle(
        send_pos, src_idx.astype(jnp.int32), recv_src_rank, num_recv_tokens,
        forward_pos, forward_src_idx, valid.sum().astype(jnp.int32).reshape(1),
        lh.send_pos, lh.recv_src_idx, lh.recv_src_rank, lh.num_recv_tokens,
        local_row.astype(jnp.int32))

    recv_x = _take(lx, local_row)
    recv_local = jnp.where((local_row >= 0)[:, None], _take(lidx, local_row), -1)
    recv_global = jnp.where(recv_local >= 0, recv_local + me * experts_per_rank, -1)
    recv_w = None if lw is None else _take(lw, local_row)
    return (recv_x, *receive_metadata(recv_global, recv_w, recv_src_rank, me, num_experts,
                                      R), handle)

  def cached_dispatch(self, x, weights, handle):
    F = handle.forward_capacity
    fwd_x = self._node_hop(x, handle.forward_pos, F)
    fwd_w = None if weights is None else self._node_hop(weights, handle.forward_pos, F)
    lx, lw = self.local.cached_dispatch(fwd_x, fwd_w, handle.local_handle)
    return (_take(lx, handle.local_row),
            None if lw is None else _take(lw, handle.local_row))

  def combine(self, y, weights, handle):
    """The local hop's combine sums each token's copies on this node at its
    forwarder (float32, rounded to y's dtype: the one rounding the contract
    allows in bfloat16), then ``_home`` adds the nodes'."""
    local_cap = handle.local_recv_src_rank.shape[0]
    slot = jnp.where(handle.local_row >= 0, handle.local_row, local_cap)

    def to_local(rows):
      return jnp.zeros((local_cap,) + rows.shape[1:], rows.dtype).at[slot].set(rows, mode="drop")

    px, pw = self.local.combine(to_local(y), None if weights is None else to_local(weights),
                                handle.local_handle)
    return (self._home(px, handle, y.dtype),
            None if weights is None else self._home(pw, handle, jnp.float32))
