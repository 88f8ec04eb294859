"""The low-latency ops and FP8 dispatch (issue 10) against the NumPy reference."""
import numpy as np
import pytest

import jax
import jax.extend
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import jax_ep
from jax_ep import testing as ept

F32 = np.float32


def _bf16(a):
  return np.array(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32))


def _case(rng, R, N, H, K, E, dtype, routing=None):
  rnd = _bf16 if dtype == jnp.bfloat16 else (lambda a: a.astype(F32))
  xs = [rnd(rng.standard_normal((N, H))) for _ in range(R)]
  idxs = routing or [ept.random_routing(rng, N, K, E, none_fraction=0.15,
                                        invalid_fraction=0.05) for _ in range(R)]
  ws = [(rng.random((N, K)) + 0.1).astype(F32) for _ in range(R)]
  return xs, idxs, ws


LL_CASES = [  # R, N, T, H, K, E, dtype
    (8, 5, 8, 128, 4, 16, jnp.bfloat16),   # N < T; two experts a rank: repeats on a rank
    (4, 6, 6, 64, 1, 8, jnp.bfloat16),     # K = 1, N = T
    (2, 7, 9, 32, 3, 4, jnp.float32),
    (1, 4, 4, 128, 2, 4, jnp.bfloat16),    # one rank
]


@pytest.mark.parametrize("R,N,T,H,K,E,dtype", LL_CASES)
def test_low_latency_dispatch_and_combine_match_reference(R, N, T, H, K, E, dtype):
  # The same check the GPU suite runs on the cuda backend.
  res = ept.check_low_latency(0, 1, seed=R * 100 + N, num_ranks=R, num_tokens=N,
                              num_max_tokens=T, hidden=H, num_topk=K, num_experts=E,
                              dtype=jnp.dtype(dtype).name, backend="xla")
  assert res["ranks"] == list(range(R)) and res["copies"] > 0


def test_low_latency_repeated_ids_and_capacity():
  """Every slot names expert 0 (repeats within a row): one copy per (token, k),
  the copies past R*T rows dropped, and combine counts only the kept ones."""
  R, N, T, H, K, E = 2, 3, 4, 32, 3, 4
  rng = np.random.default_rng(7)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  idxs = [np.zeros((N, K), np.int32) for _ in range(R)]
  idxs[1][1] = [0, -1, 9]
  xs, _, ws = _case(rng, R, N, H, K, E, jnp.float32, routing=idxs)

  def f(x, idx, w):
    recv_x, count, h = buf.low_latency_dispatch(x, idx, T, E)
    return recv_x, count, buf.low_latency_combine(recv_x, idx, w, h)

  got = ept.run_per_rank(f, mesh, xs, idxs, ws)
  ref = ept.reference_low_latency_dispatch(xs, idxs, T, E)
  assert ref[0]["recv_count"][0] == R * T < R * N * K - 2  # copies were dropped
  np.testing.assert_array_equal(got[0][1], ref[0]["recv_count"])
  np.testing.assert_array_equal(got[0][0][0], ref[0]["recv_x"][0])
  ys = [ref_r["recv_x"] for ref_r in ref]
  want = ept.reference_low_latency_combine([np.nan_to_num(y) for y in ys], ref, ws, N)
  for r in range(R):
    np.testing.assert_allclose(got[r][2], want[r], rtol=1e-6, atol=1e-6)


def test_low_latency_fp8_rows_are_the_senders_quantized_bytes():
  R, N, T, H, K, E = 4, 6, 8, 256, 3, 8
  rng = np.random.default_rng(11)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  xs, idxs, _ = _case(rng, R, N, H, K, E, jnp.bfloat16)
  xs[0][1, :128] = 0.0                    # an all-zero block
  xs[1][2, 128:] *= 1e4                   # a large one
  xs[1] = _bf16(xs[1])                    # (still bf16 values)

  def f(x, idx):
    (q, s), count, _ = buf.low_latency_dispatch(x.astype(jnp.bfloat16), idx, T, E,
                                                use_fp8=True)
    return jax.lax.bitcast_convert_type(q, jnp.uint8), s, count

  got = ept.run_per_rank(f, mesh, xs, idxs)
  ref = ept.reference_low_latency_dispatch(xs, idxs, T, E)
  for r in range(R):
    qb, s, count = got[r]
    assert qb.shape == (E // R, R * T, H) and s.shape == (E // R, R * T, H // 128)
    np.testing.assert_array_equal(count, ref[r]["recv_count"])
    for e in range(E // R):
      for row, (src, i, _) in enumerate(ref[r]["recv_src"][e]):
        q_ref, s_ref = ept.reference_quantize_fp8(xs[src][i])
        np.testing.assert_array_equal(qb[e, row], q_ref.view(np.uint8))
        np.testing.assert_array_equal(s[e, row], s_ref)
        deq = qb[e, row].view(q_ref.dtype).astype(F32) * np.repeat(s[e, row], 128)
        assert (np.abs(deq - xs[src][i]) <= ept.fp8_error_bound(xs[src][i], s_ref)).all()


def test_quantize_fp8_bound_zero_blocks_and_numpy_reference():
  """``|x - q s| <= 2^-4 |x| + 2^-10 s`` (derivation: ``testing.fp8_error_bound``),
  attained within a factor 2 (so a coarser format would fail), all-zero and
  subnormal blocks give finite scales and exact zeros, and the quantization
  is bit-identical to an ml_dtypes NumPy model."""
  rng = np.random.default_rng(3)
  x = rng.standard_normal((64, 512)).astype(F32)
  x *= 10.0 ** rng.uniform(-6, 6, (64, 4, 1)).repeat(128, 2).reshape(64, 512)
  x[0, :128] = 0.0
  x[1, 128:256] = 1e-40  # float32 subnormals
  x[2, 256:384] = rng.standard_normal(128) * 1e37
  q, s = jax.jit(jax_ep.quantize_fp8)(jnp.asarray(x))
  q, s = np.asarray(q), np.asarray(s)
  assert np.isfinite(s).all() and (s > 0).all()
  deq = np.asarray(jax.jit(jax_ep.dequantize_fp8)(q, s))
  assert np.isfinite(deq).all()
  assert (deq[0, :128] == 0).all()
  bound = ept.fp8_error_bound(x, s)
  err = np.abs(deq - x)
  assert (err <= bound).all(), (err / bound).max()
  normal = np.abs(x / np.repeat(s, 128, -1)) >= 2.0 ** -6
  assert (err[normal] / np.abs(x[normal])).max() > 2.0 ** -5  # the bound is tight
  # NumPy keeps float32 subnormals where XLA flushes them: skip row 1 there.
  q_ref, s_ref = ept.reference_quantize_fp8(x)
  np.testing.assert_array_equal(np.delete(s, 1, 0), np.delete(s_ref, 1, 0))
  np.testing.assert_array_equal(np.delete(q.view(np.uint8), 1, 0),
                                np.delete(q_ref.view(np.uint8), 1, 0))
  # bf16 input, bf16 output.
  xb = jnp.asarray(x[3:5, :256], jnp.bfloat16)
  qb, sb = jax_ep.quantize_fp8(xb)
  assert jax_ep.dequantize_fp8(qb, sb, jnp.bfloat16).dtype == jnp.bfloat16


def test_fp8_block_is_the_kernels():
  """The cuda kernels quantize (and lay out scales) per ffi/buffer_layout.h's
  kFp8Block; the Python format (``jax_ep.fp8.BLOCK``) must be the same."""
  from jax_ep import _ext, fp8
  c = _ext.load()
  if c is None:
    pytest.skip("jax_ep._C is not built")
  assert c.FP8_BLOCK == fp8.BLOCK == 128


def test_low_latency_autodiff_matches_dense_formulas():
  """f32: grad of dispatch = unweighted sum of each token's copies; grad of
  combine in y = weighted copies (zero past the counts), in w = row dots;
  jvp = the op on the tangent; and a finite-difference check of the chain."""
  R, N, T, H, K, E = 4, 5, 6, 16, 3, 8
  rng = np.random.default_rng(5)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  xs, idxs, ws = _case(rng, R, N, H, K, E, jnp.float32)
  El, rows = E // R, R * T
  cts = [rng.standard_normal((El, rows, H)).astype(F32) for _ in range(R)]
  gs = [rng.standard_normal((N, H)).astype(F32) for _ in range(R)]
  ys = [rng.standard_normal((El, rows, H)).astype(F32) for _ in range(R)]

  def f(x, idx, w, ct, g, y):
    disp = lambda x: buf.low_latency_dispatch(x, idx, T, E)[0]
    _, count, h = buf.low_latency_dispatch(x, idx, T, E)
    valid = (jnp.arange(rows)[None, :] < count[:, None])[..., None]
    gx = jax.grad(lambda x: jnp.sum(jnp.where(valid, disp(x), 0.0) * ct))(x)
    tx = jax.jvp(disp, (x,), (g[:, :1] * x,))[1]
    comb = lambda y, w: buf.low_latency_combine(y, idx, w, h)
    gy, gw = jax.grad(lambda y, w: jnp.sum(comb(y, w) * g), argnums=(0, 1))(y, w)
    ty = jax.jvp(comb, (y, w), (ct, jnp.ones_like(w)))[1]
    return gx, jnp.where(valid, tx, 0.0), gy, gw, ty

  got = ept.run_per_rank(f, mesh, xs, idxs, ws, cts, gs, ys)
  ref = ept.reference_low_latency_dispatch(xs, idxs, T, E)
  tref = ept.reference_low_latency_dispatch([g[:, :1] * x for g, x in zip(gs, xs)],
                                            idxs, T, E)
  gx_ref = [np.zeros((N, H), F32) for _ in range(R)]
  gw_ref = [np.zeros((N, K), F32) for _ in range(R)]
  gy_ref = [np.zeros((El, rows, H), F32) for _ in range(R)]
  for d in range(R):
    for e, lst in enumerate(ref[d]["recv_src"]):
      for row, (s, i, k) in enumerate(lst):
        gx_ref[s][i] += cts[d][e, row]
        gy_ref[d][e, row] = ws[s][i, k] * gs[s][i]
        gw_ref[s][i, k] = np.dot(gs[s][i], ys[d][e, row])
  ty_ref = [a + b for a, b in zip(
      ept.reference_low_latency_combine(cts, ref, ws, N),
      ept.reference_low_latency_combine(ys, ref, [np.ones_like(w) for w in ws], N))]
  tol = dict(rtol=1e-5, atol=1e-5)
  for r in range(R):
    gx, tx, gy, gw, ty = got[r]
    np.testing.assert_allclose(gx, gx_ref[r], **tol)
    t_want = np.nan_to_num(tref[r]["recv_x"])
    np.testing.assert_allclose(tx, t_want, **tol)
    np.testing.assert_allclose(gy, gy_ref[r], **tol)
    np.testing.assert_allclose(gw, gw_ref[r], **tol)
    np.testing.assert_allclose(ty, ty_ref[r], **tol)

  # Finite differences of L = <combine(1.5 dispatch(x), w), g>, a quadratic in
  # (x, w): central differences are exact up to float32 rounding, so the
  # directional derivative must match grad . direction to ~1e-4.
  def chain(x, w, gl):
    def body(x, idx, w, gl):
      recv, _, h = buf.low_latency_dispatch(x[0], idx[0], T, E)
      return jnp.sum(buf.low_latency_combine(recv * 1.5, idx[0], w[0], h) * gl[0])[None]
    return jax.shard_map(body, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))(
        x, jnp.asarray(np.stack(idxs)), w, gl).sum()

  args = [jnp.asarray(np.stack(a)) for a in (xs, ws, gs)]
  dirs = [jnp.asarray(rng.standard_normal(a.shape).astype(F32)) for a in args[:2]]
  loss = jax.jit(chain)
  grads = jax.jit(jax.grad(chain, argnums=(0, 1)))(*args)
  h = 1e-2
  fd = (loss(args[0] + h * dirs[0], args[1] + h * dirs[1], args[2])
        - loss(args[0] - h * dirs[0], args[1] - h * dirs[1], args[2])) / (2 * h)
  directional = sum(jnp.vdot(g, d) for g, d in zip(grads, dirs))
  np.testing.assert_allclose(fd, directional, rtol=1e-3)


def test_recv_hook_split_form_gives_the_same_results_and_gradients():
  R, N, T, H, K, E = 4, 5, 8, 128, 2, 8
  rng = np.random.default_rng(13)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  xs, idxs, ws = _case(rng, R, N, H, K, E, jnp.bfloat16)

  def f(x, idx, w):
    x = x.astype(jnp.bfloat16)

    def layer(x, w, split):
      if not split:
        recv, count, h = buf.low_latency_dispatch(x, idx, T, E)
        return buf.low_latency_combine(recv * 2, idx, w, h), recv, count
      state, recv_fn = buf.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
      overlapped = jnp.tanh(w).sum()  # work placed between send and receive
      recv, count, h = recv_fn(overlapped)
      state2, out_fn = buf.low_latency_combine(recv * 2, idx, w, h, return_recv_hook=True)
      return out_fn() + 0 * overlapped.astype(x.dtype), recv, count

    loss = lambda x, w, split: jnp.sum(layer(x, w, split)[0].astype(jnp.float32) ** 2)
    (qa, sa), ca, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)
    _, fp8_fn = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True, return_recv_hook=True)
    (qb, sb), cb, _ = fp8_fn()
    same_fp8 = (jnp.all(jax.lax.bitcast_convert_type(qa, jnp.uint8)
                        == jax.lax.bitcast_convert_type(qb, jnp.uint8))
                & jnp.all(sa == sb) & jnp.all(ca == cb))
    return (layer(x, w, False), layer(x, w, True),
            jax.grad(loss, (0, 1))(x, w, False), jax.grad(loss, (0, 1))(x, w, True),
            same_fp8)

  for plain, split, g_plain, g_split, same_fp8 in ept.run_per_rank(f, mesh, xs, idxs, ws):
    np.testing.assert_array_equal(plain[0], split[0])
    np.testing.assert_array_equal(plain[2], split[2])
    for e, n in enumerate(plain[2]):
      np.testing.assert_array_equal(plain[1][e, :n], split[1][e, :n])
    for a, b in zip(g_plain, g_split):
      np.testing.assert_allclose(np.asarray(a, F32), np.asarray(b, F32), rtol=1e-6, atol=1e-6)
    assert same_fp8


def _consumers(jaxpr, primitive):
  """Equations of ``primitive`` anywhere in ``jaxpr`` (sub-jaxprs included)."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == primitive:
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _consumers(sub, primitive)
  return found


@pytest.mark.parametrize("op", ["dispatch", "combine"])
def test_recv_fn_after_holds_the_receive_until_the_work_is_done(op):
  # XLA orders by data alone: recv_fn(*after) must make the receive's
  # operands depend on `after` (here the one cos -> sum of the work).
  R, N, T, H, K, E = 2, 3, 4, 128, 2, 4
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")

  def f(x, idx, w):
    x = x.astype(jnp.bfloat16)
    work = jnp.cos(w).sum()
    if op == "dispatch":
      _, recv_fn = buf.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
      return recv_fn(work)[1]
    recv, _, h = buf.low_latency_dispatch(x, idx, T, E)
    _, out_fn = buf.low_latency_combine(recv, idx, w, h, return_recv_hook=True)
    return out_fn(work)

  rng = np.random.default_rng(5)
  xs, idxs, ws = _case(rng, R, N, H, K, E, jnp.bfloat16)
  args = ept.stack_per_rank(mesh, xs, idxs, ws)
  jaxpr = jax.make_jaxpr(ept.per_rank_fn(f, mesh))(*args).jaxpr
  (cos,) = _consumers(jaxpr, "cos")
  (total,) = [e for e in _consumers(jaxpr, "reduce_sum") if e.invars[0] in cos.outvars]
  barriers = [e for e in _consumers(jaxpr, "optimization_barrier")
              if total.outvars[0] in e.invars]
  assert barriers, "no barrier makes the receive wait for the work"


@pytest.mark.parametrize("after", [None, "work", 3.0])
def test_recv_fn_after_must_be_arrays(after):
  # None or a constant would order nothing, silently: a trace-time error instead.
  R, T, H, K, E = 2, 4, 128, 2, 4
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")

  def f(x, idx):
    _, recv_fn = buf.low_latency_dispatch(x.astype(jnp.bfloat16), idx, T, E,
                                          return_recv_hook=True)
    return recv_fn(after)[1]

  x = jnp.ones((R * 3, H), jnp.float32)
  idx = jnp.zeros((R * 3, K), jnp.int32)
  with pytest.raises(TypeError, match=r"low_latency_dispatch: recv_fn\(\*after\)"):
    jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep"))).lower(x, idx)


def test_low_latency_trace_time_errors():
  R, E = 4, 8
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")

  def run(fn, N=6, H=128, K=2, b=buf):
    x = jnp.zeros((R * N, H), jnp.bfloat16)
    idx = jnp.zeros((R * N, K), jnp.int32)
    return jax.jit(jax.shard_map(lambda x, i: fn(b, x, i), mesh=mesh, in_specs=P("ep"),
                                 out_specs=P("ep"))).lower(x, idx)

  with pytest.raises(ValueError, match="num_max_dispatch_tokens_per_rank"):
    run(lambda b, x, i: b.low_latency_dispatch(x, i, 5, E)[0])
  with pytest.raises(ValueError, match="H=96"):
    run(lambda b, x, i: b.low_latency_dispatch(x, i, 8, E, use_fp8=True)[0][0], H=96)
  with pytest.raises(ValueError, match="num_experts"):
    run(lambda b, x, i: b.low_latency_dispatch(x, i, 8, 6)[0])

  def bad_y(b, x, i):
    recv, _, h = b.low_latency_dispatch(x, i, 8, E)
    return b.low_latency_combine(recv[:, :-1], i, i.astype(jnp.float32), h)
  with pytest.raises(ValueError, match="y must have shape"):
    run(bad_y)
  with pytest.raises(TypeError, match="LowLatencyHandle"):
    run(lambda b, x, i: b.low_latency_combine(x[None], i, i.astype(jnp.float32), None))
  # Backends without the kernels say so at trace time, naming the op and xla.
  ragged = jax_ep.Buffer(mesh, "ep", backend="ragged")
  with pytest.raises(NotImplementedError, match="low_latency_dispatch.*backend='xla'"):
    run(lambda b, x, i: b.low_latency_dispatch(x, i, 8, E)[0], b=ragged)
  with pytest.raises(NotImplementedError, match="not differentiable"):
    run(lambda b, x, i: jax.grad(lambda x: b.low_latency_dispatch(
        x, i, 8, E, use_fp8=True)[0][1].sum())(x.astype(jnp.float32)))


@pytest.mark.parametrize("apart", [False, True])
def test_fp8_normal_dispatch_moves_rows_bit_exactly(backend, apart):
  # The main job's 8 virtual ranks; a capacity below N * R drops rows too.
  # apart: values and scales by two dispatches (the cuda backend's way), here
  # through this backend's ops; packed: one byte row per token.
  res = ept.check_fp8_dispatch(0, 1, backend=backend, num_tokens=12, num_worst_tokens=20,
                               fp8_apart=apart)
  assert res["num_ranks"] == 8 and res["ranks"] == list(range(8))
  assert res["dropped"], "no drops tested"


def test_byte_rows_cross_the_cuda_kernels_as_bfloat16_bit_for_bit():
  # The cuda backend moves FP8 dispatch's packed byte rows as bfloat16 rows
  # (its kernels copy, never compute): every byte value must come back, NaN
  # bit patterns included, at widths that need padding to 16 bytes and not.
  from jax_ep.backends.cuda import byte_rows_as_bf16
  rng = np.random.default_rng(5)
  for width in (264, 7392, 17):
    rows = rng.integers(0, 256, (9, width), dtype=np.uint8)
    rows[0] = np.arange(width) % 256  # every byte value (in the wider rows)
    rows[1] = 0xFF  # all ones: bfloat16 NaNs
    view, restore = byte_rows_as_bf16(jnp.asarray(rows))
    assert view.dtype == jnp.bfloat16
    assert (2 * view.shape[1]) % 16 == 0 and 0 <= 2 * view.shape[1] - width < 16
    np.testing.assert_array_equal(np.asarray(jax.jit(restore)(view)), rows)
    as_bytes = np.asarray(jax.lax.bitcast_convert_type(view, jnp.uint8)).reshape(9, -1)
    np.testing.assert_array_equal(as_bytes[:, :width], rows)
    assert not as_bytes[:, width:].any()  # the padding is zeros
