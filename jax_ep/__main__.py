"""``python -m jax_ep``: a dispatch -> expert -> combine round trip on every local device.

Checks the result against the NumPy reference and prints one table row per
backend. On a machine without accelerators it runs on 8 virtual CPU devices.
"""
from __future__ import annotations

import argparse
import sys
import time


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(prog="python -m jax_ep", description=__doc__)
  ap.add_argument("--tokens", type=int, default=512, help="tokens per rank")
  ap.add_argument("--hidden", type=int, default=1024)
  ap.add_argument("--topk", type=int, default=4)
  ap.add_argument("--experts", type=int, default=32)
  ap.add_argument("--backend", default="all", help="xla, cuda, auto or all (every one present)")
  ap.add_argument("--iters", type=int, default=10)
  ap.add_argument("--mesh", default="",
                  help="NODExLOCAL (e.g. 2x4): expert parallelism over a two-axis mesh "
                       "('node', 'local') of the first NODE*LOCAL devices")
  args = ap.parse_args(argv)
  from jax_ep._ext import ensure_host_devices
  ensure_host_devices()

  import numpy as np
  import jax
  import jax.numpy as jnp
  from jax.sharding import Mesh, PartitionSpec as P

  import jax_ep
  from jax_ep import testing as ept
  from jax_ep.bench import crossing_bytes_per_rank

  devices = jax.local_devices()
  if args.mesh:
    shape = parse_mesh(args.mesh, len(devices))
    devices = devices[:shape[0] * shape[1]]
    mesh, axis = Mesh(np.array(devices).reshape(shape), ("node", "local")), ("node", "local")
  else:
    mesh, axis = Mesh(np.array(devices), ("ep",)), "ep"
  R = len(devices)
  N, H, K, E = args.tokens, args.hidden, args.topk, args.experts
  E = max(E - E % R, R)
  backends = ["xla", "cuda"] if args.backend == "all" else [args.backend]
  if "cuda" in backends and not (jax_ep.build_info()["cuda"] and devices[0].platform == "gpu"):
    backends.remove("cuda")
  xs, idxs, ws, _, _ = ept.make_case(0, R, N, H, K, E, dtype="bfloat16")
  ref = ept.reference_dispatch(xs, idxs, ws, E)
  # The "expert": multiply each received row by its summed top-k weight here.
  ys = [r["recv_x"] * r["recv_topk_weights"].sum(1, keepdims=True) for r in ref]
  expected, _ = ept.reference_combine(ys, ref, N)
  sent = crossing_bytes_per_rank([r["is_token_in_rank"] for r in ref], H * 2)

  print(f"jax_ep {jax_ep.__version__} on {R} x {devices[0].device_kind} "
        f"({jax.default_backend()}), build {jax_ep.build_info()}")
  if args.mesh:
    from jax_ep.bench import node_hop_bytes_per_rank
    node_hop = node_hop_bytes_per_rank([r["is_token_in_rank"] for r in ref], shape[1], H * 2)
    flat_cross = sum(
        int(r["is_token_in_rank"][:, [d for d in range(R) if d // shape[1] != s // shape[1]]]
            .sum()) for s, r in enumerate(ref)) * H * 2 / R
    print(f"mesh {args.mesh} (node x local): per rank and dispatch, {node_hop / 1e6:.3f} MB "
          f"cross the node axis (one row per token and destination node); a flat "
          f"all-to-all would send {flat_cross / 1e6:.3f} MB across nodes")
  print(f"{'backend':>8} {'ranks':>5} {'tokens':>6} {'hidden':>6} {'topk':>4} "
        f"{'round trip ms':>13} {'GB/s':>7} {'max err':>8} {'allowed':>8} check")
  failed = False
  for name in backends:
    nodes = shape[0] if args.mesh else 1
    buf = jax_ep.Buffer(mesh, axis, backend=name,
                        num_nvl_bytes=(jax_ep.Buffer.get_buffer_size_hint(
                            N, H, R, K, num_nodes=nodes) if name == "cuda" else None))

    def per_rank(x, idx, w):
      recv_x, _, recv_w, _, h = buf.dispatch(x[0], topk_idx=idx[0], topk_weights=w[0],
                                             num_experts=E)
      y = (recv_x.astype(jnp.float32) * recv_w.sum(1, keepdims=True)).astype(recv_x.dtype)
      return buf.combine(y, h)[0][None]

    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
    args_ = ept.stack_per_rank(mesh, [x.astype(jnp.bfloat16) for x in xs], idxs, ws,
                               axis_name=axis)
    out = np.asarray(fn(*args_).astype(jnp.float32))
    times = []
    for _ in range(args.iters):
      t0 = time.perf_counter()
      fn(*args_).block_until_ready()
      times.append(time.perf_counter() - t0)
    ms = float(np.median(times)) * 1e3
    err = max(float(np.abs(out[r] - expected[r]).max()) for r in range(R))
    scale = max(float(np.abs(e).max()) for e in expected)
    allowed = 2e-2 * scale  # bf16 rounding of the expert output and the sum
    ok = err <= allowed
    failed |= not ok
    gbps = 2 * sent / (ms * 1e-3) / 1e9  # dispatch + combine bytes, per rank
    print(f"{name:>8} {R:>5} {N:>6} {H:>6} {K:>4} {ms:>13.3f} {gbps:>7.2f} {err:>8.2e} "
          f"{allowed:>8.2e} {'ok' if ok else 'MISMATCH'}")
    buf.destroy()
  print("(time: host clock around the jitted round trip, median of "
        f"{args.iters}; GB/s: token bytes crossing to other ranks per rank, both ways; "
        "max err: largest |output - reference| over every rank, the reference being "
        "jax_ep.testing's NumPy model of dispatch -> expert -> combine in float32; "
        "allowed: 2% of the reference's largest |value|, for bfloat16 rounding)")
  return 1 if failed else 0


def parse_mesh(text: str, num_devices: int) -> tuple:
  """``"2x4"`` -> (2, 4), checked against the devices there are."""
  try:
    shape = tuple(int(v) for v in text.lower().split("x"))
  except ValueError:
    shape = ()
  if len(shape) != 2 or min(shape) < 1:
    raise SystemExit(f"--mesh must be NODExLOCAL with positive sizes (e.g. 2x4), got {text!r}")
  if shape[0] * shape[1] > num_devices:
    raise SystemExit(f"--mesh {text} needs {shape[0] * shape[1]} devices, there are "
                     f"{num_devices}")
  return shape


if __name__ == "__main__":
  sys.exit(main())
