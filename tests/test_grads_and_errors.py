"""Autodiff through dispatch/combine, jit/scan plumbing, out-of-range ids, buffer sizes.

The trace-time errors are catalogued in test_bad_inputs.py."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.test_util import check_grads
from jax.sharding import NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import testing as ept

R, N, H, K, E = 4, 8, 8, 2, 8


def _setup(seed=0, M=None):
  rng = np.random.default_rng(seed)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  x = rng.standard_normal((R, N, H)).astype(np.float32)
  idx = np.stack([ept.random_routing(rng, N, K, E) for _ in range(R)])
  w = (rng.random((R, N, K)) + 0.1).astype(np.float32)
  sh = NamedSharding(mesh, P("ep"))
  return rng, mesh, buf, jax.device_put(x, sh), jax.device_put(idx, sh), jax.device_put(w, sh)


def test_grads_through_dispatch_expert_combine():
  rng, mesh, buf, x, idx, w = _setup()
  scale = jnp.asarray(rng.standard_normal(H).astype(np.float32))

  def model(x, w, scale):
    def per_rank(x, idx, w):
      recv_x, _, recv_w, _, handle = buf.dispatch(
          x[0], topk_idx=idx[0], topk_weights=w[0], num_experts=E, num_worst_tokens=20)
      # A nonlinear "expert" weighted by the received top-k weights.
      y = jnp.tanh(recv_x * scale) * recv_w.sum(-1, keepdims=True)
      out, out_w = buf.combine(y, handle, topk_weights=recv_w * 2.0)
      return out[None], out_w[None]
    return jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"),
                         out_specs=P("ep"))(x, idx, w)

  model = jax.jit(model)
  check_grads(model, (x, w, scale), order=1, modes=("rev",),
              atol=1e-2, rtol=1e-2)
  # Second order: the backward rules are themselves differentiable.
  check_grads(model, (x, w, scale), order=2, modes=("rev",),
              atol=1e-2, rtol=1e-2)


def test_grad_of_dispatch_is_combine_exactly():
  rng, mesh, buf, x, idx, w = _setup(1)
  ct = rng.standard_normal((R, N * R, H)).astype(np.float32)

  def per_rank(x, idx, ct):
    def f(x):
      return buf.dispatch(x, topk_idx=idx, num_experts=E)[0]
    recv_x, vjp = jax.vjp(f, x)
    (gx,) = vjp(ct)
    handle = buf.dispatch(x, topk_idx=idx, num_experts=E)[4]
    gx_ref, _ = buf.combine(ct, handle)
    return gx, gx_ref

  res = ept.run_per_rank(per_rank, mesh, list(np.asarray(x)), list(np.asarray(idx)),
                         list(ct))
  ref = ept.reference_dispatch(list(np.asarray(x)), list(np.asarray(idx)), [None] * R, E)
  expected, _ = ept.reference_combine(list(ct), ref, N)
  for r in range(R):
    np.testing.assert_array_equal(res[r][0], res[r][1])
    np.testing.assert_allclose(res[r][0], expected[r], rtol=1e-6, atol=1e-6)


def test_handle_is_a_pytree_of_arrays_through_jit_and_scan():
  _, mesh, buf, x, idx, w = _setup(2)

  def per_rank(x, idx):
    x, idx = x[0], idx[0]
    *_, handle = buf.dispatch(x, topk_idx=idx, num_experts=E)

    def step(carry, _):
      h, acc = carry
      recv, _, _, _, h = buf.dispatch(acc, handle=h)
      acc, _ = buf.combine(recv, h)
      return (h, acc), None

    (handle, out), _ = jax.lax.scan(step, (handle, x), None, length=2)
    leaves = jax.tree_util.tree_leaves(handle)
    assert all(isinstance(l, jax.Array) for l in leaves) and len(leaves) == 4
    return out[None], handle.num_recv_tokens

  f = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  out, nrecv = f(x, idx)
  ref = ept.reference_dispatch(list(np.asarray(x)), list(np.asarray(idx)), [None] * R, E)
  for r in range(R):
    copies = np.asarray(ref[r]["is_token_in_rank"]).sum(1)  # ranks each token reached
    np.testing.assert_allclose(np.asarray(out)[r], np.asarray(x)[r] * copies[:, None] ** 2,
                               rtol=1e-5)
    assert int(nrecv[r]) == ref[r]["num_recv_tokens"]


def test_out_of_range_ids_are_ignored_like_minus_one():
  _, mesh, buf, x, idx, w = _setup(4)
  bad = np.asarray(idx).copy()
  bad[:, :, 0] = np.array([E, -5, 10 ** 6, -1])[np.arange(N) % 4]
  clean = np.where((bad >= 0) & (bad < E), bad, -1)

  def per_rank(x, i):
    recv, ridx, _, counts, h = buf.dispatch(x, topk_idx=i, num_experts=E)
    return recv, ridx, counts, h.send_pos

  a = ept.run_per_rank(per_rank, mesh, list(np.asarray(x)), list(bad))
  b = ept.run_per_rank(per_rank, mesh, list(np.asarray(x)), list(clean))
  for r in range(R):
    for u, v in zip(a[r], b[r]):
      np.testing.assert_array_equal(u, v)


def _v1_buffer_bytes(N, H, R, K, itemsize, M):
  """The first design's buffer: every row staged, self included (for comparison)."""
  def align(v):
    return (v + 127) // 128 * 128
  row = H * itemsize
  dispatch = align(align(align(align(align(M * row) + M * K * 4) + M * K * 4) + M * 4) + M * 4)
  combine = align(align(R * N * row) + R * N * K * 4)
  return 4096 + max(dispatch, combine)


def test_buffer_size_hint_matches_the_documented_layout():
  # docs/design.md / ffi/buffer_layout.h: a 4096-byte header, u64 row flags,
  # then the dispatch part or the combine part, every region on a 128-byte
  # boundary; only the header with one rank. Recomputed here independently.
  def align(v):
    return (v + 127) // 128 * 128

  for (N, H, R, K, itemsize, M) in [(4096, 7168, 8, 8, 2, None), (33, 64, 2, 3, 4, 7),
                                    (1, 8, 1, 1, 2, None), (100, 256, 4, 32, 4, 1000)]:
    M_ = M or N * R
    row = H * itemsize
    F = max(M_, (R - 1) * N)  # flag slots; the dispatch stages as many rows
    flags = align(8 * F)
    dispatch = 4096 + flags + align(F * row) + align(F * 2 * K * 4)
    combine = 4096 + flags + align((R - 1) * N * row) + align((R - 1) * N * K * 4)
    expected = 4096 if R == 1 else max(dispatch, combine)
    dtype = jnp.bfloat16 if itemsize == 2 else jnp.float32
    got = jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, dtype, num_worst_tokens=M)
    assert got == expected, (N, H, R, K, itemsize, M)
  # Two axes: the cuda local hop dispatches Nn * F slot rows over the L local
  # ranks into L * Nn * F rows (F = N by default).
  for (N, H, R, Nn, F) in [(4096, 7168, 16, 2, None), (64, 256, 8, 4, 20)]:
    L, F_ = R // Nn, F or N
    got = jax_ep.Buffer.get_buffer_size_hint(N, H, R, 8, num_nodes=Nn,
                                             num_worst_forward_tokens=F)
    assert got == jax_ep.Buffer.get_buffer_size_hint(Nn * F_, H, L, 8,
                                                     num_worst_tokens=L * Nn * F_)


@pytest.mark.parametrize("R", [2, 4, 8])
def test_buffer_no_larger_than_v1_at_the_deepep_shape(R):
  # Issue 9: the v2 data path must not need a larger buffer than v1 did.
  N, H, K = 4096, 7168, 8
  got = jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.bfloat16)
  assert got <= _v1_buffer_bytes(N, H, R, K, 2, N * R)


def test_cuda_backend_needs_nvidia_gpus():
  mesh = ept.make_mesh(2)
  info = jax_ep.build_info()
  expected = (ValueError, "needs a mesh of NVIDIA GPUs") if info["cuda"] else (
      RuntimeError, "needs the extension built with CUDA")
  with pytest.raises(expected[0], match=expected[1]):
    jax_ep.Buffer(mesh, "ep", backend="cuda")
  assert {"extension", "cuda", "jax", "ffi_api_version"} <= set(info)
