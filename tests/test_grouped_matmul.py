"""jax_ep.grouped_matmul against NumPy, for every implementation this machine
runs: "ragged_dot" everywhere, "mosaic" on a Hopper GPU (skipped elsewhere).

Tolerances follow from the arithmetic, not from observed errors: float32
operands accumulate in float32 (ragged_dot); bf16 operands accumulate in
float32 and round the result (and, in a gradient, the incoming cotangent) to
bf16, i.e. a relative error of 2^-8 of the terms' magnitude."""
import zlib

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from jax_ep import grouped_matmul as gmm

MOSAIC = gmm.mosaic_unavailable_reason() is None
IMPLS = ["ragged_dot"] + (["mosaic"] if MOSAIC else [])


@pytest.fixture(autouse=True)
def _float32_matmuls():
  """float32 means float32 (XLA:GPU would otherwise use TF32 for f32 dots)."""
  with jax.default_matmul_precision("highest"):
    yield


def _groups(kind, rng, rows, num_groups):
  """Group sizes summing to at most ``rows``: skewed, with empties, one group, ..."""
  if kind == "skewed":
    p = rng.dirichlet(np.full(num_groups, 0.3))
    sizes = rng.multinomial(rows - rows // 7, p)  # Trailing padding rows too.
  elif kind == "empty":
    sizes = rng.multinomial(rows, rng.dirichlet(np.ones(num_groups)))
    sizes[rng.choice(num_groups, num_groups // 2, replace=False)] = 0
    sizes[0] = 0
    sizes[-1] = 0
  elif kind == "one_group":
    sizes = np.zeros(num_groups, np.int64)
    sizes[rng.integers(num_groups)] = rows
  else:  # "odd": sizes that no block size divides
    sizes = np.array([(37 * (g + 1)) % 61 + 1 for g in range(num_groups)])
    sizes = np.minimum(sizes, rows // num_groups)
  return np.asarray(sizes, np.int32)


def _group_of_rows(sizes, rows):
  g = np.repeat(np.arange(len(sizes)), sizes)
  return np.concatenate([g, np.full(rows - len(g), -1)])


def ref_nn(a, b, sizes):
  g = _group_of_rows(sizes, a.shape[0])
  out = np.zeros((a.shape[0], b.shape[2]))
  for e in range(b.shape[0]):
    out[g == e] = a[g == e] @ b[e]
  return out


def ref_tn(a, b, sizes):
  g = _group_of_rows(sizes, a.shape[0])
  return np.stack([a[g == e].T @ b[g == e] for e in range(len(sizes))])


def _f64(x):
  return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _assert_close(got, want, terms_scale, dtype):
  """|got - want| <= tol * (scale of the summed terms), per element."""
  got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
  tol = 2e-5 if dtype == jnp.float32 else 2.0 ** -7
  err = np.abs(got - want)
  bound = tol * (np.abs(want) + terms_scale) + 1e-30
  worst = np.unravel_index(np.argmax(err / bound), err.shape)
  assert np.all(err <= bound), (
      f"max error {err[worst]:.3g} at {worst} (want {want[worst]:.4g}, bound "
      f"{bound[worst]:.3g})")


def _data(rng, rows, k, n, num_groups, dtype):
  a = jnp.asarray(rng.normal(size=(rows, k)), dtype)
  b = jnp.asarray(rng.normal(size=(num_groups, k, n)) / np.sqrt(k), dtype)
  return a, b


SHAPES = [  # rows, contracted, output columns, groups
    (300, 128, 256, 4),
    (1000, 256, 128, 8),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=["bf16", "f32"])
@pytest.mark.parametrize("groups", ["skewed", "empty", "one_group", "odd"])
@pytest.mark.parametrize("shape", SHAPES, ids=["small", "more_groups"])
def test_forward_and_both_gradients(impl, dtype, groups, shape):
  if impl == "mosaic" and dtype == jnp.float32:
    pytest.skip("the Mosaic kernels take bf16/f16")
  rows, k, n, num_groups = shape
  rng = np.random.default_rng(zlib.crc32(f"{groups}{rows}{dtype}".encode()))
  sizes = _groups(groups, rng, rows, num_groups)
  a, b = _data(rng, rows, k, n, num_groups, dtype)
  ct = jnp.asarray(rng.normal(size=(rows, n)), dtype)
  gs = jnp.asarray(sizes)
  assert gmm.resolve_impl(impl, "nn", a, b, num_groups) == impl

  out, vjp = jax.vjp(lambda a, b: gmm.grouped_matmul(a, b, gs, impl=impl), a, b)
  da, db = vjp(ct)
  A, B, C = _f64(a), _f64(b), _f64(ct)
  # Scales of the summed terms: sqrt(sum of squares) per output element.
  _assert_close(out, ref_nn(A, B, sizes), np.sqrt(ref_nn(A * A, B * B, sizes)), dtype)
  Bt = np.swapaxes(B, 1, 2)
  _assert_close(da, ref_nn(C, Bt, sizes), np.sqrt(ref_nn(C * C, Bt * Bt, sizes)), dtype)
  _assert_close(db, ref_tn(A, C, sizes), np.sqrt(ref_tn(A * A, C * C, sizes)), dtype)
  # Rows past the groups are exactly zero, as lax.ragged_dot leaves them.
  total = int(sizes.sum())
  assert not np.any(np.asarray(out[total:], np.float32))
  assert not np.any(np.asarray(da[total:], np.float32))


@pytest.mark.parametrize("impl", IMPLS)
def test_transposed_product(impl):
  rng = np.random.default_rng(3)
  sizes = _groups("skewed", rng, 700, 6)
  a = jnp.asarray(rng.normal(size=(700, 128)), jnp.bfloat16)
  b = jnp.asarray(rng.normal(size=(700, 256)), jnp.bfloat16)
  got = gmm.grouped_matmul_transposed(a, b, jnp.asarray(sizes), impl=impl)
  A, B = _f64(a), _f64(b)
  _assert_close(got, ref_tn(A, B, sizes), np.sqrt(ref_tn(A * A, B * B, sizes)),
                jnp.bfloat16)


@pytest.mark.parametrize("impl", IMPLS)
def test_forward_mode_and_second_order(impl):
  """jvp, hessian-vector products and vmap of grad go through the same
  kernels and agree with a dense jnp formulation of the same function."""
  rng = np.random.default_rng(11)
  rows, k, n, num_groups = 256, 128, 128, 4
  sizes = _groups("odd", rng, rows, num_groups)
  dtype = jnp.float32 if impl == "ragged_dot" else jnp.bfloat16
  a, b = _data(rng, rows, k, n, num_groups, dtype)
  gs = jnp.asarray(sizes)
  g = jnp.asarray(_group_of_rows(sizes, rows))

  def dense(a, b):
    rows_b = b.astype(jnp.float32)[jnp.maximum(g, 0)]
    out = jnp.einsum("mk,mkn->mn", a.astype(jnp.float32), rows_b,
                     precision=jax.lax.Precision.HIGHEST)
    return jnp.where((g >= 0)[:, None], out, 0.0)

  def loss(mm):
    return lambda a, b: jnp.sum(jnp.tanh(mm(a, b).astype(jnp.float32)) ** 2)

  ours = loss(lambda a, b: gmm.grouped_matmul(a, b, gs, impl=impl,
                                              preferred_element_type=jnp.float32))
  ref = loss(dense)
  va, vb = jnp.cos(a.astype(jnp.float32)).astype(dtype), (b * 2).astype(dtype)
  hvp = lambda f: jax.jvp(jax.grad(f, argnums=(0, 1)), (a, b), (va, vb))[1]
  fwd = lambda f: jax.jvp(f, (a, b), (va, vb))[1]
  batched = lambda f: jax.vmap(jax.grad(f), in_axes=(0, None))(jnp.stack([a, -a]), b)
  # bf16: every product rounds to bf16, and an HVP chains three of them.
  rel = 2e-4 if dtype == jnp.float32 else 3e-2
  for transform in (fwd, hvp, batched):
    for got, want in zip(jax.tree_util.tree_leaves(transform(ours)),
                         jax.tree_util.tree_leaves(transform(ref))):
      want = np.asarray(want, np.float64)
      got = np.asarray(jnp.asarray(got, jnp.float32), np.float64)
      tol = rel * (np.abs(want).max() + 1e-30)
      assert np.abs(got - want).max() <= tol, (transform, np.abs(got - want).max(), tol)


def test_cpu_takes_the_fallback_and_says_why():
  if MOSAIC:
    pytest.skip("this machine runs the Mosaic kernels")
  a = jnp.zeros((128, 128), jnp.bfloat16)
  b = jnp.zeros((2, 128, 128), jnp.bfloat16)
  assert gmm.resolve_impl("auto", "nn", a, b, 2) == "ragged_dot"
  with pytest.raises(ValueError, match="impl='mosaic' cannot run"):
    gmm.resolve_impl("mosaic", "nn", a, b, 2)
  with pytest.raises(ValueError, match="impl must be one of"):
    gmm.grouped_matmul(a, b, jnp.array([64, 64]), impl="fast")


def test_bad_shapes_name_the_problem():
  with pytest.raises(ValueError, match="group_sizes must be a 1-D integer"):
    gmm.grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 8, 3)), jnp.zeros((2,)))
  with pytest.raises(ValueError, match=r"do not fit \[M,K\] x \[G,K,N\]"):
    gmm.grouped_matmul(jnp.zeros((4, 8)), jnp.zeros((2, 7, 3)), jnp.array([2, 2]))


@pytest.mark.skipif(not MOSAIC, reason="needs the Mosaic kernels (a Hopper GPU)")
@pytest.mark.parametrize("mode", gmm.MODES)
def test_every_tiling_in_the_table(mode):
  """The shapes above pick small tiles; the benchmark shapes pick the table's
  first entries (192-row tiles, column grouping). Run every entry once."""
  rng = np.random.default_rng(zlib.crc32(mode.encode()))
  rows, groups = 1000, 5
  sizes = _groups("skewed", rng, rows, groups)
  gs = jnp.asarray(sizes)
  bf = jnp.bfloat16
  if mode == "nn":     # [M, 256] x [G, 256, 1024]
    a, b = jnp.asarray(rng.normal(size=(rows, 256)), bf), jnp.asarray(
        rng.normal(size=(groups, 256, 1024)) / 16, bf)
    A, B = _f64(a), _f64(b)
    want, scale = ref_nn(A, B, sizes), np.sqrt(ref_nn(A * A, B * B, sizes))
  elif mode == "nt":   # [M, 256] x [G, 1024, 256].T
    a, b = jnp.asarray(rng.normal(size=(rows, 256)), bf), jnp.asarray(
        rng.normal(size=(groups, 1024, 256)) / 16, bf)
    A, Bt = _f64(a), np.swapaxes(_f64(b), 1, 2)
    want, scale = ref_nn(A, Bt, sizes), np.sqrt(ref_nn(A * A, Bt * Bt, sizes))
  else:                # [M, 1024].T x [M, 256] per group
    a, b = jnp.asarray(rng.normal(size=(rows, 1024)), bf), jnp.asarray(
        rng.normal(size=(rows, 256)), bf)
    A, B = _f64(a), _f64(b)
    want, scale = ref_tn(A, B, sizes), np.sqrt(ref_tn(A * A, B * B, sizes))
  tilings = {t for size in ("large", "small") for t in gmm._TILINGS[mode][size]}
  try:
    for t in sorted(tilings, key=str):
      gmm._tiling_override[mode] = t
      assert gmm.pick_tiling(mode, a.shape, b.shape, groups) == t, (t, "does not fit")
      got = jax.jit(lambda a, b: gmm._mosaic(mode, a, b, gs, jnp.float32))(a, b)
      _assert_close(got, want, scale, jnp.bfloat16)
  finally:
    gmm._tiling_override.clear()
