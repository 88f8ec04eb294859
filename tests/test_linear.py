"""jax_ep.linear: a linear map with its own transpose must behave, under
every transformation, exactly like the same map written in plain jnp."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jax_ep.linear import linear_call

jax.config.update("jax_enable_x64", False)


def take_rows(x, index):
  """x[index] with a scatter-add transpose (what dispatch's rows do)."""
  def forward(res, ops):
    return (ops[0][res[0]],)

  def transpose(res, cts):
    zeros = jnp.zeros((x.shape[0],) + cts[0].shape[1:], cts[0].dtype)
    return (zeros.at[res[0]].add(cts[0]),)
  return linear_call(forward, transpose, (index,), (x,))[0]


@jax.custom_jvp
def matmul(a, b):
  """A bilinear op whose derivatives are linear_calls of itself."""
  return a @ b


@matmul.defjvp
def _matmul_jvp(primals, tangents):
  a, b = primals
  da, db = tangents
  in_a = linear_call(lambda r, o: (matmul(o[0], r[0]),),
                     lambda r, c: (matmul(c[0], r[0].T),), (b,), (da,))[0]
  in_b = linear_call(lambda r, o: (matmul(r[0], o[0]),),
                     lambda r, c: (matmul(r[0].T, c[0]),), (a,), (db,))[0]
  return matmul(a, b), in_a + in_b


def _loss(take, mm):
  def f(x, w, index):
    return jnp.sum(jnp.sin(mm(take(x, index), w)) ** 2)
  return f


OURS = _loss(take_rows, matmul)
PLAIN = _loss(lambda x, i: x[i], lambda a, b: a @ b)


@pytest.fixture
def data():
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(5, 3)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(3, 4)), jnp.float32)
  index = jnp.asarray(rng.integers(0, 5, size=6), jnp.int32)
  return x, w, index


def _close(a, b):
  for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
    np.testing.assert_allclose(np.asarray(u), np.asarray(v), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("transform", [
    lambda f: jax.grad(f, argnums=(0, 1)),
    lambda f: jax.jacfwd(f, argnums=(0, 1)),
    lambda f: jax.hessian(f, argnums=(0, 1)),
    lambda f: jax.jit(jax.jacrev(jax.jacfwd(f, argnums=1), argnums=0)),
    lambda f: (lambda x, w, i: jax.jvp(lambda x: jax.grad(f, argnums=1)(x, w, i),
                                       (x,), (jnp.cos(x),))),
], ids=["grad", "jacfwd", "hessian", "jacrev_of_jacfwd", "jvp_of_grad"])
def test_matches_plain_jnp(data, transform):
  _close(transform(OURS)(*data), transform(PLAIN)(*data))


def test_vmap_of_grad(data):
  x, w, index = data
  xs = jnp.stack([x, 2 * x, x - 1])
  g = lambda f: jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(0, None, None))
  _close(g(OURS)(xs, w, index), g(PLAIN)(xs, w, index))
  # Batched index (a residual) and batched weights too.
  idxs = jnp.stack([index, index[::-1], (index + 1) % 5])
  ws = jnp.stack([w, -w, w * w])
  g2 = lambda f: jax.vmap(jax.grad(f, argnums=(0, 1)), in_axes=(None, 0, 0))
  _close(g2(OURS)(x, ws, idxs), g2(PLAIN)(x, ws, idxs))


def test_inside_shard_map(data):
  x, w, index = data
  mesh = jax.make_mesh((8,), ("ep",), axis_types=(jax.sharding.AxisType.Explicit,))
  with jax.set_mesh(mesh):
    xs = jax.device_put(jnp.tile(x, (8, 1)) * jnp.repeat(jnp.arange(1., 9.), 5)[:, None],
                        NamedSharding(mesh, P("ep")))

    def per_rank(f):
      return jax.jit(jax.shard_map(
          lambda xs: jax.grad(f)(xs, w, index)[None] + 0 * jax.jvp(
              lambda z: f(z, w, index), (xs,), (xs,))[1],
          mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    _close(per_rank(OURS)(xs), per_rank(PLAIN)(xs))
