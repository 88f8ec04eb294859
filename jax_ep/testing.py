"""Helpers for testing jax_ep and code built on it.

- ``random_routing``: fresh top-k routings with -1 and out-of-range ids.
- ``reference_dispatch`` / ``reference_combine``: an independent NumPy model of
  the contract in ``docs/design.md``, written with plain loops over ranks and
  tokens (no shared code with any backend).
- ``run_per_rank``: run a per-rank function under ``jit(shard_map)`` on stacked
  per-rank inputs and get per-rank NumPy outputs back.
- ``launch_ranks``: run N JAX processes as N ranks of one mesh (used to test the
  CUDA backend on one GPU; see ``jax_ep/multiprocess.py``).
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def random_routing(rng: np.random.Generator, num_tokens: int, num_topk: int,
                   num_experts: int, *, none_fraction: float = 0.1,
                   invalid_fraction: float = 0.02) -> np.ndarray:
  """``[N, K]`` int32 ids: distinct experts per token, some -1, some out of range."""
  idx = np.stack([rng.choice(num_experts, size=min(num_topk, num_experts),
                             replace=False) for _ in range(num_tokens)])
  if idx.shape[1] < num_topk:
    pad = -np.ones((num_tokens, num_topk - idx.shape[1]), idx.dtype)
    idx = np.concatenate([idx, pad], axis=1)
  idx = idx.astype(np.int32)
  u = rng.random(idx.shape)
  idx[u < none_fraction] = -1
  bad = u > 1.0 - invalid_fraction
  idx[bad] = rng.choice([num_experts, num_experts + 7, -3, -1000], size=bad.sum())
  return idx


def _valid(ids, num_experts):
  return (ids >= 0) & (ids < num_experts)


def reference_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  """NumPy layout of one rank: (tokens per rank, slots per expert, is_token_in_rank)."""
  per_rank_experts = num_experts // num_ranks
  n = topk_idx.shape[0]
  in_rank = np.zeros((n, num_ranks), bool)
  per_expert = np.zeros(num_experts, np.int32)
  for i in range(n):
    for e in topk_idx[i]:
      if 0 <= e < num_experts:
        in_rank[i, e // per_rank_experts] = True
        per_expert[e] += 1
  return in_rank.sum(0).astype(np.int32), per_expert, in_rank


def reference_dispatch(xs, topk_idxs, topk_weights, num_experts: int,
                       num_worst_tokens: int | None = None):
  """Per-rank results of dispatch for all ranks' inputs.

  Args: lists (one entry per rank) of ``x [N,H]``, ``topk_idx [N,K]`` and
  ``topk_weights [N,K]`` (entries may be None).
  Returns: a list of dicts, one per rank, with ``recv_x``, ``recv_topk_idx``,
  ``recv_topk_weights``, ``num_recv_tokens_per_expert``, ``num_recv_tokens``,
  ``send_pos`` ([N,R] of that rank as sender), ``recv_src`` (list of
  (rank, token) per kept row) and the layout.
  """
  R = len(xs)
  N, H = xs[0].shape
  K = topk_idxs[0].shape[1]
  M = num_worst_tokens or N * R
  El = num_experts // R
  layouts = [reference_layout(t, num_experts, R) for t in topk_idxs]
  out = []
  for d in range(R):
    routed = [(s, i) for s in range(R) for i in range(N) if layouts[s][2][i, d]]
    kept = routed[:M]
    recv_x = np.zeros((M, H), np.float32)
    recv_idx = -np.ones((M, K), np.int32)
    recv_w = np.zeros((M, K), np.float32)
    per_expert = np.zeros(El, np.int32)
    for row, (s, i) in enumerate(kept):
      recv_x[row] = xs[s][i]
      for k in range(K):
        e = int(topk_idxs[s][i, k])
        if 0 <= e < num_experts and e // El == d:
          recv_idx[row, k] = e - d * El
          per_expert[e - d * El] += 1
          if topk_weights[s] is not None:
            recv_w[row, k] = topk_weights[s][i, k]
    out.append(dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                    num_recv_tokens_per_expert=per_expert,
                    num_recv_tokens=len(routed), recv_src=kept,
                    num_tokens_per_rank=layouts[d][0],
                    num_tokens_per_expert=layouts[d][1],
                    is_token_in_rank=layouts[d][2]))
  for s in range(R):
    send_pos = -np.ones((N, R), np.int32)
    for d in range(R):
      for row, src in enumerate(out[d]["recv_src"]):
        if src[0] == s:
          send_pos[src[1], d] = row
    out[s]["send_pos"] = send_pos
  return out


def reference_combine(ys, dispatched, num_tokens: int, weights=None):
  """``combined[s][i] = sum_d ys[d][row of (s, i) on d]`` in float32, per rank."""
  R = len(ys)
  H = ys[0].shape[1]
  outs = [np.zeros((num_tokens, H), np.float32) for _ in range(R)]
  wouts = None
  if weights is not None:
    wouts = [np.zeros((num_tokens, weights[0].shape[1]), np.float32) for _ in range(R)]
  for d in range(R):
    for row, (s, i) in enumerate(dispatched[d]["recv_src"]):
      outs[s][i] += np.asarray(ys[d][row], np.float32)
      if weights is not None:
        wouts[s][i] += np.asarray(weights[d][row], np.float32)
  return outs, wouts


def make_mesh(num_ranks: int, axis_name: str = "ep", explicit: bool = False):
  """A 1-D mesh over the first ``num_ranks`` devices (``jax.make_mesh`` if explicit)."""
  devices = jax.devices()[:num_ranks]
  if len(devices) < num_ranks:
    raise ValueError(f"need {num_ranks} devices, have {len(jax.devices())}")
  if explicit:
    return jax.make_mesh((num_ranks,), (axis_name,), devices=devices)
  return Mesh(np.array(devices), (axis_name,))


def per_rank_fn(fn, mesh, axis_name: str = "ep"):
  """``shard_map`` of ``fn`` over arrays stacked along a leading rank axis.

  The result takes ``[R, ...]`` arrays (or None) and returns a pytree of
  ``[R, ...]`` arrays; scalars a rank returns become ``[R]``.
  """
  def body(*args):
    local = [None if a is None else a[0] for a in args]
    out = fn(*local)
    return jax.tree_util.tree_map(lambda o: o[None], out)

  return jax.shard_map(body, mesh=mesh, in_specs=P(axis_name), out_specs=P(axis_name))


def stack_per_rank(mesh, *per_rank_args, axis_name: str = "ep"):
  """Stack lists of per-rank arrays into ``[R, ...]`` arrays sharded over the axis."""
  stacked = []
  for arg in per_rank_args:
    if arg is None or arg[0] is None:
      stacked.append(None)
      continue
    a = jnp.stack([jnp.asarray(v) for v in arg])
    stacked.append(jax.device_put(a, NamedSharding(mesh, P(axis_name))))
  return stacked


def run_per_rank(fn, mesh, *per_rank_args, axis_name: str = "ep"):
  """Run ``fn(*args_of_one_rank)`` on every rank under jit; per-rank NumPy outputs.

  Each element of ``per_rank_args`` is a list with one array (or None) per
  rank. Outputs may be any pytree of arrays (scalars included) or None.
  """
  R = mesh.shape[axis_name]
  out = jax.jit(per_rank_fn(fn, mesh, axis_name))(
      *stack_per_rank(mesh, *per_rank_args, axis_name=axis_name))
  out = jax.tree_util.tree_map(np.asarray, out)
  return [jax.tree_util.tree_map(lambda o: o[r], out) for r in range(R)]
