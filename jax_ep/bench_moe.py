"""``python -m jax_ep.bench --moe``: the experts' grouped matmuls and the MoE block.

Two tables:

- **Grouped matmuls** on the first device, for each ``expert_impl``: forward
  (``x @ w_gate``), input gradient and weight gradient of one projection with
  ``E = 32`` local experts, ``H = 7168``, ``F = 2048`` and skewed groups
  (multinomial over the experts with Dirichlet(1) probabilities); "train" has
  65,536 rows (4096 tokens/rank x R = 2 x top-8), "decode" 2,048. The ceiling
  is a dense batched einsum with equal groups, timed in the same run; the
  decode rows also give the time to read the weights once at the measured
  device-to-device copy bandwidth.
- **The MoE block** over every local device (one process), per backend: a
  fwd+bwd step at the DeepSeek-like shape (4096 tokens/rank, H = 7168,
  F = 2048, 64 experts, top-8, float32 master weights), the same step's
  dispatch + combine alone (fwd + bwd, the experts replaced by a weighting)
  and their share, and a 128-token decode forward with bf16 weights.

Kernel times on GPUs are CUPTI's (``jax.experimental.mosaic.gpu.profiler``),
median of ``--iters``; the block's steps are host-timed around a device sync
(medians), since they span several GPUs. On CPU both tables shrink to shapes
that finish in seconds and only say that the paths run.
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import grouped_matmul as gmm
from jax_ep import moe

GPU_GEMM = {"E": 32, "H": 7168, "F": 2048, "cases": {"train": 65536, "decode": 2048}}
CPU_GEMM = {"E": 4, "H": 128, "F": 128, "cases": {"train": 512, "decode": 64}}
GPU_BLOCK = {"N": 4096, "H": 7168, "F": 2048, "E": 64, "K": 8, "decode_N": 128}
CPU_BLOCK = {"N": 64, "H": 128, "F": 128, "E": 8, "K": 2, "decode_N": 16}


def _timer(on_gpu, iters):
  """f, args -> median ms (CUPTI kernel time on GPU, host time elsewhere)."""
  if on_gpu:
    from jax.experimental.mosaic.gpu import profiler

    def timed(f, *args):
      _, times = profiler.measure(f, iterations=iters)(*args)
      return float(np.median(times))
    return timed

  return lambda f, *args: _host_ms(f, *args, iters=iters)


def _host_ms(f, *args, iters):
  """Median host ms around a device sync, after two warm-up calls."""
  jax.block_until_ready(f(*args))
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(iters):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append((time.perf_counter() - t) * 1e3)
  return float(np.median(times))


def gemm_rows(device, iters, copy_gbps=None):
  """The grouped-matmul table (list of dicts)."""
  on_gpu = device.platform == "gpu"
  cfg = GPU_GEMM if on_gpu else CPU_GEMM
  E, H, F = cfg["E"], cfg["H"], cfg["F"]
  timed = _timer(on_gpu, iters)
  impls = ["ragged_dot"] + (["mosaic"] if gmm.mosaic_unavailable_reason(device) is None
                            else [])
  rng = np.random.default_rng(0)
  keys = iter(jax.random.split(jax.random.key(0), 16))
  normal = lambda shape, scale=1.0: jax.device_put(
      (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(jnp.bfloat16),
      device)
  w = normal((E, H, F), H ** -0.5)
  rows = []
  for case, G in cfg["cases"].items():
    sizes = jax.device_put(jnp.asarray(
        rng.multinomial(G, rng.dirichlet(np.ones(E))), jnp.int32), device)
    x, dy = normal((G, H)), normal((G, F))
    flops = 2 * G * H * F
    a = normal((E, G // E, H))
    ceiling = timed(jax.jit(lambda a, w: jnp.einsum("egh,ehf->egf", a, w)), a, w)
    base = {"case": case, "rows": G, "experts": E, "hidden": H, "ffn": F}
    rows.append(dict(base, impl="einsum (equal groups)", op="forward", ms=ceiling,
                     tflops=flops / ceiling / 1e9, of_ceiling=1.0))
    weight_read_ms = (E * H * F * 2 / (copy_gbps * 1e9) * 1e3) if copy_gbps else None
    for impl in impls:
      ops = {
          "forward": jax.jit(lambda x, w, s: gmm.grouped_matmul(x, w, s, impl=impl)),
          "input grad": jax.jit(lambda dy, w, s: gmm.grouped_matmul(
              dy, w, s, impl=impl, transpose_w=True)),
          "weight grad": jax.jit(lambda x, dy, s: gmm.grouped_matmul_transposed(
              x, dy, s, impl=impl)),
      }
      args = {"forward": (x, w, sizes), "input grad": (dy, w, sizes),
              "weight grad": (x, dy, sizes)}
      for op, f in ops.items():
        row = dict(base, impl=impl, op=op)
        try:
          ms = timed(f, *args[op])
        except Exception as e:  # e.g. XLA's ragged_dot running out of memory
          row["note"] = str(e).splitlines()[0][:160]
          rows.append(row)
          print(_gemm_line(row), flush=True)
          continue
        row.update(ms=ms, tflops=flops / ms / 1e9, of_ceiling=ceiling / ms)
        if op == "forward" and weight_read_ms:
          row.update(weight_read_ms=weight_read_ms, of_weight_read=ms / weight_read_ms)
        rows.append(row)
        print(_gemm_line(row), flush=True)
  return rows


def _gemm_line(r):
  if "ms" not in r:
    return f"{r['case']:7s} {r['impl']:22s} {r['op']:12s} failed: {r.get('note')}"
  extra = (f"  {r['of_weight_read']:.2f}x weight read ({r['weight_read_ms']:.3f} ms)"
           if "of_weight_read" in r else "")
  return (f"{r['case']:7s} {r['impl']:22s} {r['op']:12s} {r['ms']:9.3f} ms "
          f"{r['tflops']:7.1f} TFLOP/s {r['of_ceiling']:5.2f} of einsum{extra}")


def block_rows(devices, backends, iters, expert_impl="auto"):
  """The MoE block table over ``devices`` (one process)."""
  on_gpu = devices[0].platform == "gpu"
  cfg = GPU_BLOCK if on_gpu else CPU_BLOCK
  R = len(devices)
  N, H, F, E, K = cfg["N"], cfg["H"], cfg["F"], cfg["E"], cfg["K"]
  mesh = Mesh(np.array(devices), ("ep",))
  specs = moe.moe_param_specs("ep")
  params = moe.init_moe_params(jax.random.key(1), H, F, E)
  params = {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()}
  # Decode serves bf16 weights (training keeps float32 masters and casts per
  # step, which at 128 tokens would cost more than the experts themselves).
  serving = {k: v if k == "router" else v.astype(jnp.bfloat16) for k, v in params.items()}
  put = lambda a: jax.device_put(a, NamedSharding(mesh, P("ep")))
  x = put(jax.random.normal(jax.random.key(2), (R * N, H), jnp.bfloat16))
  ct = put(jax.random.normal(jax.random.key(3), (R * N, H), jnp.bfloat16))
  xd = put(jax.random.normal(jax.random.key(4), (R * cfg["decode_N"], H), jnp.bfloat16))
  rows = []
  for backend in backends:
    nbytes = jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.bfloat16) \
        if backend == "cuda" else None
    buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes)
    impl_seen = []

    def block(p, x):
      out, aux = moe.moe_block(buf, p, x, top_k=K, expert_impl=expert_impl)
      impl_seen.append(aux.expert_impl)
      return out

    def comm(p, x):
      # Dispatch + combine alone, with the same routing as the block.
      idx, w, _ = moe.route(p["router"], x, K)
      recv_x, _, recv_w, _, h = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                             num_experts=E)
      y = recv_x * recv_w.sum(-1, keepdims=True).astype(recv_x.dtype)
      return buf.combine(y, h)[0]

    sm = lambda f: jax.shard_map(f, mesh=mesh, in_specs=(specs, P("ep")),
                                 out_specs=P("ep"))

    def step_of(f):
      loss = lambda p, x: jnp.sum(sm(f)(p, x).astype(jnp.float32) * ct)
      return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

    row = {"backend": backend, "ranks": R, "tokens_per_rank": N, "hidden": H, "ffn": F,
           "experts": E, "top_k": K}
    try:
      row["step_ms"] = _host_ms(step_of(block), params, x, iters=iters)
      row["expert_impl"] = impl_seen[-1]
      row["comm_ms"] = _host_ms(step_of(comm), params, x, iters=iters)
      row["comm_share"] = row["comm_ms"] / row["step_ms"]
      row["decode_tokens_per_rank"] = cfg["decode_N"]
      row["decode_ms"] = _host_ms(jax.jit(sm(block)), serving, xd, iters=iters)
      if backend == backends[0] and row["expert_impl"] != "ragged_dot":
        def block_ragged(p, x):
          return moe.moe_block(buf, p, x, top_k=K, expert_impl="ragged_dot")[0]
        row["decode_ms_ragged_dot"] = _host_ms(jax.jit(sm(block_ragged)), serving, xd,
                                               iters=iters)
    except Exception as e:
      row["note"] = str(e).splitlines()[0][:200]
    buf.destroy()
    rows.append(row)
    print(_block_line(row), flush=True)
  return rows


def _block_line(r):
  if "note" in r:
    return f"{r['backend']:5s} failed: {r['note']}"
  return (f"{r['backend']:5s} R={r['ranks']} experts on {r['expert_impl']}: fwd+bwd step "
          f"{r['step_ms']:.2f} ms, dispatch+combine fwd+bwd {r['comm_ms']:.2f} ms "
          f"({100 * r['comm_share']:.0f}%), {r['decode_tokens_per_rank']}-token decode "
          f"forward {r['decode_ms']:.2f} ms" +
          (f" (experts on ragged_dot: {r['decode_ms_ragged_dot']:.2f} ms)"
           if "decode_ms_ragged_dot" in r else ""))


def main(backends, iters, out_dir, copy_gbps=None):
  devices = jax.local_devices()
  on_gpu = devices[0].platform == "gpu"
  device = f"{len(devices)} x {devices[0].device_kind}"
  print(f"jax_ep.bench --moe on {device}, jax {jax.__version__}", flush=True)
  gemm = gemm_rows(devices[0], iters, copy_gbps)
  blocks = block_rows(devices, backends, max(3, iters // 2))
  if out_dir:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {"device": device}
    results.update(moe_device=device, gemm_rows=gemm, moe_rows=blocks,
                   copy_gbps=copy_gbps, jax=jax.__version__,
                   gemm_timing="cupti kernel time" if on_gpu else "host")
    with open(path, "w") as f:
      json.dump(results, f, indent=1)
  return gemm, blocks
