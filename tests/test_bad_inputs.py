"""The catalogue of documented trace-time errors: one case each, naming the argument.

Every case feeds one bad argument to an otherwise valid call and checks the
exception type, that the message names the argument, and what it says. The
calls are traced (``jax.eval_shape``), never compiled: the checks run at trace
time. Runtime failures (a timeout, ranks disagreeing, a stale layout) are the
GPU suite's (``tests/gpu``).
"""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import moe
from jax_ep import testing as ept

R, N, H, K, E = 4, 8, 16, 2, 8
MESH = ept.make_mesh(R)
BUF = jax_ep.Buffer(MESH, "ep", backend="xla")
F32 = jax.ShapeDtypeStruct((R * N, H), jnp.float32)
IDX = jax.ShapeDtypeStruct((R * N, K), jnp.int32)
W = jax.ShapeDtypeStruct((R * N, K), jnp.float32)


def traced(fn, *args, in_specs=P("ep")):
  """Trace ``fn`` per rank inside shard_map over the buffer's axis."""
  def per_rank(*a):
    fn(*a)
    return jnp.zeros(())
  return lambda: jax.eval_shape(
      jax.shard_map(per_rank, mesh=MESH, in_specs=in_specs, out_specs=P()), *args)


def with_handle(fn):
  """``fn(x, idx, handle)`` after a valid dispatch."""
  def run(x, i):
    return fn(x, i, BUF.dispatch(x, topk_idx=i, num_experts=E)[4])
  return traced(run, F32, IDX)


def _moe_params(num_local=E // R):
  p = moe.init_moe_params(jax.random.key(0), H, 8, E)
  return {k: (v if k == "router" else v[:num_local]) for k, v in p.items()}


def block(params_fn=_moe_params, **kwargs):
  return traced(lambda x: moe.moe_block(BUF, params_fn(), x, **kwargs)[0], F32)


def stacked_handle():
  """The global handle (as it left shard_map with out_specs=P("ep"))."""
  run = jax.shard_map(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=E)[4],
                      mesh=MESH, in_specs=P("ep"), out_specs=P("ep"))
  return jax.eval_shape(run, F32, IDX)


CASES = [  # id, exception, the argument named, what the message says, the call
    ("buffer-mesh", TypeError, "mesh", "must be a jax.sharding.Mesh",
     lambda: jax_ep.Buffer(jax.devices(), "ep")),
    ("buffer-axis", ValueError, "axis_name", "is not an axis of the mesh",
     lambda: jax_ep.Buffer(MESH, "moe")),
    ("buffer-backend", ValueError, "backend", "unknown backend 'nccl'",
     lambda: jax_ep.Buffer(MESH, "ep", backend="nccl")),
    ("buffer-timeout", ValueError, "timeout_s", "must be a positive number",
     lambda: jax_ep.Buffer(MESH, "ep", timeout_s=0)),
    ("buffer-timeout-nan", ValueError, "timeout_s", "must be a positive number",
     lambda: jax_ep.Buffer(MESH, "ep", timeout_s=float("nan"))),
    ("outside-shard_map", ValueError, "'ep'", "must be called inside jax.shard_map",
     lambda: BUF.dispatch(jnp.zeros((N, H)), topk_idx=jnp.zeros((N, K), jnp.int32),
                          num_experts=E)),
    ("axis-size", ValueError, "'ep'", "has size 4 here but the Buffer was made for 8",
     traced(lambda x, i: jax_ep.Buffer(ept.make_mesh(8), "ep", backend="xla").dispatch(
         x, topk_idx=i, num_experts=E), F32, IDX)),
    ("num_experts-divisible", ValueError, "num_experts", "is not divisible",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=6), F32, IDX)),
    ("num_experts-float", TypeError, "num_experts", "must be a static Python int",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=8.0), F32, IDX)),
    ("num_experts-traced", TypeError, "num_experts", "must be a static Python int",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=jnp.int32(E)), F32, IDX)),
    ("layout-num_experts-bool", TypeError, "num_experts", "must be a static Python int",
     traced(lambda i: BUF.get_dispatch_layout(i, True), IDX)),
    ("num_worst_tokens", ValueError, "num_worst_tokens", "must be >= 1",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=E, num_worst_tokens=0),
            F32, IDX)),
    ("x-dtype", TypeError, "x", "must be bfloat16 or float32",
     traced(lambda x, i: BUF.dispatch(x.astype(jnp.float16), topk_idx=i, num_experts=E),
            F32, IDX)),
    ("x-rank", ValueError, "x", r"must have shape \[num_tokens, hidden\]",
     traced(lambda x, i: BUF.dispatch(x[0], topk_idx=i, num_experts=E), F32, IDX)),
    ("x-not-array", TypeError, "x", "must be an array",
     traced(lambda i: BUF.dispatch([[1.0]], topk_idx=i, num_experts=E), IDX)),
    ("topk_idx-rows", ValueError, "topk_idx", "must have shape",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i[:3], num_experts=E), F32, IDX)),
    ("topk_idx-dtype", TypeError, "topk_idx", "must be int32 or int64",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i.astype(jnp.float32), num_experts=E),
            F32, IDX)),
    ("topk_idx-columns", ValueError, "topk_idx", "needs at least one column",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i[:, :0], num_experts=E), F32, IDX)),
    ("topk_idx-missing", ValueError, "topk_idx", "are required",
     traced(lambda x: BUF.dispatch(x), F32)),
    ("layout-topk_idx-rank", ValueError, "topk_idx", "must have shape",
     traced(lambda i: BUF.get_dispatch_layout(i[:, 0], E), IDX)),
    ("topk_weights-shape", ValueError, "topk_weights", "must have shape",
     traced(lambda x, i, w: BUF.dispatch(x, topk_idx=i, topk_weights=w[:, :1],
                                         num_experts=E), F32, IDX, W)),
    ("topk_weights-dtype", TypeError, "topk_weights", "must be a float array",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, topk_weights=i, num_experts=E),
            F32, IDX)),
    ("layout-type", TypeError, "layout", "must be the DispatchLayout",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=E, layout=(1, 2, 3)),
            F32, IDX)),
    ("layout-shape", ValueError, "layout", "is_token_in_rank has shape",
     traced(lambda x, i: BUF.dispatch(x, topk_idx=i, num_experts=E,
                                      layout=BUF.get_dispatch_layout(i[:4], E)), F32, IDX)),
    ("cached-extra-args", ValueError, "handle", "pass only x and optionally topk_weights",
     with_handle(lambda x, i, h: BUF.dispatch(x, topk_idx=i, handle=h))),
    ("cached-tokens", ValueError, "handle", "x has 4 tokens but the handle was made for 8",
     with_handle(lambda x, i, h: BUF.dispatch(x[:4], handle=h))),
    ("cached-topk_weights-rank", ValueError, "topk_weights", "must be",
     with_handle(lambda x, i, h: BUF.dispatch(x, handle=h, topk_weights=x[:, 0]))),
    ("combine-handle-type", TypeError, "handle", "must be the DispatchHandle",
     traced(lambda x: BUF.combine(x, (1, 2)), F32)),
    ("combine-handle-replicated", ValueError, "handle", r"in_specs=P\(axis\)",
     traced(lambda y, h: BUF.combine(y, h), jax.ShapeDtypeStruct((R * N * R, H), jnp.float32),
            stacked_handle(), in_specs=(P("ep"), P()))),
    ("combine-y-rows", ValueError, "y", "y has 5 rows but the handle's receive capacity",
     with_handle(lambda x, i, h: BUF.combine(x[:5], h))),
    ("combine-y-dtype", TypeError, "y", "must be bfloat16 or float32",
     with_handle(lambda x, i, h: BUF.combine(jnp.zeros((N * R, H), jnp.int32), h))),
    ("combine-topk_weights", ValueError, "topk_weights", "must have shape",
     with_handle(lambda x, i, h: BUF.combine(jnp.zeros((N * R, H)), h,
                                             topk_weights=jnp.zeros((N, K))))),
    ("moe-top_k-float", TypeError, "top_k", "must be a static Python int",
     block(top_k=2.0)),
    ("moe-top_k-range", ValueError, "top_k", r"must be in \[1, 8\]", block(top_k=9)),
    ("moe-top_k-zero", ValueError, "top_k", "must be >= 1", block(top_k=0)),
    ("moe-router", ValueError, "router", "must be one of", block(top_k=2, router="relu")),
    ("moe-num_experts", TypeError, "num_experts", "must be a static Python int",
     block(top_k=2, num_experts=8.0)),
    ("moe-params-key", ValueError, "params", "needs key 'w_up'",
     block(lambda: {k: v for k, v in _moe_params().items() if k != "w_up"}, top_k=2)),
    ("moe-params-unsharded", ValueError, "w_gate", "shard the expert weights",
     block(lambda: _moe_params(E), top_k=2)),
    ("moe-recv_x", ValueError, "recv_x", "must be",
     lambda: moe.permute_to_expert_major(jnp.zeros((3, H)), jnp.zeros((4, K), jnp.int32), 2)),
]


@pytest.mark.parametrize("exc,name,says,call", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_bad_input_is_refused_naming_the_argument(exc, name, says, call):
  with pytest.raises(exc) as info:
    call()
  message = str(info.value)
  assert re.search(rf"(?<![\w.]){re.escape(name)}(?!\w)", message), message
  assert re.search(says, message), message
  assert message.startswith("jax_ep"), message


def test_the_catalogue_is_complete_enough():
  assert len(CASES) >= 15 and len({c[0] for c in CASES}) == len(CASES)
