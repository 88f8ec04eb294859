"""Dispatch, layout and combine of the portable backends against the NumPy reference.

The ``ragged`` backend needs ``lax.ragged_all_to_all``, which XLA:CPU lacks;
here it runs on an all-gather emulation of that collective (the ``backend``
fixture, ``conftest.py``), so what is tested is its offset and size bookkeeping.
"""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing as ept



def _inputs(rng, R, N, H, K, E, dtype):
  xs = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  xs = [np.asarray(jnp.asarray(x, dtype).astype(jnp.float32)) for x in xs]  # exact in dtype
  idxs = [ept.random_routing(rng, N, K, E) for _ in range(R)]
  ws = [rng.random((N, K)).astype(np.float32) + 0.1 for _ in range(R)]
  return xs, idxs, ws


CASES = [  # R, N, H, K, E, M (None = default N*R), dtype
    (1, 16, 8, 2, 4, None, jnp.float32),
    (2, 24, 16, 3, 8, None, jnp.bfloat16),
    (4, 20, 8, 4, 8, None, jnp.float32),
    (8, 12, 32, 4, 16, None, jnp.bfloat16),
    (8, 9, 8, 8, 64, None, jnp.float32),
    (4, 32, 8, 2, 4, 40, jnp.float32),     # capacity below the worst case
    (8, 16, 8, 4, 16, 6, jnp.bfloat16),    # heavy overflow
]


@pytest.mark.parametrize("R,N,H,K,E,M,dtype", CASES)
def test_dispatch_layout_combine_match_reference(backend, R, N, H, K, E, M, dtype):
  rng = np.random.default_rng([R, N, H, K, E, M or 0])
  xs, idxs, ws = _inputs(rng, R, N, H, K, E, dtype)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)
  ref = ept.reference_dispatch(xs, idxs, ws, E, M)
  cap = M or N * R
  # Expert outputs: a fresh random matrix per rank, so each row is distinct.
  ys = [rng.standard_normal((cap, H)).astype(np.float32) for _ in range(R)]
  ys = [np.asarray(jnp.asarray(y, dtype).astype(jnp.float32)) for y in ys]

  def per_rank(x, idx, w, y):
    layout = buf.get_dispatch_layout(idx, E)
    recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(
        x.astype(dtype), topk_idx=idx, topk_weights=w, num_experts=E,
        layout=layout, num_worst_tokens=M)
    out, out_w = buf.combine(y.astype(dtype), handle, topk_weights=recv_w)
    roundtrip, _ = buf.combine(recv_x, handle)
    return layout, recv_x, recv_idx, recv_w, counts, handle, out, out_w, roundtrip

  res = ept.run_per_rank(per_rank, mesh, xs, idxs, ws, ys)
  combined, combined_w = ept.reference_combine(
      ys, ref, N, weights=[r["recv_topk_weights"] for r in ref])
  roundtrip_ref, _ = ept.reference_combine([r["recv_x"] for r in ref], ref, N)
  for r in range(R):
    layout, recv_x, recv_idx, recv_w, counts, handle, out, out_w, rt = res[r]
    e = ref[r]
    np.testing.assert_array_equal(layout.num_tokens_per_rank, e["num_tokens_per_rank"])
    np.testing.assert_array_equal(layout.num_tokens_per_expert, e["num_tokens_per_expert"])
    np.testing.assert_array_equal(layout.is_token_in_rank, e["is_token_in_rank"])
    assert recv_x.shape == (cap, H) and recv_x.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(recv_x.astype(np.float32), e["recv_x"])
    np.testing.assert_array_equal(recv_idx, e["recv_topk_idx"])
    np.testing.assert_array_equal(recv_w, e["recv_topk_weights"])
    np.testing.assert_array_equal(counts, e["num_recv_tokens_per_expert"])
    np.testing.assert_array_equal(handle.num_recv_tokens, [e["num_recv_tokens"]])
    np.testing.assert_array_equal(handle.send_pos, e["send_pos"])
    kept = len(e["recv_src"])
    np.testing.assert_array_equal(handle.recv_src_rank[:kept], [s for s, _ in e["recv_src"]])
    np.testing.assert_array_equal(handle.recv_src_idx[:kept], [i for _, i in e["recv_src"]])
    assert (handle.recv_src_rank[kept:] == -1).all() and (handle.recv_src_idx[kept:] == -1).all()
    assert out.dtype == jnp.dtype(dtype)
    tol = dict(rtol=1e-2, atol=1e-2) if dtype == jnp.bfloat16 else dict(rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out.astype(np.float32), combined[r], **tol)
    np.testing.assert_allclose(out_w, combined_w[r], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rt.astype(np.float32), roundtrip_ref[r], **tol)


def test_overflow_is_reported_and_drops_only_the_excess(backend):
  R, N, H, K, E, M = 4, 16, 8, 2, 4, 5
  rng = np.random.default_rng(7)
  xs, _, ws = _inputs(rng, R, N, H, K, E, jnp.float32)
  # Every token of every rank wants expert 0 (rank 0): 64 tokens for 5 rows.
  idxs = [np.stack([np.zeros(N, np.int32), rng.integers(0, E, N).astype(np.int32)], 1)
          for _ in range(R)]
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)

  def per_rank(x, idx):
    *_, handle = buf.dispatch(x, topk_idx=idx, num_experts=E, num_worst_tokens=M)
    return handle.num_recv_tokens, handle.num_dropped_tokens

  res = ept.run_per_rank(per_rank, mesh, xs, idxs)
  ref = ept.reference_dispatch(xs, idxs, ws, E, M)
  assert int(res[0][0][0]) == R * N and int(res[0][1]) == R * N - M
  for r in range(R):
    np.testing.assert_array_equal(res[r][0], [ref[r]["num_recv_tokens"]])
    assert int(res[r][1]) == max(ref[r]["num_recv_tokens"] - M, 0)


@pytest.mark.parametrize("explicit", [False, True])
def test_drops_are_detected_on_both_mesh_kinds(explicit):
  from jax.experimental import checkify
  R, N, E = 2, 8, 2
  mesh = ept.make_mesh(R, explicit=explicit)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  rng = np.random.default_rng(3)
  xs = [rng.standard_normal((N, 4)).astype(np.float32) for _ in range(R)]
  idxs = [np.zeros((N, 1), np.int32) for _ in range(R)]  # all to rank 0
  args = ept.stack_per_rank(mesh, xs, idxs)

  def dispatch(capacity, x, idx):
    return buf.dispatch(x[0], topk_idx=idx[0], num_experts=E, num_worst_tokens=capacity)[4]

  def checked(capacity):
    def per_rank(x, idx):
      jax_ep.check_no_dropped_tokens(dispatch(capacity, x, idx))
      return x
    return jax.jit(checkify.checkify(jax.shard_map(
        per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))))(*args)[0]

  # README: bring the error to the host before throw(); err.throw() on the
  # device arrays fails inside JAX on Explicit meshes.
  jax.device_get(checked(2 * N)).throw()  # Enough room: no error.
  with pytest.raises(checkify.JaxRuntimeError, match="16 tokens were routed to this rank "
                     "but num_worst_tokens is 3"):
    jax.device_get(checked(3)).throw()
  if not explicit:
    with pytest.raises(checkify.JaxRuntimeError, match="tokens were routed"):
      checked(3).throw()

  # The portable way without checkify: the dropped count, summed over ranks.
  def total_dropped(capacity):
    return jax.jit(jax.shard_map(
        lambda x, idx: jax.lax.psum(dispatch(capacity, x, idx).num_dropped_tokens, "ep"),
        mesh=mesh, in_specs=P("ep"), out_specs=P()))(*args)
  assert int(total_dropped(2 * N)) == 0 and int(total_dropped(3)) == R * N - 3


def test_cached_dispatch_reuses_routing(backend):
  R, N, H, K, E = 4, 16, 8, 3, 8
  rng = np.random.default_rng(11)
  xs, idxs, ws = _inputs(rng, R, N, H, K, E, jnp.float32)
  xs2 = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)

  def per_rank(x, idx, w, x2):
    *_, handle = buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E)
    recv_x2, none_idx, recv_w2, none_counts, handle2 = buf.dispatch(
        x2, handle=handle, topk_weights=w)
    assert none_idx is None and none_counts is None and handle2 is handle
    return recv_x2, recv_w2

  res = ept.run_per_rank(per_rank, mesh, xs, idxs, ws, xs2)
  ref = ept.reference_dispatch(xs2, idxs, ws, E)
  for r in range(R):
    np.testing.assert_array_equal(res[r][0], ref[r]["recv_x"])
    kept = ref[r]["recv_src"]
    expected_w = np.zeros((N * R, K), np.float32)
    for row, (s, i) in enumerate(kept):
      expected_w[row] = ws[s][i]  # Cached dispatch sends weights unmasked.
    np.testing.assert_array_equal(res[r][1], expected_w)


@pytest.mark.parametrize("explicit", [False, True])
def test_both_mesh_kinds_and_int64_ids(explicit):
  R, N, H, K, E = 8, 8, 8, 2, 8
  rng = np.random.default_rng(5)
  xs, idxs, ws = _inputs(rng, R, N, H, K, E, jnp.float32)
  mesh = ept.make_mesh(R, explicit=explicit)
  buf = jax_ep.Buffer(mesh, "ep", backend="auto")
  assert buf.backend == "xla"  # No GPU here.
  res = ept.run_per_rank(
      lambda x, idx: buf.dispatch(x, topk_idx=idx.astype(jnp.int64) if jax.config.jax_enable_x64
                                  else idx, num_experts=E)[0], mesh, xs, idxs)
  ref = ept.reference_dispatch(xs, idxs, ws, E)
  for r in range(R):
    np.testing.assert_array_equal(res[r], ref[r]["recv_x"])


def test_multi_axis_mesh_uses_only_the_ep_axis():
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("dp", "ep"))
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  N, H, E = 6, 8, 8
  rng = np.random.default_rng(2)
  x = rng.standard_normal((2, 4, N, H)).astype(np.float32)
  idx = np.stack([np.stack([ept.random_routing(rng, N, 2, E) for _ in range(4)])
                  for _ in range(2)])

  def body(x, idx):
    out, _ = buf.combine(buf.dispatch(x[0, 0], topk_idx=idx[0, 0], num_experts=E)[0],
                         buf.dispatch(x[0, 0], topk_idx=idx[0, 0], num_experts=E)[4])
    return out[None, None]

  spec = P("dp", "ep")
  f = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=spec, out_specs=spec))
  out = np.asarray(f(jax.device_put(x, NamedSharding(mesh, spec)),
                     jax.device_put(idx, NamedSharding(mesh, spec))))
  for g in range(2):
    ref = ept.reference_dispatch(list(x[g]), list(idx[g]), [None] * 4, E)
    expected, _ = ept.reference_combine([r["recv_x"] for r in ref], ref, N)
    for r in range(4):
      np.testing.assert_allclose(out[g, r], expected[r], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("explicit", [False, True])
def test_handle_leaves_and_reenters_shard_map_with_the_natural_spec(backend, explicit):
  # Issue 11.1: dispatch in one jitted program, combine and cached dispatch in
  # another, the handle passed between them with P("ep") both ways.
  R, N, H, K, E, M = 4, 12, 8, 3, 8, 20
  rng = np.random.default_rng(13)
  xs, idxs, ws = _inputs(rng, R, N, H, K, E, jnp.float32)
  ys = [rng.standard_normal((M, H)).astype(np.float32) for _ in range(R)]
  x2s = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  mesh = ept.make_mesh(R, explicit=explicit)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)
  spec = P("ep")
  shard = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=spec, out_specs=spec))

  first = shard(lambda x, i: buf.dispatch(x[0], topk_idx=i[0], num_experts=E,
                                          num_worst_tokens=M)[4])

  def use(h, y, x2):
    props = jnp.array([h.num_tokens, h.num_ranks, h.capacity], jnp.int32)
    out, _ = buf.combine(y[0], h)
    recv2, _, _, _, _ = buf.dispatch(x2[0], handle=h)
    return out[None], recv2[None], props[None], h.num_dropped_tokens[None]

  def together(x, i, y, x2):
    *_, h = buf.dispatch(x[0], topk_idx=i[0], num_experts=E, num_worst_tokens=M)
    return use(h, y, x2)

  x, idx, y, x2 = ept.stack_per_rank(mesh, xs, idxs, ys, x2s)
  handle = first(x, idx)
  two_jits = shard(use)(handle, y, x2)
  one_program = shard(together)(x, idx, y, x2)
  for a, b in zip(two_jits, one_program):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  out, recv2, props, dropped = map(np.asarray, two_jits)
  ref = ept.reference_dispatch(xs, idxs, ws, E, M)
  ref2 = ept.reference_dispatch(x2s, idxs, ws, E, M)
  combined, _ = ept.reference_combine(ys, ref, N)
  for r in range(R):
    np.testing.assert_array_equal(props[r], [N, R, M])
    assert dropped[r] == max(ref[r]["num_recv_tokens"] - M, 0)
    np.testing.assert_allclose(out[r], combined[r], rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(recv2[r], ref2[r]["recv_x"])
  # Outside, the stacked handle holds every rank's count.
  np.testing.assert_array_equal(np.asarray(handle.num_recv_tokens),
                                [r["num_recv_tokens"] for r in ref])
  assert sum(max(r["num_recv_tokens"] - M, 0) for r in ref) > 0  # the case drops


def test_layout_checker_on_every_path_shape():
  # testing.check_layouts is what the GPU suite runs for the cuda layout's
  # paths; here on the xla backend over the 8 CPU devices, so the checker
  # itself (cases, references, counts) is exercised on every CI run.
  res = ept.check_layouts(0, 1, backend="xla")
  assert res["ranks"] == list(range(res["num_ranks"]))
  assert res["checked"] == 8 * res["num_ranks"]
  assert res["paths"] == ["get_dispatch_layout"]
