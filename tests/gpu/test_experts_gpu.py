"""The MoE block on JAX's Mosaic-GPU grouped matmuls, on every local GPU, in
one process, against the dense single-device reference (outputs and
gradients). Run with JAX_PLATFORMS=cuda (tools/gpu_check.sh, stage experts);
skipped where the Mosaic kernels cannot run."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import grouped_matmul as gmm
from jax_ep import moe
from jax_ep import testing as ept

pytestmark = pytest.mark.skipif(gmm.mosaic_unavailable_reason() is not None,
                                reason=str(gmm.mosaic_unavailable_reason()))


_close = ept.assert_close_to_scale


@pytest.mark.parametrize("backend", ["auto", "xla"])
def test_moe_block_on_mosaic_matches_dense_reference(backend):
  devices = jax.devices()
  R, N, H, F, E, K = len(devices), 96, 256, 128, 8 * len(devices), 2
  mesh = Mesh(np.array(devices), ("ep",))
  buf = jax_ep.Buffer(mesh, "ep", backend=backend)
  rng = np.random.default_rng(5)
  params = ept.random_moe_params(rng, H, F, E, dtype=jnp.bfloat16)
  x = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32), jnp.bfloat16)
  ct = jnp.asarray(rng.standard_normal((R * N, H)).astype(np.float32))
  specs = moe.moe_param_specs("ep")

  def body(p, x):
    out, aux = moe.moe_block(buf, p, x, top_k=K, router="softmax",
                             expert_impl="mosaic")
    assert aux.expert_impl == "mosaic"
    return out

  block = jax.shard_map(body, mesh=mesh, in_specs=(specs, P("ep")), out_specs=P("ep"))
  loss = lambda p, x: jnp.sum(block(p, x).astype(jnp.float32) * ct)
  ps = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  xs = jax.device_put(x, NamedSharding(mesh, P("ep")))
  out = jax.jit(block)(ps, xs)
  grads = jax.jit(jax.grad(loss, argnums=(0, 1)))(ps, xs)

  p32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), params)
  dense = lambda p, x: moe.dense_moe_reference(p, x, top_k=K, router="softmax")
  out_ref = jax.jit(dense)(p32, x.astype(jnp.float32))
  grads_ref = jax.jit(jax.grad(lambda p, x: jnp.sum(dense(p, x) * ct), argnums=(0, 1)))(
      p32, x.astype(jnp.float32))
  # As in tests/test_moe.py's bf16 case: a few bf16 roundings (2^-9 each) of
  # the hidden state, the expert outputs and the result; a wrong group,
  # weight or gradient is off by order 1.
  _close(out, out_ref, 2e-2, "output")
  for name in params:
    _close(grads[0][name], grads_ref[0][name], 3e-2, f"grad {name}")
  _close(grads[1], grads_ref[1], 3e-2, "grad x")
