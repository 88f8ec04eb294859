"""moe_block's low-latency mode and FP8 dispatch against dense_moe_reference."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax

import jax_ep
from jax_ep import moe
from jax_ep import testing as ept

F32 = np.float32


_put = ept.put_moe
_sharded = ept.moe_loss_and_grads
_dense = ept.dense_moe_loss_and_grads


@pytest.mark.parametrize("layout,R,N,T,H,F,E,K", [
    ("packed", 4, 6, 8, 16, 24, 16, 3),   # N < T; several experts of a token on a rank
    ("batched", 8, 4, 4, 16, 24, 8, 2),   # one expert per rank
])
def test_low_latency_moe_matches_dense(layout, R, N, T, H, F, E, K):
  rng = np.random.default_rng([R, N, T, E, K])
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  params = ept.random_moe_params(rng, H, F, E)
  x = jnp.asarray(rng.standard_normal((R * N, H)).astype(F32))
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(F32))
  (_, (out, aux)), grads = _sharded(
      mesh, buf, top_k=K, mode="low_latency", num_max_dispatch_tokens_per_rank=T,
      ll_expert_layout=layout)(*_put(mesh, params, x), ct)
  (_, out_ref), grads_ref = _dense(top_k=K)(params, x, ct)
  # f32 throughout, the same products; only the summation order differs.
  ept.assert_moe_close(out, grads, out_ref, grads_ref, 1e-5)
  # every (token, k) copy arrived
  assert int(np.asarray(aux.num_recv_tokens).sum()) == R * N * K


def test_fp8_dispatch_moe_matches_dense():
  """Two checks. (1) Exactly the quantized block: the dense reference whose
  experts see dequantize(quantize(x)) (routing on x), with a straight-through
  derivative, to the f32 tolerance of the plain block. (2) Against the exact
  dense block: the input moved within e4m3's bound (|x~ - x| <= 2^-4 |x| +
  2^-10 s, testing.fp8_error_bound) and the output by what that explains
  (first order, below). A worst-case bound pushed through SwiGLU (interval
  arithmetic, or the Jacobian's spectral norm) is valid too but comes out
  0.6 to 2 times the output scale here: it could not catch a wrong result."""
  R, N, H, F, E, K = 4, 8, 128, 32, 8, 2
  rng = np.random.default_rng(21)
  mesh = ept.make_mesh(R)
  buf = jax_ep.Buffer(mesh, "ep", backend="xla")
  params = ept.random_moe_params(rng, H, F, E)
  x = jnp.asarray(rng.standard_normal((R * N, H)).astype(F32))
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(F32))
  (_, (out, _)), grads = _sharded(mesh, buf, top_k=K, fp8_dispatch=True)(
      *_put(mesh, params, x), ct)

  def round_trip(x):  # straight through: value x~, derivative 1
    return x + lax.stop_gradient(jax_ep.dequantize_fp8(*jax_ep.quantize_fp8(x)) - x)

  (_, out_q), grads_q = _dense(round_trip, top_k=K)(params, x, ct)
  ept.assert_moe_close(out, grads, out_q, grads_q, 1e-5, "vs quantized dense: ")

  # (2) The input perturbation d = x~ - x obeys e4m3's bound elementwise, and
  # the output moved by what d explains: to first order J d (J the experts'
  # Jacobian at x, routing fixed), with a remainder of relative size ~ |d|/|x|
  # <= 2^-4, so we allow 2^-3 |J d|.
  xq = jax_ep.dequantize_fp8(*jax_ep.quantize_fp8(x))
  _, s = jax_ep.quantize_fp8(x)
  d = np.asarray(xq - x)
  assert (np.abs(d) <= ept.fp8_error_bound(np.asarray(x), np.asarray(s))).all()
  experts = lambda z: moe.dense_moe_reference(params, x, top_k=K, expert_x=z)
  out_exact, jd = jax.jit(lambda z, t: jax.jvp(experts, (z,), (t,)))(x, jnp.asarray(d))
  rem = np.linalg.norm(np.asarray(out, np.float64) - np.asarray(out_exact, np.float64)
                       - np.asarray(jd, np.float64), axis=1)
  first = np.linalg.norm(np.asarray(jd, np.float64), axis=1)
  scale = np.linalg.norm(np.asarray(out_exact, np.float64), axis=1).max()
  assert (rem <= 2.0 ** -3 * first + 1e-5 * scale).all(), (rem / first).max()
  assert first.max() > 1e-3 * scale, "no FP8 rounding visible: was FP8 used?"

  with pytest.raises(ValueError, match="H=64"):
    p64 = ept.random_moe_params(rng, 64, F, E)
    _sharded(mesh, buf, top_k=K, fp8_dispatch=True)(
        *_put(mesh, p64, jnp.zeros((R * N, 64), jnp.float32)), jnp.zeros((R * N, 64)))
