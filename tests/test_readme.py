"""The README's Python blocks run as written, as one program, on both mesh kinds."""
import os
import pathlib
import re
import subprocess
import sys

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
MESH_LINE = 'mesh = jax.make_mesh((R,), ("ep",))'

# Appended to the README's program: its first layer against the NumPy reference.
CHECK = '''
import numpy as np
from jax_ep import testing as ept
f32 = lambda a: np.asarray(jnp.asarray(a).astype(jnp.float32))
got = f32(layer(x, topk_idx, topk_weights)).reshape(R, N, H)
xs, idxs, ws = (list(f32(a).reshape(R, N, -1)) for a in (x, topk_idx, topk_weights))
ref = ept.reference_dispatch(xs, [i.astype(np.int32) for i in idxs], ws, E)
ys = [r["recv_x"] * r["recv_topk_weights"].sum(1, keepdims=True) for r in ref]
want, _ = ept.reference_combine(ys, ref, N)
scale = max(np.abs(w).max() for w in want)
err = max(np.abs(got[r] - want[r]).max() for r in range(R))
assert err <= 2e-2 * scale, (err, scale)  # bf16 rounding of y and of the sum
assert all(bool(jnp.isfinite(g).all()) for g in jax.tree_util.tree_leaves(grads))
assert out.shape == (R * N, H) and bool(jnp.isfinite(out.astype(jnp.float32)).all())
print("README_OK", mesh.axis_types)
'''


def _program():
  blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
  assert len(blocks) >= 2, "README lost its Python blocks"
  return "\n".join(blocks)


@pytest.mark.parametrize("axis_type", ["Explicit", "Auto"])
def test_readme_python_blocks_run(axis_type):
  program = _program()
  assert MESH_LINE in program
  if axis_type == "Auto":
    program = program.replace(MESH_LINE, MESH_LINE[:-1] +
                              ", axis_types=(jax.sharding.AxisType.Auto,))")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  res = subprocess.run([sys.executable, "-c", program + CHECK], env=env,
                       capture_output=True, text=True, timeout=300)
  assert res.returncode == 0, res.stderr[-4000:]
  assert f"README_OK ({axis_type},)" in res.stdout, res.stdout
