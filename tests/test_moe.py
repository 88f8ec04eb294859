"""The expert-parallel MoE block against its dense single-device reference."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import moe
from jax_ep import testing as ept

BACKEND = "xla"


_params = ept.random_moe_params


_put = ept.put_moe
_sharded_loss_and_grads = ept.moe_loss_and_grads
_dense_loss_and_grads = ept.dense_moe_loss_and_grads


def _numpy_tokens_per_expert(idx, E):
  return np.bincount(idx.reshape(-1), minlength=E)


def _numpy_load_balance(probs, idx, E):
  frac = _numpy_tokens_per_expert(idx, E) / idx.size
  return E * np.sum(frac * probs.mean(0))


CASES = [  # R, N (tokens per rank), H, F, E, K, router, normalize
    (1, 16, 16, 24, 8, 2, "softmax", True),
    (2, 12, 16, 24, 8, 3, "sigmoid", True),
    (4, 8, 16, 24, 16, 4, "softmax", False),
    (8, 8, 16, 24, 8, 2, "sigmoid", False),   # one expert per rank
    (8, 6, 16, 24, 16, 3, "softmax", True),
]


@pytest.mark.parametrize("R,N,H,F,E,K,router,normalize", CASES)
def test_moe_block_matches_dense_reference(R, N, H, F, E, K, router, normalize):
  rng = np.random.default_rng([R, N, E, K, len(router), normalize])
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params = _params(rng, H, F, E)
  x = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))

  (loss, (out, aux)), grads = _sharded_loss_and_grads(
      mesh, buf, top_k=K, router=router, normalize=normalize)(*_put(mesh, params, x), ct)
  (loss_ref, out_ref), grads_ref = _dense_loss_and_grads(
      top_k=K, router=router, normalize=normalize)(params, x, ct)

  # f32 throughout; only the summation order differs.
  ept.assert_moe_close(out, grads, out_ref, grads_ref, 1e-5)
  np.testing.assert_allclose(loss, loss_ref, rtol=1e-5)

  # Aux: no drops with the default capacity; routing statistics per rank.
  idx, _, probs = jax.jit(moe.route, static_argnums=(2, 3, 4))(
      params["router"], x, K, router, normalize)
  idx, probs = np.asarray(idx).reshape(R, N, K), np.asarray(probs).reshape(R, N, E)
  assert (np.asarray(aux.num_dropped_tokens) == 0).all()
  ref = ept.reference_dispatch([np.zeros((N, 1), np.float32)] * R, list(idx),
                               [None] * R, E)
  np.testing.assert_array_equal(aux.num_recv_tokens, [r["num_recv_tokens"] for r in ref])
  for r in range(R):
    np.testing.assert_array_equal(aux.tokens_per_expert[r],
                                  _numpy_tokens_per_expert(idx[r], E))
    np.testing.assert_allclose(aux.load_balance_loss[r],
                               _numpy_load_balance(probs[r], idx[r], E), rtol=1e-5)


def test_overflow_is_reported_and_drops_exactly_the_excess_pairs():
  R, N, H, F, E, K, M = 4, 16, 16, 24, 8, 2, 12
  rng = np.random.default_rng(42)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params = _params(rng, H, F, E)
  x = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))

  # Independent account of what a capacity of M rows keeps (NumPy model).
  idx = np.asarray(jax.jit(moe.route, static_argnums=(2, 3, 4))(
      params["router"], x, K, "softmax", True)[0]).reshape(R, N, K)
  ref = ept.reference_dispatch([np.zeros((N, 1), np.float32)] * R, list(idx),
                               [None] * R, E, M)
  El = E // R
  kept = np.zeros((R, N, K), bool)
  for d in range(R):
    for s, i in ref[d]["recv_src"]:
      kept[s, i] |= idx[s, i] // El == d
  dropped = [max(r["num_recv_tokens"] - M, 0) for r in ref]
  assert sum(dropped) > 0 and kept.any(), "the test must overflow some rank"

  (_, (out, aux)), grads = _sharded_loss_and_grads(
      mesh, buf, top_k=K, router="softmax", normalize=True,
      num_worst_tokens=M)(*_put(mesh, params, x), ct)
  (_, out_ref), grads_ref = _dense_loss_and_grads(
      top_k=K, router="softmax", normalize=True,
      slot_mask=jnp.asarray(kept.reshape(R * N, K)))(params, x, ct)

  np.testing.assert_array_equal(aux.num_dropped_tokens, dropped)
  np.testing.assert_array_equal(aux.num_recv_tokens, [r["num_recv_tokens"] for r in ref])
  ept.assert_moe_close(out, grads, out_ref, grads_ref, 1e-5, "with drops: ")


def test_bfloat16_smoke():
  R, N, H, F, E, K = 4, 16, 32, 48, 8, 2
  rng = np.random.default_rng(9)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params = _params(rng, H, F, E, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((R * N, H)), jnp.bfloat16)
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))

  (_, (out, _)), grads = _sharded_loss_and_grads(
      mesh, buf, top_k=K, router="sigmoid", normalize=True)(*_put(mesh, params, x), ct)
  # The reference sees the same bf16 values, upcast, and computes in f32.
  p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  (_, out_ref), grads_ref = _dense_loss_and_grads(
      top_k=K, router="sigmoid", normalize=True)(p32, x.astype(jnp.float32), ct)
  assert out.dtype == jnp.bfloat16
  # The block rounds to bf16 (8-bit mantissa, 2^-9 relative) the SwiGLU hidden
  # state, each weighted expert output, and the combined output: a few
  # roundings of 2^-9 each, so 2e-2 of the output scale is a loose bound that a
  # wrong routing or weighting (errors of order 1) cannot meet.
  ept.assert_moe_close(out, grads, out_ref, grads_ref, 3e-2, "bf16 ", out_rel=2e-2)


def test_expert_major_permutation_and_inverse():
  M, K, El, H = 10, 3, 4, 5
  rng = np.random.default_rng(1)
  recv_x = rng.standard_normal((M, H)).astype(np.float32)
  # Ids with -1 and out-of-range values; repeats allowed with G = M * K.
  idx = rng.integers(-1, El + 1, (M, K)).astype(np.int32)
  idx[-2:] = -1  # Padding rows, as after a dispatch.
  w = rng.random((M, K)).astype(np.float32) + 0.1

  @jax.jit
  def run(recv_x, idx, w):
    gx, gs, plan = moe.permute_to_expert_major(recv_x, idx, El)
    # Garbage in the padding rows must not leak into the inverse.
    pad = jnp.arange(gx.shape[0]) >= gs.sum()
    gy = jnp.where(pad[:, None], jnp.nan, gx * 2.0)
    return gx, gs, plan, moe.unpermute_from_expert_major(gy, plan, w)

  gx, gs, plan, y = jax.tree_util.tree_map(np.asarray, run(recv_x, idx, w))
  slots = [(e, m, k) for m in range(M) for k in range(K)
           for e in [idx[m, k]] if 0 <= e < El]
  slots.sort()  # By expert, then (row, k): the stable order.
  np.testing.assert_array_equal(gs, np.bincount([e for e, _, _ in slots], minlength=El))
  assert gx.shape == (M * K, H)
  for g, (e, m, k) in enumerate(slots):
    np.testing.assert_array_equal(gx[g], recv_x[m])
    assert plan.row_index[g] == m and plan.position[m, k] == g
  n = len(slots)
  assert (gx[n:] == 0).all() and (plan.row_index[n:] == -1).all()
  assert ((plan.position >= 0) == ((idx >= 0) & (idx < El))).all()
  want = np.zeros((M, H), np.float32)
  for e, m, k in slots:
    want[m] += w[m, k] * 2.0 * recv_x[m]
  np.testing.assert_allclose(y, want, rtol=1e-6, atol=1e-6)

  # Distinct ids per row: G = M * min(K, El) rows are enough.
  idx2 = np.stack([rng.permutation(El)[:K] for _ in range(M)]).astype(np.int32)
  idx2[rng.random((M, K)) < 0.3] = -1
  gx2, gs2, plan2 = moe.permute_to_expert_major(recv_x, idx2, El,
                                                num_grouped_rows=M * min(K, El))
  y2 = moe.unpermute_from_expert_major(gx2, plan2, w)
  np.testing.assert_allclose(y2, (w * (idx2 >= 0)).sum(1)[:, None] * recv_x,
                             rtol=1e-6, atol=1e-6)


def test_unsharded_expert_weights_are_rejected():
  R, N, H, F, E = 2, 4, 8, 8, 4
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params = moe.init_moe_params(jax.random.key(0), H, F, E)
  x = jnp.ones((R * N, H), jnp.float32)
  f = jax.shard_map(lambda p, x: moe.moe_block(buf, p, x, top_k=2)[0], mesh=mesh,
                    in_specs=(P(), P("ep")), out_specs=P("ep"))
  with pytest.raises(ValueError, match="shard the expert weights"):
    jax.eval_shape(f, params, x)


@pytest.mark.parametrize("explicit", [False, True])
def test_block_and_dense_reference_take_the_same_placed_arrays_on_both_mesh_kinds(explicit):
  # Issue 11.2: jax.make_mesh gives Explicit axes; the dense reference must
  # accept the expert-sharded parameters and token-sharded x the block takes.
  R, N, H, F, E, K = 4, 8, 16, 24, 8, 2
  rng = np.random.default_rng([17, explicit])
  mesh = ept.make_mesh(R, explicit=explicit)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params, x = _put(mesh, _params(rng, H, F, E),
                   jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32)))
  ct = jax.device_put(rng.standard_normal((R * N, H)).astype(np.float32),
                      NamedSharding(mesh, P("ep")))
  (_, (out, _)), grads = _sharded_loss_and_grads(
      mesh, buf, top_k=K, router="softmax", normalize=True)(params, x, ct)
  (_, out_ref), grads_ref = _dense_loss_and_grads(
      top_k=K, router="softmax", normalize=True)(params, x, ct)
  ept.assert_moe_close(out, grads, out_ref, grads_ref, 1e-5)


def test_expert_impl_is_visible_and_checked():
  R, N, H, F, E, K = 2, 8, 128, 128, 4, 2
  rng = np.random.default_rng(3)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=BACKEND)
  params, x = _put(mesh, _params(rng, H, F, E, dtype=jnp.bfloat16),
                   jnp.asarray(rng.standard_normal((R * N, H)), jnp.bfloat16))
  specs = moe.moe_param_specs("ep")

  def run(expert_impl):
    body = lambda p, x: jax.tree_util.tree_map(
        lambda a: a[None], moe.moe_block(buf, p, x, top_k=K, expert_impl=expert_impl)[1])
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, P("ep")),
                                 out_specs=P("ep")))(params, x)

  # CPU devices: "auto" takes lax.ragged_dot and says so.
  assert run("auto").expert_impl == "ragged_dot"
  assert run("ragged_dot").expert_impl == "ragged_dot"
  with pytest.raises(ValueError, match="impl='mosaic' cannot run: the device is cpu"):
    run("mosaic")
  with pytest.raises(ValueError, match="impl must be one of"):
    run("cutlass")
