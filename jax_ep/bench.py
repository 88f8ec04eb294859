"""``python -m jax_ep.bench``: dispatch and combine timings, backends side by side.

Shapes: DeepEP's (4096 tokens per rank, hidden 7168, top-8, 256 experts) and a
small one (128 tokens per rank). GB/s (``*_gbps``) is counted as DeepEP's tests
count it: bytes of the token rows a rank receives in dispatch (and sends back
in combine), its own rows included, per rank, divided by the op's time.
``*_crossing_gbps`` counts only the rows that cross to another rank, which is
what a link carries (at R = 2 about half of DeepEP's count). With one rank
nothing crosses, so the table then gives the HBM traffic of our local kernels
instead, next to the measured device-to-device copy bandwidth (read + write
counted).

Backends: ``xla`` (padded ``lax.all_to_all``), ``cuda`` (ours) and ``ragged``
(``lax.ragged_all_to_all``, the way a JAX user would write it; in the
one-process model it runs in a child process with a time limit, since XLA's
ragged collective has hung before). A backend that fails gives a row with a
``note`` saying why instead of numbers.

Process models (every row says which): ``one`` (default: this process drives
every local device), ``per-gpu`` (``--ranks N --gpus G``: N processes, process
r on GPU r % G) and ``emulated`` (``--ranks N``: N processes sharing GPU 0,
which says nothing about NVLink).

Timing: each op runs ``iters`` times back to back inside one jitted program,
each call on its own input made on the device beforehand and taking the
previous call's result through an optimization barrier, so XLA cannot fuse
independent calls into one kernel; one element of every result is read after
the last call (one small kernel per program, none between the calls; every
result stays in memory until then). The time of an op is the host time of that
program less the host time of the same program without the calls (its setup
only), divided by ``iters``: median of ``reps`` such differences after
warm-up, the slowest process's where there are several. The host clock is
used because it cannot miss work: XLA schedules its asynchronous collectives
freely, and the optimized HLO showed 67 of the xla dispatch program's 84
all-to-alls placed before a device-clock read that came first in the program,
so device-clock figures for the xla backend were 3x too fast (its dispatch
read 121 us by the device clock, ~400 us by the host). ``--clock device``
still reads the device clock (``jax_ep_clock``, %globaltimer) after the setup
and after the last call, which is right for our kernels (custom calls stay in
program order on the compute stream) and shows their time free of host
overhead. For ops shorter than the host's cost of launching them (small
batches), the host clock measures that launch cost: what a program that runs
them back to back gets.

On machines with several GPUs the copy-engine bandwidth between each pair of
GPUs (both directions at once, 1 GiB each way) is measured first: the ``p2p``
figure the GB/s columns are compared with.

Without a GPU it runs on 8 virtual CPU devices (as ``python -m jax_ep`` does),
the small shape with fewer calls, and reports times only: GB/s of host memory
shared by virtual devices says nothing about a link.
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
    # The low-latency mode on CPU: its [E/R, R*T, H] expert layout at "small"
    # is 470 MB a rank, which 8 virtual ranks on XLA:CPU do not fit in 24 GB.
    "tiny": (16, 1024, 8, 64),
}
OPS = ("layout", "dispatch", "cached_dispatch", "combine")
# Over two axes the node hop alone is timed too: XLA's all-to-all of the Nn * F
# forwarding rows (F = N, the default) over the node axis, as the dispatch sends
# them; the rest of the dispatch is the local hop and the bookkeeping.
TIMED_OPS = OPS + ("node_hop",)


def received_bytes_per_rank(is_token_in_rank_of_each_rank, row_bytes: int) -> float:
  """DeepEP's byte count: token rows a rank receives, its own included, averaged
  over ranks (DeepEP's tests divide ``recv_x.numel() * 2`` by the time, for
  dispatch and combine alike).

  ``is_token_in_rank_of_each_rank[s]`` is rank s's ``[N, R]`` layout mask.
  """
  import numpy as np
  masks = [np.asarray(m) for m in is_token_in_rank_of_each_rank]
  return sum(int(m.sum()) for m in masks) * row_bytes / len(masks)


def crossing_bytes_per_rank(is_token_in_rank_of_each_rank, row_bytes: int) -> float:
  """Token rows a rank sends to *other* ranks (what crosses a link), averaged over ranks.

  ``is_token_in_rank_of_each_rank[s]`` is rank s's ``[N, R]`` layout mask.
  """
  import numpy as np
  masks = [np.asarray(m) for m in is_token_in_rank_of_each_rank]
  rows = sum(int(np.delete(m, s, axis=1).sum()) for s, m in enumerate(masks))
  return rows * row_bytes / len(masks)


def node_hop_bytes_per_rank(is_token_in_rank_of_each_rank, num_local: int,
                            row_bytes: int) -> float:
  """Rows a two-axis Buffer sends across the node axis: one per distinct (token,
  destination node != home node), averaged over ranks (rank s is on node s // L)."""
  import numpy as np
  rows = 0
  for s, m in enumerate(is_token_in_rank_of_each_rank):
    m = np.asarray(m)
    in_node = m.reshape(m.shape[0], -1, num_local).any(axis=2)
    rows += int(np.delete(in_node, s // num_local, axis=1).sum())
  return rows * row_bytes / len(is_token_in_rank_of_each_rank)


def local_hop_bytes_per_rank(is_token_in_rank_of_each_rank, num_local: int,
                             row_bytes: int) -> float:
  """Rows a two-axis Buffer's local hop moves between ranks: the forwarder of
  (token, node n) is rank (n, l) of the token's local index l, and it sends the
  row to every other rank of node n that needs it. Averaged over ranks."""
  import numpy as np
  L, rows = num_local, 0
  for s, m in enumerate(is_token_in_rank_of_each_rank):
    m = np.asarray(m)
    per_node = m.reshape(m.shape[0], -1, L)  # [N, Nn, L]
    rows += int(np.delete(per_node, s % L, axis=2).sum())
  return rows * row_bytes / len(is_token_in_rank_of_each_rank)


def p2p_bandwidths(num_gpus: int) -> dict:
  """Copy-engine GB/s each way for every pair of GPUs ("0-1": 393.0)."""
  from jax_ep import _ext
  c = _ext.load()
  out = {}
  for a in range(num_gpus):
    for b in range(a + 1, num_gpus):
      out[f"{a}-{b}"] = round(float(c.p2p_bandwidth(a, b, 1 << 30, 10)), 1)
  return out


def copy_bandwidth(device=None, num_bytes=1 << 30, iters=20, reps=7) -> float:
  """Device-to-device streaming bandwidth in GB/s, bytes read + written counted."""
  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax import lax
  x = jax.device_put(jnp.ones((num_bytes // 2,), jnp.bfloat16), device)

  @jax.jit
  def run(x):
    for _ in range(iters):  # the barrier keeps XLA from fusing the passes
      x = lax.optimization_barrier(x + jnp.bfloat16(1))
    return x[:1]

  jax.block_until_ready(run(x))
  times = []
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(run(x))
    times.append(time.perf_counter() - t0)
  return 2 * num_bytes / (float(np.median(times)) / iters) / 1e9


def _uses_device_clock(mesh) -> bool:
  from jax_ep import _ext
  return _ext.has_cuda() and all(d.platform == "gpu" for d in mesh.devices.flat)


def time_backend(mesh, backend, num_tokens, hidden, num_topk, num_experts, *,
                 iters=20, reps=7, seed=0, to_global=None, num_sms=None, clock="host",
                 hlo_dir=None, mode="normal", dtype="bf16"):
  """Per-op seconds (lists, one entry per timed run) for layout, dispatch,
  cached dispatch and combine on ``mesh``, for the ranks this process holds.

  ``mode="low_latency"``: ``low_latency_dispatch`` (as "dispatch", with
  ``num_max_dispatch_tokens_per_rank`` = the tokens per rank) and
  ``low_latency_combine`` (as "combine"). ``dtype="fp8"``: the dispatches
  move FP8 rows with their scales (normal mode: pairs quantized beforehand,
  dispatch and cached dispatch only; low-latency mode: ``use_fp8=True``,
  dispatch only); combine is bf16 in either mode, timed in the bf16 rows.

  ``clock="host"`` (default): host time of the program with ``iters`` calls
  less that of the same program without them, divided by ``iters``.
  ``clock="device"``: the device clock after the setup and after the last
  call; right for our kernels only (see the module docstring).
  ``hlo_dir``: write each timed program's optimized HLO there."""
  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  import jax_ep
  from jax_ep import testing as ept

  # "ep", or ("node", "local") for a two-axis mesh (--mesh NODExLOCAL).
  axis = mesh.axis_names[0] if len(mesh.axis_names) == 1 else tuple(mesh.axis_names)
  R = mesh.size
  nodes = mesh.shape[axis[0]] if isinstance(axis, tuple) else 1
  N, H, K, E = num_tokens, hidden, num_topk, num_experts
  nbytes = None
  if backend == "cuda" and mode == "low_latency":
    nbytes = jax_ep.Buffer.get_low_latency_buffer_size_hint(N, H, R, K)
  elif backend == "cuda":
    nbytes = jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.bfloat16, num_nodes=nodes)
  buf = jax_ep.Buffer(mesh, axis, backend=backend, num_nvl_bytes=nbytes, num_sms=num_sms)
  rng = np.random.default_rng(seed)
  idxs = [ept.random_routing(rng, N, K, E, none_fraction=0.0, invalid_fraction=0.0)
          for _ in range(R)]
  ws = [rng.random((N, K)).astype(np.float32) for _ in range(R)]
  to_global = to_global or (lambda m, a: ept.stack_per_rank(m, a, axis_name=axis)[0])
  args = [to_global(mesh, a) for a in (idxs, ws)]
  shard = lambda f: jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
  keep = lax.optimization_barrier
  if clock == "device" and not _uses_device_clock(mesh):
    raise ValueError("clock='device' needs the cuda extension and GPUs")
  device_clock = clock == "device"
  if device_clock:
    from jax_ep.backends.cuda import device_clock as clock

  def stamp(after):
    t = clock(after)
    return lax.pcast(t, axis if isinstance(axis, tuple) else (axis,), to="varying")

  def probe(out):
    return jax.tree_util.tree_leaves(out)[0].reshape(-1)[0].astype(jnp.float32)

  keys = jax.random.split(jax.random.key(seed), R)
  keys = to_global(mesh, [np.asarray(jax.random.key_data(k)) for k in keys])
  generators = {}  # one jitted generator per shape, the salt an operand: one compile each

  def fresh(shape, salt):
    """[R, ...] bf16 normal arrays, one per rank, generated on the devices."""
    if shape not in generators:
      def make(key, salt):
        k = jax.random.fold_in(jax.random.wrap_key_data(key[0]), salt[0, 0])
        return jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)[None]
      generators[shape] = shard(make)
    return generators[shape](keys, to_global(mesh, [np.full((1,), salt, np.int32)] * R))

  cap = N * R
  x0 = fresh((N, H), 999)
  fp8 = dtype == "fp8"
  per_rank = lambda v: jax.tree_util.tree_map(lambda a: a[0], v)
  if mode == "low_latency":
    T = N
    ops = ("dispatch",) if fp8 else ("dispatch", "combine")
    # Expert outputs are [E/R, R*T, H] (470 MB a rank at the small shape):
    # two, alternating, each call still taking its input through the barrier.
    ys = [fresh((E // R, R * T, H), 1000 + k) for k in range(min(iters, 2))] if not fp8 else []
    inputs = {"dispatch": [fresh((N, H), k) for k in range(iters)],
              "combine": [ys[k % len(ys)] for k in range(iters)] if ys else []}
    needs_handle, needs_layout = ("combine",), ()

    def setup(x, idx):
      return buf.low_latency_dispatch(x[0], idx[0], T, E)[2]

    work = {
        "dispatch": lambda v, idx, w, h, layout: buf.low_latency_dispatch(
            v, idx, T, E, use_fp8=fp8)[0],
        "combine": lambda v, idx, w, h, layout: buf.low_latency_combine(v, idx, w, h),
    }
  else:
    ops = ("dispatch", "cached_dispatch") if fp8 else OPS
    if isinstance(axis, tuple) and not fp8:
      ops = ops + ("node_hop",)
    rows_in = [fresh((N, H), k) for k in range(iters)]
    if fp8:
      quantize = shard(lambda v: jax.tree_util.tree_map(lambda a: a[None],
                                                        jax_ep.quantize_fp8(v[0])))
      rows_in = [quantize(v) for v in rows_in]
    inputs = {"layout": [to_global(mesh, [(i + k) % E for i in idxs]) for k in range(iters)],
              "dispatch": rows_in, "cached_dispatch": rows_in,
              "combine": [fresh((cap, H), 1000 + k) for k in range(iters)]}
    if "node_hop" in ops:
      inputs["node_hop"] = [fresh((nodes * N, H), 2000 + k) for k in range(iters)]
    needs_handle, needs_layout = ("cached_dispatch", "combine"), ("dispatch",)

    def setup(x, idx):
      return buf.dispatch(x[0], topk_idx=idx[0], num_experts=E)[4]

    work = {
        "layout": lambda v, idx, w, h, layout: buf.get_dispatch_layout(v, E),
        "dispatch": lambda v, idx, w, h, layout: buf.dispatch(
            v, topk_idx=idx, topk_weights=w, num_experts=E, layout=layout),
        "cached_dispatch": lambda v, idx, w, h, layout: buf.dispatch(v, handle=h)[0],
        "combine": lambda v, idx, w, h, layout: buf.combine(v, h)[0],
        "node_hop": lambda v, idx, w, h, layout: lax.all_to_all(
            v.reshape((nodes, N, H)), axis[0], 0, 0),
    }

  def program(op, n):
    # setup -> clock -> n calls, each on its own input -> clock.
    def f(x, idx, w, *vs):
      h = setup(x, idx) if op in needs_handle else None
      layout = buf.get_dispatch_layout(idx[0], E) if op in needs_layout else None
      ready = (jnp.zeros((), jnp.float32) if h is None else
               jax.tree_util.tree_leaves(h)[0].reshape(-1)[0].astype(jnp.float32))
      if layout is not None:
        ready = ready + layout.num_tokens_per_rank[0].astype(jnp.float32)
      t0 = stamp(ready) if device_clock else ready
      # Each call takes the previous one's whole result through a barrier with
      # its own input (no copy, no kernel), so XLA cannot fuse independent
      # calls; one element of every result is read after the last call, in one
      # fusion, so none is dropped. (Reading each result right after its call,
      # as this did until 2026-11-26, put a small XLA kernel between the calls,
      # which the per-op times then included.)
      # Results are read (and freed) early only past KEPT_BYTES per rank.
      prev, kept, kept_bytes = t0, [], 0
      for v in vs[:n]:
        prev, v = keep((prev, v))
        kept.append(prev)
        prev = work[op](per_rank(v), idx[0], w[0], h, layout)
        kept_bytes += sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(prev))
        if kept_bytes > KEPT_BYTES:  # read them now, before the next call
          prev, partial = keep((prev, sum(probe(r) for r in kept)))
          kept, kept_bytes = [partial], 0
      kept.append(keep(prev))  # every result read through a barrier: XLA cannot
      total = sum(probe(r) for r in kept)  # shrink an op to the one element read
      if not device_clock:
        return total[None]
      return jnp.stack([t0, stamp(total)])[None]
    return shard(f)

  def host_seconds(call):
    t = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - t

  res = {}
  for op in ops:
    fn, base = program(op, iters), program(op, 0)
    call = lambda: fn(x0, *args, *inputs[op])
    call_base = lambda: base(x0, *args, *inputs[op])
    if hlo_dir:
      os.makedirs(hlo_dir, exist_ok=True)
      with open(os.path.join(hlo_dir, f"{backend}_{op}_{N}x{H}.hlo.txt"), "w") as f:
        f.write(fn.lower(x0, *args, *inputs[op]).compile().as_text())
    for c in (call, call_base) * 2:  # compile + warm up
      jax.block_until_ready(c())
    times = []
    for _ in range(reps):
      if device_clock:
        stamps = ept._local_ranks(jax.block_until_ready(call()))
        seconds = max(int(s[1]) - int(s[0]) for s in stamps.values()) * 1e-9
      else:  # the same program without the calls, timed right before, is subtracted
        seconds = host_seconds(call) - host_seconds(call_base)
      times.append(seconds / iters)  # a difference: can be < 0 for ops lost in the noise
    res[op] = times
  masks = [ept.reference_layout(i, E, R)[2] for i in idxs]
  row_bytes = {"bf16": 2 * H, "fp8": H + H // 32}  # FP8: a byte per value, f32 per 128
  moved = row_bytes[dtype]
  if mode == "low_latency":  # DeepEP's LL count: one row per valid (token, k)
    rows = sum(int(((i >= 0) & (i < E)).sum()) for i in idxs) / R
    res["op_bytes"] = {"dispatch": rows * moved, "combine": rows * row_bytes["bf16"]}
    res["op_crossing_bytes"] = {}
    res["op_local_bytes"] = {op: 2 * b for op, b in res["op_bytes"].items()}
  else:
    received = received_bytes_per_rank(masks, 1)
    crossing = crossing_bytes_per_rank(masks, 1)
    per_op = {"dispatch": moved, "cached_dispatch": moved, "combine": row_bytes["bf16"]}
    res["op_bytes"] = {op: received * b for op, b in per_op.items()}
    res["op_crossing_bytes"] = {op: crossing * b for op, b in per_op.items()}
    # HBM traffic when every token stays here (R = 1): the local path reads
    # each row once and writes it once (the xla backend's gather too).
    res["op_local_bytes"] = {op: 2 * N * b for op, b in per_op.items()}
  if isinstance(axis, tuple):  # what crosses the node axis, once per destination node
    res["node_hop_bytes"] = node_hop_bytes_per_rank(masks, mesh.shape[axis[1]], H * 2)
    res["local_hop_bytes"] = local_hop_bytes_per_rank(masks, mesh.shape[axis[1]], H * 2)
    res["crossing_bytes"] = crossing_bytes_per_rank(masks, H * 2)
  res["clock"] = "device" if device_clock else "host"
  res["num_sms"] = getattr(buf._backend, "num_sms", None)  # the value in effect
  buf.destroy()
  return res


def _attempt(mesh, backend, shape, **kwargs):
  """time_backend, or {"error": why} when the backend cannot run here."""
  try:
    return time_backend(mesh, backend, *SHAPES[shape], **kwargs)
  except Exception as e:  # a row that says why beats no row
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return {"error": f"{type(e).__name__}: {first[:300]}"}


def rank_bench(process, num_processes, shapes, backends, iters, reps, num_sms_list,
               mode="normal", dtypes=("bf16",), nodes=0, rounds=1):
  """One process of a multi-process benchmark: every backend on the global mesh
  (``nodes`` > 0: the two-axis mesh of ``testing.two_axis_mesh``), ``rounds`` times
  over (see ``--rounds``)."""
  import jax
  from jax_ep import testing as ept
  mesh = ept.two_axis_mesh(nodes) if nodes else ept._global_mesh()
  axis = tuple(mesh.axis_names) if nodes else "ep"
  to_global = lambda m, a: ept._to_global(m, a, axis)
  out = {"device_kind": jax.devices()[0].device_kind, "num_ranks": mesh.size, "runs": []}
  for _ in range(rounds):
    for s in shapes:
      for b, num_sms, dtype in _configs(backends, num_sms_list, dtypes):
        res = _attempt(mesh, b, s, iters=iters, reps=reps, to_global=to_global,
                       num_sms=num_sms, mode=mode, dtype=dtype)
        out["runs"].append({"shape": s, "backend": b, "num_sms": num_sms, "dtype": dtype,
                            "res": res})
  return out


def _fold_rounds(results):
  """``[(key, res)]`` of every round, in order -> ``{key: res}`` with each op's per-run
  times of all rounds (medians then cover every round). A round that failed wins: its
  row says why."""
  out = {}
  for key, res in results:
    have = out.get(key)
    if have is None or "error" in res:
      out[key] = dict(res)
    elif "error" not in have:
      for op in TIMED_OPS:
        if op in res:
          have[op] = list(have[op]) + list(res[op])
  return out


def _configs(backends, num_sms_list, dtypes):
  for b in backends:
    for n in (num_sms_list if b == "cuda" else [None]):
      for dtype in dtypes:
        yield b, n, dtype


# Results of the timed calls kept in memory per rank before they are read (see
# time_backend's program): the low-latency dispatch returns 470 MB a rank at the
# small shape, and emulated ranks share one GPU's memory.
KEPT_BYTES = 4 << 30

_US_KEYS = {"layout": "layout", "dispatch": "dispatch", "cached_dispatch": "cached",
            "combine": "combine"}


def _row(backend, ranks, processes, shape, num_sms, times, res, copy_gbps, bandwidth=True,
         mode="normal", dtype="bf16"):
  """One results.json row from per-op lists of per-run seconds (already merged).
  Ops a row does not time (e.g. combine in an FP8 row) are None.

  ``bandwidth=False`` (CPU) leaves the GB/s fields None: they measure links and
  HBM, which virtual CPU devices do not have."""
  import numpy as np
  row = {"backend": backend, "mode": mode, "dtype": dtype, "ranks": ranks,
         "processes": processes, "shape": shape, "num_sms": num_sms}
  for key in _US_KEYS.values():
    row.update({f"{key}_us": None, f"{key}_gbps": None} if key != "layout" else
               {"layout_us": None})
  if "error" in res:
    row["note"] = res["error"]
    return row
  med = {op: max(float(np.median(times[op])), 0.0) for op in TIMED_OPS if op in times}
  row.update(num_sms=res.get("num_sms", num_sms), clock=res["clock"])
  if "node_hop_bytes" in res:  # two-axis mesh: MB per rank across the node axis
    row["node_hop_mb"] = round(res["node_hop_bytes"] / 1e6, 2)
    row["local_hop_mb"] = round(res["local_hop_bytes"] / 1e6, 2)
    row["flat_crossing_mb"] = round(res["crossing_bytes"] / 1e6, 2)
  for op, t in med.items():
    row[f"{_US_KEYS.get(op, op)}_us"] = round(t * 1e6, 2)
  if not bandwidth:
    row["gbps_of"] = None
    return row
  if ranks > 1:
    row["gbps_of"] = "received" if mode == "normal" else "(token, k) rows"
    num_bytes = res["op_bytes"]
    for op, b in res["op_crossing_bytes"].items():
      if med.get(op):
        row[f"{_US_KEYS[op]}_crossing_gbps"] = round(b / 1e9 / med[op], 1)
  else:
    row["gbps_of"] = "hbm"
    num_bytes = res["op_local_bytes"]
    row["copy_gbps"] = round(copy_gbps, 1) if copy_gbps else None
  for op, b in num_bytes.items():
    if med.get(op):
      row[f"{_US_KEYS[op]}_gbps"] = round(b / 1e9 / med[op], 1)
  return row


def _merge(runs):
  """Per-op per-run seconds of several processes -> the slowest process per run."""
  import numpy as np
  failed = [r for r in runs if "error" in r]
  if failed:
    return failed[0]
  return {op: list(np.max(np.array([r[op] for r in runs]), axis=0))
          for op in TIMED_OPS if op in runs[0]}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_ep.bench", description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--shapes", default=None,
                  help=f"comma list of {','.join(SHAPES)} (default: deepep,small on GPUs, "
                       "small on CPU; see --mode)")
  ap.add_argument("--backends", default="all", help="comma list of xla,cuda,ragged or all")
  ap.add_argument("--ranks", type=int, default=0,
                  help="N > 0: N processes as N ranks; 0: this process, all local devices")
  ap.add_argument("--gpus", type=int, default=0,
                  help="with --ranks: G > 0 puts process r on GPU r %% G; 0: all on GPU 0")
  ap.add_argument("--num-sms", default="",
                  help="comma list of num_sms values for the cuda backend (default: its default)")
  ap.add_argument("--iters", type=int, default=None,
                  help="calls per timed run (default: 20 on GPUs, 5 on CPU)")
  ap.add_argument("--reps", type=int, default=None,
                  help="timed runs, the median is reported (default: 7 on GPUs, 3 on CPU)")
  ap.add_argument("--rounds", type=int, default=1,
                  help="go through every shape and backend this many times, one after "
                       "the other, and report the median over all rounds' runs: the "
                       "backends then take turns, so a drift of the machine's speed "
                       "during the run (small shapes move by ~10 us between runs) "
                       "touches all of them alike")
  ap.add_argument("--out", default="", help="folder for results.json and bench.png "
                  "(default: print the table only)")
  ap.add_argument("--mesh", default="",
                  help="NODExLOCAL (e.g. 2x4): a two-axis Buffer over ('node', 'local') "
                       "on this process's first NODE*LOCAL devices; with --ranks, over "
                       "all the ranks, device l*NODE+n as rank (n, l) "
                       "(testing.two_axis_mesh)")
  ap.add_argument("--mode", choices=("normal", "low_latency"), default="normal",
                  help="low_latency: time low_latency_dispatch / low_latency_combine "
                       "(default shape: small on GPUs, tiny on CPU)")
  ap.add_argument("--dtypes", default="bf16",
                  help="comma list of bf16,fp8: fp8 rows time the dispatches on FP8 rows "
                       "with their scales (combine stays bf16)")
  ap.add_argument("--clock", choices=("host", "device"), default="host",
                  help="host (default): host time with the calls less host time without "
                       "them; device: the device clock around the calls (our kernels only: "
                       "XLA schedules its own collectives before the first clock)")
  ap.add_argument("--hlo", default="", help="folder: write each timed program's optimized HLO")
  ap.add_argument("--moe", action="store_true",
                  help="instead: the experts' grouped matmuls and the MoE block "
                       "(jax_ep.bench_moe)")
  args = ap.parse_args(argv)
  if args.rounds < 1:
    ap.error(f"--rounds must be at least 1, got {args.rounds}")
  num_sms_list = [int(v) for v in args.num_sms.split(",") if v] or [None]
  dtypes = [d for d in args.dtypes.split(",") if d]
  if not dtypes or any(d not in ("bf16", "fp8") for d in dtypes):
    ap.error(f"--dtypes takes bf16 and/or fp8, got {args.dtypes!r}")
  from jax_ep import _ext
  _ext.ensure_host_devices()  # the main job's 8 virtual ranks when there is no GPU
  if args.moe:
    return _moe_main(args)
  c = _ext.load()
  num_gpus = c.cuda_device_count() if c is not None and _ext.has_cuda() else 0

  # Before anything else takes GPU memory.
  p2p = p2p_bandwidths(num_gpus) if num_gpus > 1 else {}
  if p2p:
    print("p2p copy-engine GB/s each way (both directions at once, 1 GiB): " +
          ", ".join(f"GPU {k}: {v}" for k, v in p2p.items()), flush=True)

  rows = []
  if args.ranks:
    from jax_ep.multiprocess import launch
    processes = "per-gpu" if args.gpus else "emulated"
    if args.gpus and args.ranks > args.gpus:  # several ranks share each GPU
      processes = f"per-gpu, {-(-args.ranks // args.gpus)} a GPU"
    nodes = 0
    if args.mesh:
      from jax_ep.__main__ import parse_mesh
      nodes = parse_mesh(args.mesh, args.ranks)[0]
      if parse_mesh(args.mesh, args.ranks) != (nodes, args.ranks // nodes):
        raise SystemExit(f"--mesh {args.mesh} must use all {args.ranks} ranks")
      processes += f", mesh {args.mesh}"
    # XLA's collectives cannot run two ranks on one GPU; ragged only on request.
    shared = not args.gpus or args.ranks > args.gpus
    backends = (["cuda"] if args.backends == "all" and shared else
                ["xla", "cuda"] if args.backends == "all" else args.backends.split(","))
    env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cuda")}
    shapes, iters, reps = _defaults(args, on_gpu=True)
    res = launch("jax_ep.bench:rank_bench", args.ranks, env=env, timeout_s=580, gpus=args.gpus,
                 kwargs=dict(shapes=shapes, backends=backends, iters=iters,
                             reps=reps, num_sms_list=num_sms_list, mode=args.mode,
                             dtypes=dtypes, nodes=nodes, rounds=args.rounds))
    merged = []  # per run: the slowest process's times, with the run's byte counts
    for k, run in enumerate(res[0]["runs"]):
      times = _merge([r["runs"][k]["res"] for r in res])
      merged.append(((run["backend"], run["shape"], run["num_sms"], run["dtype"]),
                     times if "error" in times else {**run["res"], **times}))
    for (b, shape, num_sms, dtype), r in _fold_rounds(merged).items():
      rows.append(_row(b, args.ranks, processes, shape, num_sms, r, r, None,
                       mode=args.mode, dtype=dtype))
    gpus_used = min(args.gpus, args.ranks) if args.gpus else 1
    device = f"{gpus_used} x {res[0]['device_kind']}"
    on_gpu = True
  else:
    backends = (["xla", "cuda", "ragged"] if args.backends == "all"
                 else args.backends.split(","))
    # The ragged child runs before this process's XLA takes its share of the GPUs.
    ragged = {}
    if "ragged" in backends and num_gpus > 0 and os.environ.get("JAX_PLATFORMS") != "cpu":
      shapes, iters, reps = _defaults(args, on_gpu=True)
      ragged = {(s, dt): _ragged_in_child(s, iters, reps, args.mode, dt)
                for s in shapes for dt in dtypes}
    import numpy as np
    import jax
    from jax.sharding import Mesh
    import jax_ep
    devices = jax.local_devices()
    mesh = Mesh(np.array(devices), ("ep",))
    if args.mesh:
      from jax_ep.__main__ import parse_mesh
      shape = parse_mesh(args.mesh, len(devices))
      devices = devices[:shape[0] * shape[1]]
      mesh = Mesh(np.array(devices).reshape(shape), ("node", "local"))
    on_gpu = devices[0].platform == "gpu"
    shapes, iters, reps = _defaults(args, on_gpu)
    if "cuda" in backends and not (jax_ep.build_info()["cuda"] and on_gpu):
      backends.remove("cuda")
    copy_gbps = copy_bandwidth(devices[0]) if on_gpu else None
    processes = f"one, mesh {args.mesh}" if args.mesh else "one"
    results = []
    for _ in range(args.rounds):
      for s in shapes:
        for b, num_sms, dtype in _configs(backends, num_sms_list, dtypes):
          if b == "ragged" and (s, dtype) in ragged:  # timed once, in its own process
            if any(key == (b, s, num_sms, dtype) for key, _ in results):
              continue
            res = ragged[(s, dtype)]
          else:
            res = _attempt(mesh, b, s, iters=iters, reps=reps, num_sms=num_sms,
                           clock=args.clock, hlo_dir=args.hlo or None, mode=args.mode,
                           dtype=dtype)
          results.append(((b, s, num_sms, dtype), res))
          row = _row(b, len(devices), processes, s, num_sms, res, res, copy_gbps,
                     bandwidth=on_gpu, mode=args.mode, dtype=dtype)
          print(_table([row], _columns(on_gpu, [row]), header=False), flush=True)
    for (b, s, num_sms, dtype), res in _fold_rounds(results).items():
      rows.append(_row(b, len(devices), processes, s, num_sms, res, res, copy_gbps,
                       bandwidth=on_gpu, mode=args.mode, dtype=dtype))
    device = f"{len(devices)} x {devices[0].device_kind}"

  p2p_gbps = min(p2p.values()) if p2p else None
  print(f"jax_ep.bench on {device}" + (f", p2p {p2p_gbps} GB/s" if p2p_gbps else ""))
  print(_table(rows, _columns(on_gpu, rows)))
  if not on_gpu:
    print(f"(CPU: microseconds per op by the host clock, median of {reps * args.rounds} runs "
          f"of {iters} calls; no GB/s: the virtual devices share the host's memory, so no "
          "bytes cross a link)")
  if args.out:
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
      json.dump({"device": device, "p2p_gbps": p2p_gbps, "p2p_pairs": p2p, "rows": rows}, f,
                indent=1)
    _plot(rows, device, os.path.join(args.out, "bench.png"))
  return 0


def _moe_main(args) -> int:
  import jax
  import jax_ep
  from jax_ep import bench_moe
  devices = jax.local_devices()
  on_gpu = devices[0].platform == "gpu"
  backends = (["xla", "cuda"] if args.backends == "all" else args.backends.split(","))
  backends = [b for b in backends if b != "ragged" and
              (b != "cuda" or (jax_ep.build_info()["cuda"] and on_gpu))]
  copy_gbps = copy_bandwidth(devices[0]) if on_gpu else None
  bench_moe.main(backends, min(args.iters or 7, 7) if on_gpu else 3, args.out, copy_gbps)
  return 0


def _ragged_in_child(shape, iters, reps, mode="normal", dtype="bf16", timeout_s=300):
  """The ragged backend timed in a child process driving every GPU, with a time limit."""
  from jax_ep.multiprocess import RankFailure, launch
  env = {"JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cuda")}
  try:
    out = launch("jax_ep.bench:rank_bench", 1, gpus=-1, env=env, timeout_s=timeout_s,
                 kwargs=dict(shapes=[shape], backends=["ragged"], iters=iters, reps=reps,
                             num_sms_list=[None], mode=mode, dtypes=[dtype]))
  except RankFailure as e:
    why = "timed out" if "timed out" in str(e).splitlines()[0] else "failed"
    return {"error": f"the child process {why} (limit {timeout_s} s)"}
  return out[0]["runs"][0]["res"]


COLUMNS = ("backend", "mode", "dtype", "num_sms", "ranks", "processes", "shape", "layout_us",
           "dispatch_us", "cached_us", "combine_us", "dispatch_gbps", "cached_gbps", "combine_gbps", "gbps_of",
           "dispatch_crossing_gbps", "combine_crossing_gbps", "note")
BANDWIDTH_COLUMNS = ("num_sms", "dispatch_gbps", "cached_gbps", "combine_gbps", "gbps_of",
                     "dispatch_crossing_gbps", "combine_crossing_gbps")


def _defaults(args, on_gpu: bool):
  """(shapes, iters, reps): the flags, else defaults that keep a CPU run short."""
  low_latency = getattr(args, "mode", "normal") == "low_latency"  # a decode-size op
  default = ("small" if low_latency else "deepep,small") if on_gpu else (
      "tiny" if low_latency else "small")
  shapes = (args.shapes or default).split(",")
  iters = args.iters or (20 if on_gpu else 5)
  reps = args.reps or (7 if on_gpu else 3)
  return shapes, iters, reps


def _columns(on_gpu: bool, rows=()):
  """The table's columns: on CPU no bandwidth (and no cuda num_sms); the hops' MB
  when a row has them (a two-axis mesh)."""
  cols = COLUMNS if on_gpu else tuple(c for c in COLUMNS if c not in BANDWIDTH_COLUMNS)
  if any("node_hop_mb" in r for r in rows):  # before the note
    cols = cols[:-1] + ("node_hop_us", "node_hop_mb", "local_hop_mb") + cols[-1:]
  return cols


def _table(rows, columns=COLUMNS, header=True):
  cells = [[("" if r.get(c) is None else str(r.get(c))[:60]) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths))] if header else []
  lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths)) for row in cells]
  return "\n".join(lines)


def _plot(rows, device, path):
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("matplotlib missing: no plot")
    return
  labels = [f"{r['backend']}{'' if r['num_sms'] is None else ' ' + str(r['num_sms']) + 'SM'}"
            f"\nR{r['ranks']} {r['processes']}\n{r['shape']}"
            + ("" if r.get("mode", "normal") == "normal" else " LL")
            + ("" if r.get("dtype", "bf16") == "bf16" else " " + r["dtype"]) for r in rows]
  fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
  xs = range(len(rows))
  ax.bar([x - 0.2 for x in xs], [r["dispatch_us"] or 0 for r in rows], 0.4, label="dispatch")
  ax.bar([x + 0.2 for x in xs], [r["combine_us"] or 0 for r in rows], 0.4, label="combine")
  ax.set_xticks(list(xs), labels, fontsize=7)
  ax.set_yscale("log")
  ax.set_ylabel("microseconds per op (lower is better)")
  ax.set_title(f"jax_ep on {device}")
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == "__main__":
  sys.exit(main())
