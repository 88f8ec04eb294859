"""Sweep the Mosaic grouped-matmul tilings on one GPU (used to fill
``jax_ep.grouped_matmul._TILINGS``). Prints one line per config and a JSON
summary; times are CUPTI kernel times (median of ``--iters``).

  python tools/gmm_sweep.py [--cases train decode] [--modes nn_gate nn_down nt tn]
"""
import argparse
import itertools
import json
import sys

import numpy as np
import jax
import jax.numpy as jnp
from jax.experimental.mosaic.gpu import profiler

from jax_ep import grouped_matmul as gmm

E, H, F = 32, 7168, 2048
CASES = {"train": 65536, "decode": 2048}


def skewed_sizes(rng, rows, groups):
  return rng.multinomial(rows, rng.dirichlet(np.ones(groups))).astype(np.int32)


def operands(mode, rows, rng):
  k1, k2 = jax.random.split(jax.random.key(int(rng.integers(1 << 30))))
  bf = jnp.bfloat16
  if mode == "nn_gate":   # x [G,H] @ w_gate [E,H,F]
    return jax.random.normal(k1, (rows, H), bf), jax.random.normal(k2, (E, H, F), bf) * 0.02
  if mode == "nn_down":   # h [G,F] @ w_down [E,F,H]
    return jax.random.normal(k1, (rows, F), bf), jax.random.normal(k2, (E, F, H), bf) * 0.02
  if mode == "nt":        # input grad of gate: dgate [G,F] x w_gate[E,H,F]^T
    return jax.random.normal(k1, (rows, F), bf), jax.random.normal(k2, (E, H, F), bf) * 0.02
  # tn: weight grad of gate: x [G,H]^T dgate [G,F]
  return jax.random.normal(k1, (rows, H), bf), jax.random.normal(k2, (rows, F), bf)


def median_ms(f, *args, iters):
  _, times = profiler.measure(f, iterations=iters)(*args)
  return float(np.median(times))


def einsum_ceiling(rows, k, n, iters):
  """Dense batched einsum with equal groups: the tensor-core ceiling."""
  # Random values: constant ones draw less power and clock higher.
  k1, k2 = jax.random.split(jax.random.key(1))
  a = jax.random.normal(k1, (E, rows // E, k), jnp.bfloat16)
  b = jax.random.normal(k2, (E, k, n), jnp.bfloat16)
  f = jax.jit(lambda a, b: jnp.einsum("egk,ekn->egn", a, b))
  return median_ms(f, a, b, iters=iters)


def configs(mode, grid="default"):
  if grid == "wide" and mode != "tn":
    space = itertools.product([(192, 128), (128, 128)], [64, 128], [3, 4, 6], [2, 8, 16])
    return [gmm.Tiling(bm, bn, bk, s, g) for (bm, bn), bk, s, g in space]
  if mode == "tn":
    space = itertools.product([(128, 128), (64, 256), (128, 64)], [64, 128], [2, 4], [1, 8])
    return [gmm.Tiling(bm, bn, bk, s, g) for (bm, bn), bk, s, g in space]
  space = itertools.product([(128, 128), (64, 256), (64, 128)], [64], [3, 4, 6], [1, 4])
  return [gmm.Tiling(bm, bn, bk, s, g) for (bm, bn), bk, s, g in space]


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--cases", nargs="+", default=list(CASES))
  p.add_argument("--modes", nargs="+", default=["nn_gate", "nn_down", "nt", "tn"])
  p.add_argument("--iters", type=int, default=7)
  p.add_argument("--grid", default="default", choices=("default", "wide"))
  p.add_argument("--out", default=None)
  args = p.parse_args()
  rng = np.random.default_rng(0)
  summary = {"device": jax.devices()[0].device_kind, "jax": jax.__version__}
  for case in args.cases:
    rows = CASES[case]
    sizes = jnp.asarray(skewed_sizes(rng, rows, E))
    for mode in args.modes:
      a, b = operands(mode, rows, rng)
      kernel_mode = mode[:2]
      flops = 2 * rows * H * F
      k, n = {"nn_gate": (H, F), "nn_down": (F, H), "nt": (F, H), "tn": (H, F)}[mode]
      ceiling = einsum_ceiling(rows, k, n, args.iters) if mode != "tn" else None
      best = None
      for t in configs(kernel_mode, args.grid):
        gmm._tiling_override[kernel_mode] = t
        if gmm.pick_tiling(kernel_mode, a.shape, b.shape, E) is None:
          continue
        f = jax.jit(lambda a, b: gmm._mosaic(kernel_mode, a, b, sizes, jnp.bfloat16))
        try:
          ms = median_ms(f, a, b, iters=args.iters)
        except Exception as e:  # shared memory or register limits
          print(f"{case} {mode} {t} failed: {str(e).splitlines()[0][:120]}", flush=True)
          continue
        tf = flops / ms / 1e9
        print(f"{case} {mode} {t} {ms:.3f} ms {tf:.0f} TFLOP/s", flush=True)
        if best is None or ms < best[1]:
          best = (t, ms)
      gmm._tiling_override.clear()
      row = {"case": case, "mode": mode, "rows": rows}
      if best:
        row.update(best=best[0].as_kwargs(), ms=best[1], tflops=flops / best[1] / 1e9)
      if ceiling:
        row.update(einsum_ms=ceiling, einsum_tflops=flops / ceiling / 1e9)
      print("BEST", json.dumps(row), flush=True)
      summary.setdefault("rows", []).append(row)
  text = json.dumps(summary, indent=1)
  print(text)
  if args.out:
    open(args.out, "w").write(text)


if __name__ == "__main__":
  sys.exit(main())
