"""Does work placed between a low-latency dispatch's send and receive overlap it?

    python3 tools/ll_overlap.py [--backends xla,cuda] [--tokens 128] [--hidden 7168]

On every local device (one rank each), times with the bench's host-clock
differencing (the program with --iters calls, less the program with none):

- ``comm``: ``low_latency_dispatch`` alone;
- ``work``: independent work alone (a chain of [N, H] x [H, H] matmuls, the
  stand-in for a shared expert or the next micro-batch's attention);
- ``split``: the send, the work, then ``recv_fn(done)`` (return_recv_hook),
  ordered by data as the README says (the receive waits for the work's
  result); the order XLA scheduled is printed (where XLA puts the send is
  its choice).

``overlap = (comm + work - split) / min(comm, work)``: 0 when the work just
runs between the halves, 1 when the shorter one is hidden entirely. Prints one
line per backend and op. Issue 10 asks for this profile. ``--ops combine``
does the same for ``low_latency_combine`` (every program also runs a plain
dispatch first, for the handle and the rows to combine, timed alone and
subtracted). On the cuda backend both
kernels run on XLA's compute stream and the send pushes the rows with SMs, so
expect little there (a side-stream send and a copy-engine send were tried on
two H100s: benchmarks/RESULTS.md); ``--work-matmuls 0`` gives the split form's
own cost against the plain op.
"""
import argparse
import statistics
import time

import numpy as np


def main(argv=None):
  ap = argparse.ArgumentParser()
  ap.add_argument("--backends", default="xla,cuda")
  ap.add_argument("--ops", default="dispatch", help="dispatch and/or combine")
  ap.add_argument("--tokens", type=int, default=128)
  ap.add_argument("--hidden", type=int, default=7168)
  ap.add_argument("--topk", type=int, default=8)
  ap.add_argument("--experts", type=int, default=256)
  ap.add_argument("--work-matmuls", type=int, default=4)
  ap.add_argument("--iters", type=int, default=20)
  ap.add_argument("--reps", type=int, default=7)
  args = ap.parse_args(argv)

  import jax
  import jax.numpy as jnp
  from jax import lax
  from jax.sharding import PartitionSpec as P
  import jax_ep
  from jax_ep import testing as ept

  mesh = ept.make_mesh(len(jax.devices()))
  R, N, H, K, E = mesh.size, args.tokens, args.hidden, args.topk, args.experts
  rng = np.random.default_rng(0)
  idx = ept.stack_per_rank(mesh, [ept.random_routing(rng, N, K, E, none_fraction=0.0,
                                                     invalid_fraction=0.0)
                                  for _ in range(R)])[0]
  xs = [ept.stack_per_rank(mesh, [rng.standard_normal((N, H)).astype(np.float32)
                                  for _ in range(R)])[0] for _ in range(args.iters)]
  w = jnp.asarray(rng.standard_normal((H, H)) / np.sqrt(H), jnp.bfloat16)
  keep = lax.optimization_barrier
  print(f"ll_overlap on {R} x {jax.devices()[0].device_kind}, {N} x {H}, "
        f"{args.work_matmuls} matmuls of [{N}, {H}] x [{H}, {H}] as the work")

  for backend in args.backends.split(","):
    if backend == "cuda" and jax.devices()[0].platform != "gpu":
      print(f"{backend}: skipped (needs GPUs)")
      continue
    nbytes = (jax_ep.Buffer.get_low_latency_buffer_size_hint(N, H, R, K)
              if backend == "cuda" else None)
    buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes)

    def work(v):
      for _ in range(args.work_matmuls):
        v = jnp.tanh(v @ w)
      return v

    ones = jnp.ones((N, K), jnp.float32)

    def program(op, kind, n):
      def f(idx, w_, *vs):
        i, acc = idx[0], jnp.zeros((), jnp.float32)
        for v in vs[:n]:
          acc, v = keep((acc, v[0].astype(jnp.bfloat16)))
          if op == "combine":  # the rows and handle to combine (in every program)
            recv, _, h = buf.low_latency_dispatch(v, i, N, E)
            v, recv = keep((v, recv))
          if kind == "none":  # combine: the dispatch alone, subtracted from the others
            out = (recv[0, :1],)
          elif kind == "comm":
            out = ((buf.low_latency_dispatch(v, i, N, E)[0],) if op == "dispatch"
                   else (buf.low_latency_combine(recv, i, ones, h),))
          elif kind == "work":
            out = (work(v),) + ((recv[0, :1],) if op == "combine" else ())
          elif op == "dispatch":  # split: the work runs between send and receive
            _, recv_fn = buf.low_latency_dispatch(v, i, N, E, return_recv_hook=True)
            done = work(v)
            out = (recv_fn(done)[0], done)  # XLA orders by data: the receive after the work
          else:
            _, out_fn = buf.low_latency_combine(recv, i, ones, h, return_recv_hook=True)
            done = work(v)
            out = (out_fn(done), done)
          acc = acc + sum(o.reshape(-1)[0].astype(jnp.float32) for o in keep(out))
        return acc[None]
      specs = (P("ep"), P()) + (P("ep"),) * args.iters
      return jax.jit(jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P("ep")))

    def seconds(op, kind):
      full, base = program(op, kind, args.iters), program(op, kind, 0)
      run = lambda fn: jax.block_until_ready(fn(idx, w, *xs))
      for fn in (full, base, full, base):
        run(fn)  # compile, warm up
      times = []
      for _ in range(args.reps):
        t0 = time.perf_counter(); run(full); t1 = time.perf_counter()
        run(base); t2 = time.perf_counter()
        times.append(((t1 - t0) - (t2 - t1)) / args.iters)
      return statistics.median(times)

    for op in args.ops.split(","):
      # The order XLA scheduled the split program's kernels in (one iteration).
      hlo = program(op, "split", 1).lower(idx, w, *xs).compile().as_text()
      order = [("send" if "_send" in ln else "recv" if "_recv" in ln else "matmul")
               for ln in hlo.splitlines()
               if f"jax_ep_ll_{op}_" in ln or "__cublas" in ln or "triton_gemm" in ln]
      print(f"{backend} {op}: split program's order: {' '.join(order) or '(none found)'}")
      comm, work_s, split = (seconds(op, k) for k in ("comm", "work", "split"))
      if op == "combine":  # every combine program ran a plain dispatch first
        base = seconds(op, "none")
        comm, work_s, split = comm - base, work_s - base, split - base
      overlap = (comm + work_s - split) / max(min(comm, work_s), 1e-9)
      print(f"{backend} {op}: comm {comm * 1e6:.1f} us, work {work_s * 1e6:.1f} us, "
            f"split {split * 1e6:.1f} us (sum {(comm + work_s) * 1e6:.1f}), "
            f"overlap {overlap:.2f}")
    buf.destroy()


if __name__ == "__main__":
  main()
