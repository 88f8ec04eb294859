"""Time get_dispatch_layout on the xla and cuda backends over a range of token
counts (one process, every local GPU as a rank), to find where the layout
kernel starts to beat XLA's fusions.

Usage: python tools/layout_sweep.py [--tokens 128,256,...] [--topk 8] [--experts 256]
       [--backends xla,cuda,cuda-kernel]

Timing as in jax_ep.bench: ``iters`` calls in one jitted program, each on its
own routing and taking the previous result through an optimization barrier,
less the same program without the calls; host clock, median of ``reps``.
Backends: ``xla``, ``cuda`` (``get_dispatch_layout`` as users call it) and
``cuda-kernel`` (the layout kernel at every size, even where the cuda backend
hands small routings to XLA's fusions).
"""
import argparse
import time

import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--tokens", default="64,128,256,512,1024,2048,4096,8192")
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=9)
  ap.add_argument("--backends", default="xla,cuda,cuda-kernel")
  args = ap.parse_args()

  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import Mesh, PartitionSpec as P
  import jax_ep
  from jax_ep import testing as ept

  devices = jax.local_devices()
  R, K, E = len(devices), args.topk, args.experts
  mesh = Mesh(np.array(devices), ("ep",))
  rng = np.random.default_rng(0)
  print(f"layout sweep on {R} x {devices[0].device_kind}, top-{K} of {E}, "
        f"{args.iters} calls per program, median of {args.reps}")
  print("backend | tokens | slots | layout_us")
  for n in [int(t) for t in args.tokens.split(",")]:
    idx = [[ept.random_routing(rng, n, K, E, none_fraction=0.05, invalid_fraction=0.0)
            for _ in range(R)] for _ in range(args.iters)]
    inputs = [ept.stack_per_rank(mesh, per_call)[0] for per_call in idx]
    for backend in args.backends.split(","):
      on_cuda = backend.startswith("cuda")
      buf = jax_ep.Buffer(mesh, "ep", backend="cuda" if on_cuda else backend,
                          num_nvl_bytes=jax_ep.Buffer.get_buffer_size_hint(
                              n, 128, R, K, jnp.bfloat16) if on_cuda else None)
      layout = ((lambda idx: buf._backend.layout_kernel(idx, E)) if backend == "cuda-kernel"
                else (lambda idx: buf.get_dispatch_layout(idx, E)))

      def program(count):
        def f(*vs):
          # Each call takes the previous result through a barrier (no fusing
          # across calls); every result is read after a last barrier, so no
          # output can be dropped.
          prev, outs = jnp.zeros((), jnp.float32), []
          for v in vs[:count]:
            prev, v = lax.optimization_barrier((prev, v))
            prev = layout(v[0])
            outs.append(prev)
          outs = lax.optimization_barrier(outs)
          leaves = jax.tree_util.tree_leaves(outs)
          return sum((a.reshape(-1)[0].astype(jnp.float32) for a in leaves),
                     jnp.zeros((), jnp.float32))[None]
        return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

      full, base = program(args.iters), program(0)
      for fn in (full, base) * 2:
        jax.block_until_ready(fn(*inputs))
      times = []
      for _ in range(args.reps):
        t = time.perf_counter()
        jax.block_until_ready(full(*inputs))
        t_full = time.perf_counter() - t
        t = time.perf_counter()
        jax.block_until_ready(base(*inputs))
        times.append((t_full - (time.perf_counter() - t)) / args.iters)
      print(f"{backend} | {n} | {n * K} | {np.median(times) * 1e6:.2f}", flush=True)
      buf.destroy()


if __name__ == "__main__":
  main()
