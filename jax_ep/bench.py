"""``python -m jax_ep.bench``: dispatch and combine timings, every backend side by side.

Shapes: DeepEP's (4096 tokens per rank, hidden 7168, top-8, 256 experts) and a
small one (128 tokens per rank). GB/s is counted as DeepEP counts it: bytes of
token rows a rank sends to *other* ranks (dispatch) or receives back from them
(combine), per rank, divided by the op's time. With one rank nothing crosses,
so the table then gives the HBM traffic of our local kernels instead, next to
the measured device-to-device copy bandwidth (read + write counted).

Timing: each op runs ``iters`` times back to back inside one jitted program
(see ``time_backend``: optimization barriers keep XLA from hoisting, merging
or trimming any call); the program is timed with the host clock after a warm-up run, and the
median of ``reps`` runs divided by ``iters`` is reported. Kernels are enqueued
asynchronously, so host overhead is amortised over the ``iters`` calls.

``--ranks N`` runs N processes on one machine as N ranks (``jax_ep.multiprocess``);
on one GPU that emulates N ranks and says nothing about NVLink.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

SHAPES = {  # name: (tokens per rank, hidden, top-k, experts)
    "deepep": (4096, 7168, 8, 256),
    "small": (128, 7168, 8, 256),
}


def crossing_bytes_per_rank(is_token_in_rank_of_each_rank, row_bytes: int) -> float:
  """DeepEP's byte count: token rows a rank sends to *other* ranks, averaged over ranks.

  ``is_token_in_rank_of_each_rank[s]`` is rank s's ``[N, R]`` layout mask.
  """
  import numpy as np
  masks = [np.asarray(m) for m in is_token_in_rank_of_each_rank]
  rows = sum(int(np.delete(m, s, axis=1).sum()) for s, m in enumerate(masks))
  return rows * row_bytes / len(masks)


def _median_seconds(fn, args, reps):
  import numpy as np
  import jax
  run = lambda: jax.block_until_ready(fn(*args))
  run()  # compile + warm up
  run()
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    run()
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def copy_bandwidth(device=None, num_bytes=1 << 30, iters=20, reps=7) -> float:
  """Device-to-device streaming bandwidth in GB/s, bytes read + written counted."""
  import jax
  import jax.numpy as jnp
  from jax import lax
  x = jax.device_put(jnp.ones((num_bytes // 2,), jnp.bfloat16), device)

  @jax.jit
  def run(x):
    for _ in range(iters):  # the barrier keeps XLA from fusing the passes
      x = lax.optimization_barrier(x + jnp.bfloat16(1))
    return x[:1]

  t = _median_seconds(run, (x,), reps) / iters
  return 2 * num_bytes / t / 1e9


def time_backend(mesh, backend, num_tokens, hidden, num_topk, num_experts, *,
                 iters=20, reps=7, seed=0, to_global=None):
  """Per-op seconds for layout, dispatch, cached dispatch and combine on ``mesh``."""
  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  import jax_ep
  from jax_ep import testing as ept

  R = mesh.shape["ep"]
  N, H, K, E = num_tokens, hidden, num_topk, num_experts
  nbytes = (jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.bfloat16)
            if backend == "cuda" else None)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes)
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  idxs = [ept.random_routing(rng, N, K, E, none_fraction=0.0, invalid_fraction=0.0)
          for _ in range(R)]
  ws = [rng.random((N, K)).astype(np.float32) for _ in range(R)]
  to_global = to_global or (lambda m, a: ept.stack_per_rank(m, a)[0])
  args = [to_global(mesh, a) for a in (xs, idxs, ws)]
  shard = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

  # `iters` calls per program, each on its own input (made on the device
  # beforehand), so XLA can neither merge nor hoist them and no extra work is
  # timed; each output goes whole through an optimization barrier before one
  # element of it is returned, so nothing is dead and no op is trimmed to the
  # element read. (Chaining the calls through their outputs instead made XLA
  # add a full copy per call, or merge calls: both seen in ncu's counts.)
  keep = lax.optimization_barrier
  cap = N * R

  def probe(out):
    return jax.tree_util.tree_leaves(keep(out))[0].reshape(-1)[0].astype(jnp.float32)

  def fresh(shape, salt):
    """[R, ...] bf16 normal arrays, one per rank, generated on the devices."""
    def make(key):
      k = jax.random.fold_in(key[0], salt)
      return jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)[None]
    keys = jax.random.split(jax.random.key(seed), R)
    keys = to_global(mesh, [np.asarray(jax.random.key_data(k)) for k in keys])
    return shard(lambda k: make(jax.random.wrap_key_data(k)))(keys)

  inputs_x = [fresh((N, H), k) for k in range(iters)]
  inputs_y = [fresh((cap, H), 1000 + k) for k in range(iters)]

  inputs_idx = [to_global(mesh, [(i + k) % E for i in idxs]) for k in range(iters)]

  def layout_loop(x, idx, w, *idx_variants):
    return jnp.stack([probe(buf.get_dispatch_layout(i[0], E))
                      for i in idx_variants]).sum()[None]

  def dispatch_loop(x, idx, w, *xs):
    layout = buf.get_dispatch_layout(idx[0], E)
    return jnp.stack([probe(buf.dispatch(v[0], topk_idx=idx[0], topk_weights=w[0],
                                         num_experts=E, layout=layout))
                      for v in xs]).sum()[None]

  def setup_handle(x, idx):
    return buf.dispatch(x[0].astype(jnp.bfloat16), topk_idx=idx[0], num_experts=E)[4]

  def cached_loop(x, idx, w, *xs):
    h = setup_handle(x, idx)
    return jnp.stack([probe(buf.dispatch(v[0], handle=h)[0]) for v in xs]).sum()[None]

  def combine_loop(x, idx, w, *ys):
    h = setup_handle(x, idx)
    return jnp.stack([probe(buf.combine(y[0], h)[0]) for y in ys]).sum()[None]

  res = {}
  for name, f, extra in (("layout", layout_loop, inputs_idx),
                         ("dispatch", dispatch_loop, inputs_x),
                         ("cached_dispatch", cached_loop, inputs_x),
                         ("combine", combine_loop, inputs_y)):
    res[name] = _median_seconds(shard(f), args + extra, reps) / iters
  # cached/combine programs also run one setup dispatch: subtract a program
  # that runs only that.
  base = _median_seconds(shard(lambda x, idx, w: probe(setup_handle(x, idx))[None]),
                         args, reps)
  for name in ("cached_dispatch", "combine"):
    res[name] = max(res[name] - base / iters, 0.0)
  res["crossing_bytes"] = crossing_bytes_per_rank(
      [ept.reference_layout(i, E, R)[2] for i in idxs], H * 2)
  # HBM traffic when every token stays here (R = 1): the cuda backend's local
  # path reads each row once and writes it once (the xla backend's gather too).
  res["local_bytes"] = 2 * N * H * 2 if R == 1 else None
  buf.destroy()
  return res


def rank_bench(rank, num_ranks, shapes, iters, reps):
  """One rank of a multi-process benchmark (cuda backend only: no XLA collectives)."""
  from jax_ep import testing as ept
  mesh = ept._global_mesh()
  out = {}
  for s in shapes:
    out[s] = time_backend(mesh, "cuda", *SHAPES[s], iters=iters, reps=reps,
                          to_global=ept._to_global)
  return out


def _row(backend, ranks, shape, res, copy_gbps):
  n, h, k, e = SHAPES[shape]
  cells = [backend, str(ranks), shape, f"{n}x{h} top{k} E{e}"]
  for op in ("layout", "dispatch", "cached_dispatch", "combine"):
    cells.append(f"{res[op] * 1e6:.1f}")
  if ranks > 1:
    gb = res["crossing_bytes"] / 1e9
    cells += [f"{gb / res['dispatch']:.1f}", f"{gb / res['combine']:.1f}", "crossing"]
  else:
    gb = res["local_bytes"] / 1e9
    cells += [f"{gb / res['dispatch']:.0f}", f"{gb / res['combine']:.0f}",
              f"HBM (copy {copy_gbps:.0f})" if copy_gbps else "HBM"]
  return cells


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_ep.bench", description=__doc__)
  ap.add_argument("--shapes", default="deepep,small")
  ap.add_argument("--backends", default="all", help="comma list of xla,cuda or all")
  ap.add_argument("--ranks", type=int, default=0,
                  help="N > 0: N processes as N ranks (cuda backend); 0: all local devices")
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--out", default="", help="folder for results.json and bench.png")
  args = ap.parse_args(argv)
  shapes = args.shapes.split(",")

  rows = []
  if args.ranks:
    from jax_ep.multiprocess import launch
    env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cuda")}
    res = launch("jax_ep.bench:rank_bench", args.ranks, env=env, timeout_s=550,
                 kwargs=dict(shapes=shapes, iters=args.iters, reps=args.reps))
    for s in shapes:
      worst = {op: max(r[s][op] for r in res) for op in
               ("layout", "dispatch", "cached_dispatch", "combine")}
      worst["crossing_bytes"] = res[0][s]["crossing_bytes"]
      rows.append(_row("cuda", args.ranks, s, worst, None))
    device = "emulated ranks on one device"
  else:
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import jax_ep
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("ep",))
    backends = (["xla", "cuda"] if args.backends == "all" else args.backends.split(","))
    if "cuda" in backends and not (jax_ep.build_info()["cuda"] and devices[0].platform == "gpu"):
      backends.remove("cuda")
    copy_gbps = copy_bandwidth(devices[0]) if devices[0].platform == "gpu" else None
    for s in shapes:
      for b in backends:
        rows.append(_row(b, len(devices), s, time_backend(
            mesh, b, *SHAPES[s], iters=args.iters, reps=args.reps), copy_gbps))
    device = f"{len(devices)} x {devices[0].device_kind}"

  header = ["backend", "ranks", "shape", "size", "layout us", "dispatch us",
            "cached us", "combine us", "dispatch GB/s", "combine GB/s", "GB/s of"]
  widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
  print(f"jax_ep.bench on {device}")
  print(" | ".join(h.ljust(w) for h, w in zip(header, widths)))
  for r in rows:
    print(" | ".join(c.ljust(w) for c, w in zip(r, widths)))
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump({"device": device, "header": header, "rows": rows}, f, indent=1)
    _plot(rows, device, os.path.join(args.out, "bench.png"))
  return 0


def _plot(rows, device, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no plot")
    return
  labels = [f"{r[0]} R{r[1]}\n{r[2]}" for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(rows)), 4))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], [float(r[5]) for r in rows], 0.4, label="dispatch")
  ax.bar([x + 0.2 for x in xs], [float(r[7]) for r in rows], 0.4, label="combine")
  ax.set_xticks(list(xs), labels, fontsize=8)
  ax.set_ylabel("microseconds per op (lower is better)")
  ax.set_title(f"jax_ep on {device}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
