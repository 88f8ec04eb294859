"""Forward-mode autodiff through dispatch, cached dispatch and combine (issue 11.3).

The ops are linear in their data (``x``, ``y``, the weights), so a tangent
goes through the same op as the data, exactly; jvp, jacfwd, hessian and
jvp-of-grad work, vmap of grad too, and reverse mode costs no more collective
calls than the forward ops' transposes.
"""
import re

import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
from jax.test_util import check_grads

import jax_ep
from jax_ep import testing as ept

R, N, H, K, E, M = 4, 6, 8, 2, 8, 14  # M < N * R: some cases drop tokens


def _setup(backend, seed):
  rng = np.random.default_rng(seed)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)
  sh = NamedSharding(mesh, P("ep"))
  put = lambda a: jax.device_put(a, sh)
  x = put(rng.standard_normal((R, N, H)).astype(np.float32))
  idx = put(np.stack([ept.random_routing(rng, N, K, E) for _ in range(R)]))
  w = put((rng.random((R, N, K)) + 0.1).astype(np.float32))
  return rng, mesh, buf, x, idx, w, put


def _model(mesh, buf):
  """dispatch -> nonlinear experts -> combine, plus a cached dispatch of sin(x)."""
  def per_rank(x, idx, w, scale):
    x, idx, w = x[0], idx[0], w[0]
    recv_x, _, recv_w, _, h = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                           num_experts=E, num_worst_tokens=M)
    recv2, _, recv_w2, _, _ = buf.dispatch(jnp.sin(x), handle=h, topk_weights=w * w)
    y = jnp.tanh(recv_x * scale) * recv_w.sum(-1, keepdims=True) + recv2 * recv_w2[:, :1]
    out, out_w = buf.combine(y, h, topk_weights=recv_w * recv_w2)
    return out[None], out_w[None]

  def f(x, w, scale, idx):
    return jax.shard_map(per_rank, mesh=mesh, in_specs=(P("ep"), P("ep"), P("ep"), P()),
                         out_specs=P("ep"))(x, idx, w, scale)
  return f


def test_forward_and_reverse_mode_match_finite_differences(backend):
  rng, mesh, buf, x, idx, w, _ = _setup(backend, 0)
  scale = jnp.asarray(rng.standard_normal(H).astype(np.float32))
  f = jax.jit(lambda x, w, scale: _model(mesh, buf)(x, w, scale, idx))
  # Order 2 in both modes (jvp of jvp, vjp of vjp) on xla; the emulated
  # ragged collective compiles slowly, and its ops' tangents are checked
  # exactly below.
  order = 2 if backend == "xla" else 1
  check_grads(f, (x, w, scale), order=order, modes=("fwd", "rev"), atol=1e-2, rtol=1e-2)


def test_tangents_go_through_the_same_ops_exactly(backend):
  rng, mesh, buf, x, idx, w, put = _setup(backend, 1)
  v = put(rng.standard_normal((R, N, H)).astype(np.float32))
  vw = put(rng.standard_normal((R, N, K)).astype(np.float32))
  u = put(rng.standard_normal((R, M, H)).astype(np.float32))

  def per_rank(x, idx, w, v, vw, u):
    x, idx, w, v, vw, u = x[0], idx[0], w[0], v[0], vw[0], u[0]
    go = lambda x, w: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                   num_worst_tokens=M)
    (recv_x, recv_idx, recv_w, counts, h), (t_x, _, t_w, _, _) = jax.jvp(go, (x, w), (v, vw))
    _, _, direct_w, _, _ = go(v, vw)  # dispatch of the tangent itself
    direct_x = go(v, w)[0]
    cached = lambda x, w: buf.dispatch(x, handle=h, topk_weights=w)
    (_, _, c_w, _, _), (tc_x, _, tc_w, _, _) = jax.jvp(cached, (x, w), (v, vw))
    comb = lambda y, rw: buf.combine(y, h, topk_weights=rw)
    _, (tcomb, tcomb_w) = jax.jvp(comb, (recv_x, recv_w), (u, t_w))
    return [a[None] for a in (t_x, direct_x, t_w, direct_w, tc_x, cached(v, vw)[0], tc_w,
                              cached(v, vw)[2], tcomb, comb(u, t_w)[0], tcomb_w,
                              comb(u, t_w)[1])]

  out = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))(
      x, idx, w, v, vw, u)
  out = [np.asarray(o) for o in out]
  for k in range(0, len(out), 2):
    np.testing.assert_array_equal(out[k], out[k + 1], err_msg=f"pair {k // 2}")
  assert np.abs(out[0]).max() > 0 and np.abs(out[8]).max() > 0


def test_jacfwd_hessian_and_hvp_match_reverse_mode(backend):
  rng, mesh, buf, x, idx, w, put = _setup(backend, 2)
  scale = jnp.asarray(rng.standard_normal(H).astype(np.float32))
  model = _model(mesh, buf)

  def loss(scale, x, w):
    out, out_w = model(x, w, scale, idx)
    return jnp.sum(jnp.sin(out) ** 2) + jnp.sum(out_w ** 3)

  fwd = jax.jit(jax.jacfwd(loss))(scale, x, w)
  rev = jax.jit(jax.jacrev(loss))(scale, x, w)
  np.testing.assert_allclose(fwd, rev, rtol=1e-5, atol=1e-5)
  if backend == "xla":  # (slow to compile on the emulated ragged collective)
    hess = jax.jit(jax.hessian(loss))(scale, x, w)  # jacfwd of jacrev
    hess_rev = jax.jit(jax.jacrev(jax.jacrev(loss)))(scale, x, w)
    np.testing.assert_allclose(hess, hess_rev, rtol=1e-4, atol=1e-4)

  # Hessian-vector product in x: jvp of grad, against finite differences of grad.
  v = put(rng.standard_normal((R, N, H)).astype(np.float32))
  grad_x = jax.jit(jax.grad(loss, argnums=1))
  hvp = jax.jit(lambda x: jax.jvp(lambda x: jax.grad(loss, argnums=1)(scale, x, w),
                                  (x,), (v,))[1])(x)
  eps = 1e-3
  fd = (grad_x(scale, x + eps * v, w) - grad_x(scale, x - eps * v, w)) / (2 * eps)
  np.testing.assert_allclose(hvp, fd, rtol=2e-2, atol=2e-2)


def test_vmap_of_grad(backend):
  rng, mesh, buf, x, idx, w, put = _setup(backend, 3)
  B = 3
  xs = put(rng.standard_normal((R, B, N, H)).astype(np.float32))

  def per_rank(xs, idx, w):
    def loss(x):
      recv_x, _, recv_w, _, h = buf.dispatch(x, topk_idx=idx[0], topk_weights=w[0],
                                             num_experts=E, num_worst_tokens=M)
      out, _ = buf.combine(jnp.sin(recv_x) * recv_w[:, :1], h)
      return jnp.sum(out ** 2)
    batched = jax.vmap(jax.grad(loss))(xs[0])
    one_by_one = jnp.stack([jax.grad(loss)(xs[0, b]) for b in range(B)])
    return batched[None], one_by_one[None]

  got, want = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"),
                                    out_specs=P("ep")))(xs, idx, w)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _collectives(fn, *args):
  """Collective ops in the lowered program (each is a launch on the xla backend)."""
  text = jax.jit(fn).lower(*args).as_text()
  return len(re.findall(r"stablehlo\.(?:all_to_all|all_gather|all_reduce)\b", text))


def test_reverse_mode_costs_one_transpose_per_op():
  # Reverse mode through dispatch -> cached dispatch -> combine costs what the
  # hand-written backward below costs: one op per forward op (combine for
  # dispatch and for cached dispatch, cached dispatch for combine), the
  # weights travelling with the rows.
  rng, mesh, buf, x, idx, w, put = _setup("xla", 4)
  shard = lambda f: jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))

  def forward(x, idx, w):
    recv_x, _, recv_w, _, h = buf.dispatch(x[0], topk_idx=idx[0], topk_weights=w[0],
                                           num_experts=E, num_worst_tokens=M)
    recv2, _, _, _, _ = buf.dispatch(x[0] * 2, handle=h)
    out, out_w = buf.combine(jnp.sin(recv_x) + recv2, h, topk_weights=recv_w)
    return out, out_w, recv_x, recv_w, h

  def loss(x, w):
    out, out_w = shard(lambda *a: [o[None] for o in forward(*a)[:2]])(x, idx, w)
    return jnp.sum(out ** 2) + jnp.sum(out_w ** 2)

  def by_hand(x, idx, w):
    out, out_w, recv_x, recv_w, h = forward(x, idx, w)
    g_y, _, g_rw, _, _ = buf.dispatch(2 * out, handle=h, topk_weights=2 * out_w)
    g_x2, _ = buf.combine(g_y, h)
    g_x, g_w = buf.combine(g_y * jnp.cos(recv_x), h,
                           topk_weights=jnp.where(recv_w != 0, g_rw, 0.0))
    return (g_x + 2 * g_x2)[None], g_w[None]

  n_grad = _collectives(jax.grad(loss, argnums=(0, 1)), x, w)
  n_by_hand = _collectives(shard(by_hand), x, idx, w)
  assert n_grad <= n_by_hand, (n_grad, n_by_hand)
  # The hand-written backward is the gradient.
  got = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, w)
  want = jax.jit(shard(by_hand))(x, idx, w)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
