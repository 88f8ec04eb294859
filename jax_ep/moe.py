"""A functional mixture-of-experts block on top of ``Buffer.dispatch/combine``.

Call ``moe_block`` inside ``jax.shard_map`` over the buffer's axis. Per rank::

    x [N,H] --router--> topk_idx, topk_weights [N,K]
      --dispatch--> recv_x [M,H], recv_topk_idx [M,K] (local ids), recv_topk_weights
      --permute_to_expert_major--> grouped_x [G,H], group_sizes [E_local]
      --SwiGLU experts (grouped matmuls)--> grouped_y [G,H]
      --unpermute_from_expert_major (weighted by recv_topk_weights)--> y [M,H]
      --combine--> out [N,H]

``G = M * min(K, E_local)`` rows: a received row carries at most
``min(K, E_local)`` distinct local experts. Everything has static shapes, so the
block works under ``jit``, ``grad`` and ``scan`` on every backend.

Parameters (a dict, see ``init_moe_params`` and ``moe_param_specs``):
``router [H,E]`` float32, replicated; ``w_gate [E,H,F]``, ``w_up [E,H,F]``,
``w_down [E,F,H]``, sharded over the expert axis (inside ``shard_map`` each rank
sees ``[E_local, ...]``).

``dense_moe_reference`` is the same block on one device with no communication:
every token through its top-k experts with the same weights. The tests check
that the sharded block matches it in outputs and gradients.

The expert-major permutation follows the argsort-of-flattened-top-k-ids
design of MaxText's ``moe.py`` (``permute``/``unpermute``); here it runs on the
receive side of a dispatch, where DeepEP's normal mode leaves it to the user.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from jax_ep import _ops
from jax_ep import grouped_matmul as gmm

ROUTERS = ("softmax", "sigmoid")


# --------------------------------------------------------------------------
# Parameters.

def init_moe_params(key, hidden: int, ffn: int, num_experts: int,
                    dtype=jnp.float32) -> dict:
  """Random parameters of one MoE block (global shapes).

  Returns ``{"router": [H,E] float32, "w_gate": [E,H,F], "w_up": [E,H,F],
  "w_down": [E,F,H]}`` with the expert weights in ``dtype``. Fan-in scaled
  normals; the router starts small so early routing is near uniform.
  """
  k_r, k_g, k_u, k_d = jax.random.split(key, 4)
  f32 = jnp.float32
  return {
      "router": 0.1 * jax.random.normal(k_r, (hidden, num_experts), f32) / hidden ** 0.5,
      "w_gate": (jax.random.normal(k_g, (num_experts, hidden, ffn), f32)
                 / hidden ** 0.5).astype(dtype),
      "w_up": (jax.random.normal(k_u, (num_experts, hidden, ffn), f32)
               / hidden ** 0.5).astype(dtype),
      "w_down": (jax.random.normal(k_d, (num_experts, ffn, hidden), f32)
                 / ffn ** 0.5).astype(dtype),
  }


def moe_param_specs(axis_name: str = "ep") -> dict:
  """``PartitionSpec`` of each parameter: router replicated, experts sharded."""
  return {"router": P(), "w_gate": P(axis_name), "w_up": P(axis_name),
          "w_down": P(axis_name)}


# --------------------------------------------------------------------------
# Router.

def route(router_w: jax.Array, x: jax.Array, top_k: int, router: str = "softmax",
          normalize: bool = True):
  """Top-k routing of tokens ``x [T,H]`` with ``router_w [H,E]``, in float32.

  - ``"softmax"``: scores = softmax(logits); top-k of the scores.
  - ``"sigmoid"``: scores = sigmoid(logits) (DeepSeek-V3 style); top-k.
  With ``normalize`` the k weights of a token are divided by their sum.

  Returns ``(topk_idx [T,K] int32, topk_weights [T,K] float32, probs [T,E]
  float32)``; ``probs`` (the scores, normalised over experts) feeds the
  load-balancing statistic. Gradients flow through ``topk_weights``.
  """
  if router not in ROUTERS:
    raise ValueError(f"jax_ep.moe: router must be one of {ROUTERS}, got {router!r}.")
  num_experts = router_w.shape[1]
  top_k = _ops.check_static_int(top_k, "top_k", "moe", 1)
  if top_k > num_experts:
    raise ValueError(f"jax_ep.moe: top_k={top_k} must be in [1, {num_experts}].")
  logits = jnp.dot(x.astype(jnp.float32), router_w.astype(jnp.float32),
                   precision=lax.Precision.HIGHEST)
  if router == "softmax":
    scores = jax.nn.softmax(logits, axis=-1)
    probs = scores
  else:
    scores = jax.nn.sigmoid(logits)
    probs = scores / (scores.sum(-1, keepdims=True) + 1e-20)
  topk_weights, topk_idx = lax.top_k(scores, top_k)
  if normalize:
    topk_weights = topk_weights / (topk_weights.sum(-1, keepdims=True) + 1e-20)
  return topk_idx.astype(jnp.int32), topk_weights, probs


def load_balance_loss(probs: jax.Array, topk_idx: jax.Array) -> jax.Array:
  """Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (1.0 when uniform).

  ``f_e``: fraction of the ``(token, k)`` slots routed to expert ``e``;
  ``P_e``: mean router probability of ``e``. Gradients flow through ``P``.
  """
  num_experts = probs.shape[-1]
  counts = jnp.zeros((num_experts,), jnp.float32).at[topk_idx.reshape(-1)].add(
      1.0, mode="drop")
  frac = counts / jnp.maximum(topk_idx.size, 1)
  return num_experts * jnp.sum(frac * probs.mean(0))


# --------------------------------------------------------------------------
# Expert-major permutation of received tokens.

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ExpertMajorPlan:
  """How ``permute_to_expert_major`` grouped the ``(row, k)`` slots.

  ``G`` grouped rows, ``M`` receive rows, ``K`` top-k slots per row.
  """

  row_index: jax.Array  # [G] int32: receive row of each grouped row, -1 = padding.
  position: jax.Array   # [M, K] int32: grouped row of slot (m, k), -1 = none.

  @property
  def num_grouped_rows(self) -> int:
    return self.row_index.shape[0]


def permute_to_expert_major(recv_x: jax.Array, recv_topk_idx: jax.Array,
                            num_local_experts: int,
                            num_grouped_rows: Optional[int] = None):
  """Group the received ``(row, k)`` slots by local expert, for a grouped GEMM.

  Args:
    recv_x: ``[M, H]`` received tokens.
    recv_topk_idx: ``[M, K]`` int local expert ids, -1 (or any id outside
      ``[0, num_local_experts)``) = not for an expert here.
    num_local_experts: ``E_local`` (static).
    num_grouped_rows: static row count ``G`` of the result; default ``M * K``.
      ``M * min(K, E_local)`` suffices when no row names an expert twice (true
      for top-k routing). Slots beyond ``G`` would be lost, so never pass less
      than the number of valid slots.

  Returns:
    ``(grouped_x [G, H], group_sizes [E_local] int32, plan)``: rows of expert 0
    first, then expert 1, ..., each group in ``(row, k)`` order, then padding
    rows (zeros) from ``sum(group_sizes)`` on. ``group_sizes`` is what
    ``lax.ragged_dot`` takes (equal to dispatch's
    ``num_recv_tokens_per_expert``); ``plan`` undoes the grouping in
    ``unpermute_from_expert_major``.
  """
  M, K = recv_topk_idx.shape
  if recv_x.ndim != 2 or recv_x.shape[0] != M:
    raise ValueError(f"jax_ep.moe: recv_x must be [{M}, H] to match recv_topk_idx "
                     f"{recv_topk_idx.shape}, got {recv_x.shape}.")
  G = M * K if num_grouped_rows is None else int(num_grouped_rows)
  El = int(num_local_experts)
  valid = (recv_topk_idx >= 0) & (recv_topk_idx < El)
  key = jnp.where(valid, recv_topk_idx, El).astype(jnp.int32).reshape(-1)  # [M*K]
  # Stable: equal experts keep (row, k) order; invalid slots (key El) go last.
  order = jnp.argsort(key, stable=True).astype(jnp.int32)  # grouped pos -> slot
  group_sizes = jnp.zeros((El,), jnp.int32).at[key].add(1, mode="drop")
  inverse = jnp.zeros((M * K,), jnp.int32).at[order].set(
      jnp.arange(M * K, dtype=jnp.int32), unique_indices=True)  # slot -> pos
  if G < M * K:
    order = order[:G]
  elif G > M * K:
    order = jnp.concatenate([order, jnp.full((G - M * K,), M * K, jnp.int32)])
  slot_ok = jnp.concatenate([valid.reshape(-1), jnp.zeros((1,), bool)])
  row_ok = slot_ok[jnp.minimum(order, M * K)]
  row_index = jnp.where(row_ok, order // K, -1)
  position = jnp.where(valid.reshape(-1) & (inverse < G), inverse, -1).reshape(M, K)
  grouped_x = jnp.where(row_ok[:, None], recv_x[jnp.maximum(row_index, 0)],
                        jnp.zeros((), recv_x.dtype))
  return grouped_x, group_sizes, ExpertMajorPlan(row_index, position)


def unpermute_from_expert_major(grouped_y: jax.Array, plan: ExpertMajorPlan,
                                recv_topk_weights: Optional[jax.Array] = None,
                                out_dtype=None) -> jax.Array:
  """Inverse of ``permute_to_expert_major`` with the top-k weighting.

  ``y[m] = sum_k w[m,k] * grouped_y[plan.position[m,k]]`` over the slots with
  a position, accumulated in float32 (``w = 1`` when ``recv_topk_weights`` is
  None). Padding rows of ``grouped_y`` are never read, so whatever a grouped
  GEMM leaves there (zeros or garbage) does not matter.

  Returns ``y [M, H]`` in ``out_dtype`` (default ``grouped_y.dtype``).
  """
  out_dtype = grouped_y.dtype if out_dtype is None else out_dtype
  pos = plan.position
  has = pos >= 0
  rows = grouped_y[jnp.maximum(pos, 0)].astype(jnp.float32)  # [M, K, H]
  rows = jnp.where(has[..., None], rows, 0.0)
  if recv_topk_weights is None:
    y = rows.sum(axis=1)
  else:
    w = jnp.where(has, recv_topk_weights.astype(jnp.float32), 0.0)
    y = jnp.einsum("mk,mkh->mh", w, rows, precision=lax.Precision.HIGHEST)
  return y.astype(out_dtype)


# --------------------------------------------------------------------------
# Experts.

def resolve_expert_impl(expert_impl: str, grouped_x: jax.Array, w_gate: jax.Array,
                        w_down: jax.Array, device=None) -> str:
  """``"mosaic"`` or ``"ragged_dot"``: the grouped matmuls ``swiglu_experts``
  runs for ``expert_impl`` (``"auto"``, ``"ragged_dot"`` or ``"mosaic"``;
  see ``jax_ep.grouped_matmul``). ``"auto"`` takes the Mosaic kernels only
  when all three projections and their derivatives can use them."""
  dt = grouped_x.dtype
  num_groups = w_gate.shape[0]
  choices = {gmm.resolve_impl(expert_impl, "nn", grouped_x, w.astype(dt), num_groups,
                              device)
             for w in (w_gate, w_down)}
  return "mosaic" if choices == {"mosaic"} else "ragged_dot"


def swiglu_experts(grouped_x: jax.Array, group_sizes: jax.Array, w_gate: jax.Array,
                   w_up: jax.Array, w_down: jax.Array, *,
                   expert_impl: str = "auto", device=None) -> jax.Array:
  """``down(silu(x @ gate) * (x @ up))`` per expert group, float32 result.

  ``grouped_x [G,H]`` expert-major, ``w_gate/w_up [E_local,H,F]``,
  ``w_down [E_local,F,H]``. Matmuls run in ``grouped_x``'s dtype with float32
  accumulation, on the grouped matmuls ``expert_impl`` names
  (``resolve_expert_impl``); the Mosaic kernels round each product to that
  dtype before it is widened to float32.
  """
  dt = grouped_x.dtype
  f32 = jnp.float32
  impl = resolve_expert_impl(expert_impl, grouped_x, w_gate, w_down, device)
  mm = functools.partial(gmm.grouped_matmul, group_sizes=group_sizes, impl=impl,
                         preferred_element_type=f32, device=device)
  gate = mm(grouped_x, w_gate.astype(dt))
  up = mm(grouped_x, w_up.astype(dt))
  h = (jax.nn.silu(gate) * up).astype(dt)
  return mm(h, w_down.astype(dt))


# --------------------------------------------------------------------------
# The block.

@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MoeAux:
  """Per-rank statistics of one ``moe_block`` call (psum/pmean over the axis
  for global values).

  ``num_dropped_tokens`` is the dispatch contract's overflow report: tokens
  routed to this rank beyond ``num_worst_tokens`` receive rows; their experts
  on this rank contribute nothing to the output.
  """

  num_dropped_tokens: jax.Array  # [] int32: tokens this rank failed to receive.
  num_recv_tokens: jax.Array     # [] int32: tokens routed to this rank (may be > M);
  #                                in mode="low_latency", the (token, k) copies.
  tokens_per_expert: jax.Array   # [E] int32: this rank's (token, k) slots per expert.
  load_balance_loss: jax.Array   # [] f32: Switch aux loss of this rank's tokens.
  # Which grouped matmuls ran the experts: "mosaic" or "ragged_dot" (static);
  # "einsum" for mode="low_latency" with ll_expert_layout="batched".
  expert_impl: str = dataclasses.field(default="ragged_dot",
                                       metadata=dict(static=True))


def _check_params(params, hidden: int, num_experts: int, num_local: int):
  for name in ("router", "w_gate", "w_up", "w_down"):
    if name not in params:
      raise ValueError(f"jax_ep.moe: params needs key {name!r} (see init_moe_params).")
  if params["router"].shape != (hidden, num_experts):
    raise ValueError(f"jax_ep.moe: params['router'] must be [{hidden}, {num_experts}], "
                     f"got {params['router'].shape}.")
  el, h, f = params["w_gate"].shape
  if el != num_local:
    raise ValueError(
        f"jax_ep.moe: this rank holds w_gate of shape {params['w_gate'].shape} but "
        f"{num_experts} experts over the axis need {num_local} local experts; shard "
        f"the expert weights over the expert axis (see moe_param_specs).")
  expected = {"w_gate": (el, hidden, f), "w_up": (el, hidden, f),
              "w_down": (el, f, hidden)}
  for name, shape in expected.items():
    if params[name].shape != shape:
      raise ValueError(f"jax_ep.moe: params[{name!r}] must be {shape}, got "
                       f"{params[name].shape}.")


def moe_block(buf, params: dict, x: jax.Array, *, num_experts: Optional[int] = None,
              top_k: int, router: str = "softmax", normalize: bool = True,
              num_worst_tokens: Optional[int] = None, expert_impl: str = "auto",
              mode: str = "normal", fp8_dispatch: bool = False,
              num_max_dispatch_tokens_per_rank: Optional[int] = None,
              ll_expert_layout: str = "packed"):
  """One expert-parallel MoE FFN on this rank's tokens (call inside shard_map).

  Args:
    buf: a ``jax_ep.Buffer`` whose axis the expert weights are sharded over.
    params: this rank's view of ``init_moe_params``: ``router [H,E]`` (full),
      ``w_gate/w_up [E_local,H,F]``, ``w_down [E_local,F,H]``.
    x: ``[N, H]`` bfloat16 or float32 tokens of this rank.
    num_experts: E (default: ``params['router'].shape[1]``), divisible by R.
    top_k: experts per token.
    router: ``"softmax"`` or ``"sigmoid"`` scores; ``normalize`` divides each
      token's k weights by their sum.
    num_worst_tokens: receive capacity M of the dispatch (default ``N * R``,
      never drops). Tokens beyond it are dropped and reported in the aux.
    expert_impl: the experts' grouped matmuls: ``"auto"`` (JAX's Mosaic-GPU
      kernels on Hopper GPUs, else ``lax.ragged_dot``), ``"mosaic"`` or
      ``"ragged_dot"``; ``aux.expert_impl`` says which ran.
    mode: ``"normal"`` (``dispatch``/``combine``) or ``"low_latency"``
      (``low_latency_dispatch``/``low_latency_combine``, the decode path; xla
      backend so far). In low-latency mode ``num_worst_tokens`` does not apply
      (nothing is dropped), ``num_max_dispatch_tokens_per_rank`` is ``T``
      (default N), and ``ll_expert_layout`` picks the experts' matmuls:
      ``"packed"`` (each expert's rows packed end to end, then the grouped
      matmuls of ``expert_impl`` on the counts) or ``"batched"`` (one batched
      einsum over ``[E_local, R*T, H]``, rows past the counts zeroed first so
      that garbage there cannot reach a gradient).
    fp8_dispatch: normal mode only: send the tokens as FP8 (e4m3, per-128
      channel scales; ``H % 128 == 0``) and dequantize them to ``x.dtype`` on
      arrival; combine stays in ``x.dtype``. The derivative is straight-through
      (the backward pass sends the cotangent in ``x.dtype``).

  Returns:
    ``(out [N,H] in x.dtype, MoeAux)``: ``out[i] = sum_k w[i,k] *
    expert_{idx[i,k]}(x[i])`` over the kept ``(token, expert)`` pairs.
  """
  R = buf.num_ranks
  N, H = x.shape
  if num_experts is None:
    num_experts = params["router"].shape[1]
  num_experts = _ops.check_static_int(num_experts, "num_experts", "moe", 1)
  if num_experts % R:
    raise ValueError(f"jax_ep.moe: num_experts={num_experts} is not divisible by the "
                     f"{R} ranks of axis {buf.axis_name!r}.")
  El = num_experts // R
  _check_params(params, H, num_experts, El)

  if mode not in ("normal", "low_latency"):
    raise ValueError(f"jax_ep.moe: mode must be 'normal' or 'low_latency', got {mode!r}.")
  topk_idx, topk_weights, probs = route(params["router"], x, top_k, router, normalize)
  if mode == "low_latency":
    if fp8_dispatch:
      raise ValueError("jax_ep.moe: fp8_dispatch=True is for mode='normal' (the "
                       "low-latency FP8 dispatch is not differentiable).")
    return _low_latency_block(buf, params, x, topk_idx, topk_weights, probs,
                              num_experts, num_max_dispatch_tokens_per_rank,
                              ll_expert_layout, expert_impl)
  if fp8_dispatch:
    recv_x, recv_idx, recv_w, _, handle = _dispatch_fp8(
        buf, x, topk_idx, topk_weights, num_experts, num_worst_tokens)
  else:
    recv_x, recv_idx, recv_w, _, handle = buf.dispatch(
        x, topk_idx=topk_idx, topk_weights=topk_weights, num_experts=num_experts,
        num_worst_tokens=num_worst_tokens)
  M = recv_x.shape[0]
  # Top-k ids are distinct, so a row holds at most min(K, E_local) local slots.
  grouped_x, group_sizes, plan = permute_to_expert_major(
      recv_x, recv_idx, El, num_grouped_rows=M * min(top_k, El))
  device = buf.mesh.devices.flat[0]
  impl = resolve_expert_impl(expert_impl, grouped_x, params["w_gate"],
                             params["w_down"], device)
  grouped_y = swiglu_experts(grouped_x, group_sizes, params["w_gate"],
                             params["w_up"], params["w_down"], expert_impl=impl,
                             device=device)
  y = unpermute_from_expert_major(grouped_y, plan, recv_w, out_dtype=x.dtype)
  out, _ = buf.combine(y, handle)

  tokens_per_expert = jnp.zeros((num_experts,), jnp.int32).at[
      topk_idx.reshape(-1)].add(1, mode="drop")
  aux = MoeAux(num_dropped_tokens=handle.num_dropped_tokens,
               num_recv_tokens=handle.num_recv_tokens.reshape(()),
               tokens_per_expert=tokens_per_expert,
               load_balance_loss=load_balance_loss(probs, topk_idx),
               expert_impl=impl)
  return out, aux


def _dispatch_fp8(buf, x, topk_idx, topk_weights, num_experts, num_worst_tokens):
  """FP8 normal dispatch, dequantized on arrival, straight-through derivative."""
  from jax_ep import _ll_ops, fp8
  op = "moe"
  _ops.check_axis(buf.axis_name, buf.num_ranks, op)
  fp8.check_hidden(x.shape[1], op)
  capacity = _ops.check_num_worst_tokens(num_worst_tokens, x.shape[0], buf.num_ranks, op)
  return _ll_ops.dispatch_dequantized(buf._backend, x, topk_idx, topk_weights,
                                      num_experts, capacity)


def _low_latency_block(buf, params, x, topk_idx, topk_weights, probs, num_experts, T,
                       layout, expert_impl):
  """``moe_block``'s low-latency path: recv_x is already grouped by expert."""
  if layout not in ("packed", "batched"):
    raise ValueError(f"jax_ep.moe: ll_expert_layout must be 'packed' or 'batched', "
                     f"got {layout!r}.")
  N = x.shape[0]
  T = N if T is None else T
  recv_x, counts, handle = buf.low_latency_dispatch(
      x, topk_idx, num_max_dispatch_tokens_per_rank=T, num_experts=num_experts)
  El, rows, H = recv_x.shape
  dt = x.dtype
  f32 = jnp.float32
  r = jnp.arange(rows, dtype=jnp.int32)
  if layout == "batched":
    live = (r[None, :] < counts[:, None])[..., None]
    xe = jnp.where(live, recv_x, jnp.zeros((), dt))
    mm = functools.partial(jnp.einsum, preferred_element_type=f32)
    gate = mm("erh,ehf->erf", xe, params["w_gate"].astype(dt))
    up = mm("erh,ehf->erf", xe, params["w_up"].astype(dt))
    h = (jax.nn.silu(gate) * up).astype(dt)
    y = mm("erf,efh->erh", h, params["w_down"].astype(dt)).astype(dt)
    impl = "einsum"
  else:
    # Pack: expert e's rows 0..counts[e]-1 go to rows start[e].. of one array,
    # so the grouped matmuls see exactly the counts (no work on padding).
    start = jnp.cumsum(counts) - counts
    g = jnp.arange(El * rows, dtype=jnp.int32)
    expert_of = jnp.clip(jnp.searchsorted(start, g, side="right") - 1, 0, El - 1)
    inside = g - start[expert_of]
    valid = inside < counts[expert_of]
    src = jnp.where(valid, expert_of * rows + inside, 0)
    # Zeros past the counts: a NaN a backend left there would reach the weight
    # gradient (NaN * 0) through the grouped matmuls.
    grouped_x = jnp.where(valid[:, None], recv_x.reshape(El * rows, H)[src],
                          jnp.zeros((), dt))
    device = buf.mesh.devices.flat[0]
    impl = resolve_expert_impl(expert_impl, grouped_x, params["w_gate"],
                               params["w_down"], device)
    grouped_y = swiglu_experts(grouped_x, counts, params["w_gate"], params["w_up"],
                               params["w_down"], expert_impl=impl, device=device)
    # Unpack: row (e, r) is packed row start[e] + r; rows past the counts are
    # never read by the combine.
    back = jnp.minimum(start[:, None] + r[None, :], El * rows - 1)
    y = grouped_y.astype(dt)[back]
  out = buf.low_latency_combine(y, topk_idx, topk_weights, handle)
  tokens_per_expert = jnp.zeros((num_experts,), jnp.int32).at[
      topk_idx.reshape(-1)].add(1, mode="drop")
  aux = MoeAux(num_dropped_tokens=jnp.zeros((), jnp.int32),
               num_recv_tokens=counts.sum().astype(jnp.int32),
               tokens_per_expert=tokens_per_expert,
               load_balance_loss=load_balance_loss(probs, topk_idx),
               expert_impl=impl)
  return out, aux


# --------------------------------------------------------------------------
# Dense single-device reference.

def _unsharded(a):
  """``a`` replicated when it is sharded over Explicit mesh axes, else ``a``.

  On an Explicit mesh, sharding propagates through every op, and the dense
  einsums of expert-sharded weights with token-sharded ``x`` have no legal
  result sharding; the reference is a one-device computation anyway.
  """
  sharding = getattr(jax.typeof(a), "sharding", None)
  mesh = getattr(sharding, "mesh", None)
  if mesh is None or not mesh.explicit_axes or all(s is None for s in sharding.spec):
    return a
  return jax.sharding.reshard(a, jax.sharding.NamedSharding(mesh, P()))


def dense_moe_reference(params: dict, x: jax.Array, *, top_k: int,
                        router: str = "softmax", normalize: bool = True,
                        num_experts: Optional[int] = None,
                        slot_mask: Optional[jax.Array] = None,
                        expert_x: Optional[jax.Array] = None) -> jax.Array:
  """The same block on one device: every expert on every token, in float32.

  ``params`` are the full (unsharded) weights, ``x [T,H]`` all tokens.
  ``out[t] = sum_k w[t,k] * expert_{idx[t,k]}(x[t])``, computed densely as
  ``sum_e c[t,e] * expert_e(x[t])`` with ``c`` the scattered top-k weights.
  ``slot_mask [T,K]`` (bool) removes (token, k) pairs, e.g. those a capacity
  overflow dropped. ``expert_x [T,H]``, if given, is what the experts see
  (routing still uses ``x``), e.g. the FP8 round trip of ``x``. Returns
  float32 ``[T,H]``.
  """
  del num_experts  # Implied by the router weight; accepted for symmetry.
  params = {k: _unsharded(v) for k, v in params.items()}
  x = _unsharded(x)
  f32 = jnp.float32
  hi = lax.Precision.HIGHEST
  topk_idx, topk_weights, _ = route(params["router"], x, top_k, router, normalize)
  if slot_mask is not None:
    topk_weights = jnp.where(slot_mask, topk_weights, 0.0)
  E = params["router"].shape[1]
  coef = (jax.nn.one_hot(topk_idx, E, dtype=f32) * topk_weights[..., None]).sum(1)
  xf = (x if expert_x is None else _unsharded(expert_x)).astype(f32)
  gate = jnp.einsum("th,ehf->etf", xf, params["w_gate"].astype(f32), precision=hi)
  up = jnp.einsum("th,ehf->etf", xf, params["w_up"].astype(f32), precision=hi)
  y = jnp.einsum("etf,efh->eth", jax.nn.silu(gate) * up,
                 params["w_down"].astype(f32), precision=hi)
  return jnp.einsum("te,eth->th", coef, y, precision=hi)
