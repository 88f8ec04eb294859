"""Eight virtual CPU devices, set before jax is imported anywhere; the ``backend``
fixture (xla, and ragged on an emulated collective)."""
import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after the flags above)
import jax.numpy as jnp  # noqa: E402
import pytest  # noqa: E402


def _emulated_ragged_all_to_all(operand, output, input_offsets, send_sizes, output_offsets,
                                recv_sizes, *, axis_name):
  """lax.ragged_all_to_all's semantics from all_gathers (per rank, in shard_map)."""
  from jax import lax
  me = lax.axis_index(axis_name)
  ops = lax.all_gather(operand, axis_name)
  in_off, sizes, out_off = (lax.all_gather(a, axis_name)
                            for a in (input_offsets, send_sizes, output_offsets))
  rows = jnp.arange(output.shape[0])
  result = output
  for s in range(ops.shape[0] if ops.shape[1] else 0):  # (no rows to gather from: N = 0)
    start, size = out_off[s, me], sizes[s, me]
    inside = (rows >= start) & (rows < start + size)
    src = jnp.clip(in_off[s, me] + rows - start, 0, ops.shape[1] - 1)
    mask = inside.reshape(inside.shape + (1,) * (output.ndim - 1))
    result = jnp.where(mask, ops[s][src], result)
  # Receivers must expect exactly what senders send.
  return jnp.where(jnp.all(recv_sizes == sizes[:, me]), result, jnp.full_like(result, 7))


@pytest.fixture(params=["xla", "ragged"])
def backend(request, monkeypatch):
  """The portable backends; ``ragged`` on an all-gather emulation of
  ``lax.ragged_all_to_all``, which XLA:CPU lacks."""
  if request.param == "ragged":
    monkeypatch.setattr(jax.lax, "ragged_all_to_all", _emulated_ragged_all_to_all)
  return request.param
