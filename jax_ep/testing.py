"""Helpers for testing jax_ep and code built on it.

- ``random_routing``: fresh top-k routings with -1 and out-of-range ids.
- ``reference_dispatch`` / ``reference_combine``: an independent NumPy model of
  the contract in ``docs/design.md``, written with plain loops over ranks and
  tokens (no shared code with any backend).
- ``run_per_rank``: run a per-rank function under ``jit(shard_map)`` on stacked
  per-rank inputs and get per-rank NumPy outputs back.
- ``check_*``: checks that run in every process of a job started by
  ``jax_ep.multiprocess.launch`` (or in one process driving every GPU) and
  cover the ranks that process holds: the whole contract against the
  reference (``check_contract``), cuda against xla bit for bit, command
  buffers, and the failures that must stop a job rather than hang or corrupt
  it (a timeout, ranks running different ops, a stale layout, use after
  ``destroy()``).
"""
from __future__ import annotations

import numpy as np

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def random_routing(rng: np.random.Generator, num_tokens: int, num_topk: int,
                   num_experts: int, *, none_fraction: float = 0.1,
                   invalid_fraction: float = 0.02) -> np.ndarray:
  """``[N, K]`` int32 ids: distinct experts per token, some -1, some out of range."""
  idx = np.stack([rng.choice(num_experts, size=min(num_topk, num_experts),
                             replace=False) for _ in range(num_tokens)] or
                 [np.zeros((0, min(num_topk, num_experts)), np.int64)]).reshape(
                     num_tokens, min(num_topk, num_experts))
  if idx.shape[1] < num_topk:
    pad = -np.ones((num_tokens, num_topk - idx.shape[1]), idx.dtype)
    idx = np.concatenate([idx, pad], axis=1)
  idx = idx.astype(np.int32)
  u = rng.random(idx.shape)
  idx[u < none_fraction] = -1
  bad = u > 1.0 - invalid_fraction
  idx[bad] = rng.choice([num_experts, num_experts + 7, -3, -1000], size=bad.sum())
  return idx


def _valid(ids, num_experts):
  return (ids >= 0) & (ids < num_experts)


def reference_layout(topk_idx: np.ndarray, num_experts: int, num_ranks: int):
  """NumPy layout of one rank: (tokens per rank, slots per expert, is_token_in_rank)."""
  per_rank_experts = num_experts // num_ranks
  n = topk_idx.shape[0]
  in_rank = np.zeros((n, num_ranks), bool)
  per_expert = np.zeros(num_experts, np.int32)
  for i in range(n):
    for e in topk_idx[i]:
      if 0 <= e < num_experts:
        in_rank[i, e // per_rank_experts] = True
        per_expert[e] += 1
  return in_rank.sum(0).astype(np.int32), per_expert, in_rank


def reference_dispatch(xs, topk_idxs, topk_weights, num_experts: int,
                       num_worst_tokens: int | None = None):
  """Per-rank results of dispatch for all ranks' inputs.

  Args: lists (one entry per rank) of ``x [N,H]``, ``topk_idx [N,K]`` and
  ``topk_weights [N,K]`` (entries may be None).
  Returns: a list of dicts, one per rank, with ``recv_x``, ``recv_topk_idx``,
  ``recv_topk_weights``, ``num_recv_tokens_per_expert``, ``num_recv_tokens``,
  ``send_pos`` ([N,R] of that rank as sender), ``recv_src`` (list of
  (rank, token) per kept row) and the layout.
  """
  R = len(xs)
  N, H = xs[0].shape
  K = topk_idxs[0].shape[1]
  M = num_worst_tokens or N * R
  El = num_experts // R
  layouts = [reference_layout(t, num_experts, R) for t in topk_idxs]
  out = []
  for d in range(R):
    routed = [(s, i) for s in range(R) for i in range(N) if layouts[s][2][i, d]]
    kept = routed[:M]
    recv_x = np.zeros((M, H), np.float32)
    recv_idx = -np.ones((M, K), np.int32)
    recv_w = np.zeros((M, K), np.float32)
    per_expert = np.zeros(El, np.int32)
    for row, (s, i) in enumerate(kept):
      recv_x[row] = xs[s][i]
      for k in range(K):
        e = int(topk_idxs[s][i, k])
        if 0 <= e < num_experts and e // El == d:
          recv_idx[row, k] = e - d * El
          per_expert[e - d * El] += 1
          if topk_weights[s] is not None:
            recv_w[row, k] = topk_weights[s][i, k]
    out.append(dict(recv_x=recv_x, recv_topk_idx=recv_idx, recv_topk_weights=recv_w,
                    num_recv_tokens_per_expert=per_expert,
                    num_recv_tokens=len(routed), recv_src=kept,
                    num_tokens_per_rank=layouts[d][0],
                    num_tokens_per_expert=layouts[d][1],
                    is_token_in_rank=layouts[d][2]))
  for s in range(R):
    send_pos = -np.ones((N, R), np.int32)
    for d in range(R):
      for row, src in enumerate(out[d]["recv_src"]):
        if src[0] == s:
          send_pos[src[1], d] = row
    out[s]["send_pos"] = send_pos
  return out


def reference_combine(ys, dispatched, num_tokens: int, weights=None):
  """``combined[s][i] = sum_d ys[d][row of (s, i) on d]`` in float32, per rank,
  added as every backend adds them: a balanced pairwise tree over the ranks d,
  absent copies zero, padded with zeros to a power of two (so a float32 result
  is exact, bit for bit; round it to bfloat16 for a bfloat16 combine)."""
  R = len(ys)
  H = ys[0].shape[1]

  def tree(terms):
    while len(terms) > 1:
      terms = terms + [np.zeros_like(terms[0])] * (len(terms) % 2)
      terms = [terms[j] + terms[j + 1] for j in range(0, len(terms), 2)]
    return terms[0]

  def per_rank_copies(rows_of, width):
    copies = [[np.zeros((num_tokens, width), np.float32) for _ in range(R)] for _ in range(R)]
    for d in range(R):
      for row, (s, i) in enumerate(dispatched[d]["recv_src"]):
        copies[s][d][i] = np.asarray(rows_of(d)[row], np.float32)
    return [tree(copies[s]) for s in range(R)]

  outs = per_rank_copies(lambda d: ys[d], H)
  wouts = None
  if weights is not None:
    wouts = per_rank_copies(lambda d: weights[d], weights[0].shape[1])
  return outs, wouts


def assert_combined(out, reference_f32, where=""):
  """A combine's output against ``reference_combine``: bit for bit, once the
  float32 reference is rounded to the output's dtype (every backend adds in the
  reference's order and rounds once)."""
  out = np.asarray(out)
  expected = np.asarray(jnp.asarray(reference_f32, jnp.float32).astype(out.dtype))
  np.testing.assert_array_equal(out.astype(np.float32), expected.astype(np.float32), where)


class count_compilations:
  """Counts XLA compilations by function name while the ``with`` block runs.

      with count_compilations() as counts:
        step(...); step(...)
      assert counts["jit(step)"] == 1

  Listens to JAX's backend-compile monitoring event, which fires for every
  compilation (a persistent-cache hit included), so a retrace that changes
  shardings or shapes shows up even when tracing is cheap.
  """
  _EVENT = "/jax/core/compile/backend_compile_duration"

  def __enter__(self):
    import collections
    self.counts = collections.Counter()
    jax.monitoring.register_event_duration_secs_listener(self._listen)
    return self.counts

  def _listen(self, event, duration, **kwargs):
    del duration
    if event == self._EVENT:
      self.counts[kwargs.get("fun_name", "?")] += 1

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listen)


def random_moe_params(rng: np.random.Generator, hidden: int, ffn: int, num_experts: int,
                      dtype=jnp.float32) -> dict:
  """Fresh random ``jax_ep.moe`` weights (router float32 of unit scale, so the
  top-k is decisive; experts scaled by 1/sqrt(fan-in), in ``dtype``)."""
  f = lambda *s: rng.standard_normal(s).astype(np.float32)
  H, F, E = hidden, ffn, num_experts
  p = {"router": f(H, E), "w_gate": f(E, H, F) / np.sqrt(H),
       "w_up": f(E, H, F) / np.sqrt(H), "w_down": f(E, F, H) / np.sqrt(F)}
  return {k: jnp.asarray(v) if k == "router" else jnp.asarray(v).astype(dtype)
          for k, v in p.items()}


def assert_close_to_scale(got, want, rel: float, what: str):
  """Max abs error within ``rel`` of the reference's scale (max |want|)."""
  got = np.asarray(got, np.float32)
  want = np.asarray(want, np.float32)
  scale = max(np.abs(want).max(), 1e-30)
  err = np.abs(got - want).max()
  assert err <= rel * scale, f"{what}: max error {err:.3g} vs scale {scale:.3g}"


def put_moe(mesh, params, x, axis_name="ep"):
  """MoE weights placed as ``moe.moe_param_specs`` says, tokens split over the axis."""
  from jax_ep import moe
  specs = moe.moe_param_specs(axis_name)
  return ({k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()},
          jax.device_put(x, NamedSharding(mesh, P(axis_name))))


def moe_loss_and_grads(mesh, buf, **moe_kwargs):
  """``jit(value_and_grad)`` over (params, x) of ``sum(moe_block(x) * ct)``
  (float32), ``moe_kwargs`` passed to ``moe.moe_block``; the aux is ``(out,
  MoeAux)``, every aux leaf with a leading rank axis."""
  from jax_ep import moe
  specs = moe.moe_param_specs("ep")

  def body(p, x):
    out, aux = moe.moe_block(buf, p, x, **moe_kwargs)
    return out, jax.tree_util.tree_map(lambda a: a[None], aux)

  block = jax.shard_map(body, mesh=mesh, in_specs=(specs, P("ep")),
                        out_specs=(P("ep"), P("ep")))

  def loss(p, x, ct):
    out, aux = block(p, x)
    return jnp.sum(out.astype(jnp.float32) * ct), (out, aux)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def dense_moe_loss_and_grads(expert_x_fn=None, **reference_kwargs):
  """The same loss on ``moe.dense_moe_reference`` (``reference_kwargs``; the
  experts see ``expert_x_fn(x)`` if given); the aux is the output."""
  from jax_ep import moe

  def loss(p, x, ct):
    ex = None if expert_x_fn is None else expert_x_fn(x)
    out = moe.dense_moe_reference(p, x, expert_x=ex, **reference_kwargs)
    return jnp.sum(out * ct), out

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))


def assert_moe_close(out, grads, out_ref, grads_ref, rel: float, what: str = "",
                     out_rel=None):
  """An MoE output and its (params, x) gradients, each within ``rel`` (the
  output: ``out_rel`` if given) of its reference's scale
  (``assert_close_to_scale``)."""
  assert_close_to_scale(out, out_ref, rel if out_rel is None else out_rel, f"{what}output")
  for name in grads_ref[0]:
    assert_close_to_scale(grads[0][name], grads_ref[0][name], rel, f"{what}grad {name}")
  assert_close_to_scale(grads[1], grads_ref[1], rel, f"{what}grad x")


def make_mesh(num_ranks: int, axis_name: str = "ep", explicit: bool = False):
  """A 1-D mesh over the first ``num_ranks`` devices (``jax.make_mesh`` if explicit)."""
  devices = jax.devices()[:num_ranks]
  if len(devices) < num_ranks:
    raise ValueError(f"need {num_ranks} devices, have {len(jax.devices())}")
  if explicit:
    return jax.make_mesh((num_ranks,), (axis_name,), devices=devices)
  return Mesh(np.array(devices), (axis_name,))


def per_rank_fn(fn, mesh, axis_name: str = "ep"):
  """``shard_map`` of ``fn`` over arrays stacked along a leading rank axis.

  The result takes ``[R, ...]`` arrays (or None) and returns a pytree of
  ``[R, ...]`` arrays; scalars a rank returns become ``[R]``.
  """
  def body(*args):
    local = [None if a is None else a[0] for a in args]
    out = fn(*local)
    return jax.tree_util.tree_map(lambda o: o[None], out)

  return jax.shard_map(body, mesh=mesh, in_specs=P(axis_name), out_specs=P(axis_name))


def stack_per_rank(mesh, *per_rank_args, axis_name: str = "ep"):
  """Stack lists of per-rank arrays into ``[R, ...]`` arrays sharded over the axis."""
  stacked = []
  for arg in per_rank_args:
    if arg is None or arg[0] is None:
      stacked.append(None)
      continue
    a = jnp.stack([jnp.asarray(v) for v in arg])
    stacked.append(jax.device_put(a, NamedSharding(mesh, P(axis_name))))
  return stacked


def run_per_rank(fn, mesh, *per_rank_args, axis_name: str = "ep"):
  """Run ``fn(*args_of_one_rank)`` on every rank under jit; per-rank NumPy outputs.

  Each element of ``per_rank_args`` is a list with one array (or None) per
  rank. Outputs may be any pytree of arrays (scalars included) or None.
  """
  R = mesh.shape[axis_name]
  out = jax.jit(per_rank_fn(fn, mesh, axis_name))(
      *stack_per_rank(mesh, *per_rank_args, axis_name=axis_name))
  out = jax.tree_util.tree_map(np.asarray, out)
  return [jax.tree_util.tree_map(lambda o: o[r], out) for r in range(R)]


# --------------------------------------------------------------------------
# N-rank checks, run in every process by ``jax_ep.multiprocess.launch``.

def _global_mesh(axis_name="ep"):
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  return Mesh(np.array(devices), (axis_name,))


def two_axis_mesh(nodes: int):
  """The global ("node", "local") mesh of ``nodes`` x R / nodes over every device of
  every process, device ``l * nodes + n`` (in process order) as rank ``(n, l)``: with
  one process per GPU on G = ``nodes`` GPUs (``--gpus G``), the ranks of a node share
  a GPU (the local hop over CUDA IPC) and each node hop pairs different GPUs (XLA's
  NCCL refuses two ranks on one GPU)."""
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  L = len(devices) // nodes
  grid = np.array([[devices[l * nodes + n] for l in range(L)] for n in range(nodes)])
  return Mesh(grid, ("node", "local"))


def _to_global(mesh, per_rank, axis_name="ep"):
  """Per-rank NumPy arrays (every process has all of them) -> a global [R, ...] array."""
  full = np.stack(per_rank)
  return jax.make_array_from_callback(full.shape, NamedSharding(mesh, P(axis_name)),
                                      lambda index: full[index])


def _local_ranks(out):
  """{rank: that rank's piece} of a [R, ...] output, for every rank this process holds."""
  # The rank is the device's place in the mesh's flat (node-major) order: shard indices say
  # nothing for an array with no elements.
  devices = list(out.sharding.mesh.devices.flat)
  return {devices.index(s.device): np.asarray(s.data)[0] for s in out.addressable_shards}


def make_case(seed, num_ranks, num_tokens, hidden, num_topk, num_experts,
              num_worst_tokens=None, dtype="float32"):
  """Every rank's inputs and expert outputs from one seed, rounded to ``dtype``."""
  rng = np.random.default_rng(seed)
  cap = num_worst_tokens or num_tokens * num_ranks

  def rounded(shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return np.asarray(jnp.asarray(a, dtype).astype(jnp.float32))

  xs = [rounded((num_tokens, hidden)) for _ in range(num_ranks)]
  idxs = [random_routing(rng, num_tokens, num_topk, num_experts) for _ in range(num_ranks)]
  ws = [(rng.random((num_tokens, num_topk)) + 0.1).astype(np.float32)
        for _ in range(num_ranks)]
  ys = [rounded((cap, hidden)) for _ in range(num_ranks)]
  x2s = [rounded((num_tokens, hidden)) for _ in range(num_ranks)]
  return xs, idxs, ws, ys, x2s


def check_contract(process, num_processes, *, seed=0, num_tokens=64, hidden=256,
                   num_topk=4, num_experts=16, num_worst_tokens=None, dtype="bfloat16",
                   backend="cuda", num_sms=8, repeats=2, nodes=0):
  """Every dispatch/combine output of the ranks this process holds, against NumPy.

  The number of ranks R is the size of the global mesh (every device of every
  process). Runs the whole sequence ``repeats`` times with fresh inputs, so
  stale data from a previous run in reused memory cannot pass for a written
  row. Raises AssertionError on a mismatch; returns a summary on success.

  ``nodes`` > 0: the Buffer spans two axes ("node", "local") of ``nodes`` x
  R / nodes (``two_axis_mesh``), the flat contract unchanged (issue 13).
  Combine is then bit for bit in float32 only (bfloat16 rounds the node
  partials once more, as the contract allows).
  """
  import jax_ep
  axis = "ep"
  if nodes:
    mesh, axis = two_axis_mesh(nodes), ("node", "local")
  else:
    mesh = _global_mesh()
  R, N, H, K, E = mesh.size, num_tokens, hidden, num_topk, num_experts
  cap = num_worst_tokens or N * R
  jdt = jnp.dtype(dtype)
  nbytes = (jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jdt, num_worst_tokens,
                                               num_nodes=max(nodes, 1))
            if backend == "cuda" else None)
  buf = jax_ep.Buffer(mesh, axis, backend=backend, num_nvl_bytes=nbytes, num_sms=num_sms)

  def per_rank(x, idx, w, y, x2):
    x, idx, w, y, x2 = x[0].astype(jdt), idx[0], w[0], y[0].astype(jdt), x2[0].astype(jdt)
    layout = buf.get_dispatch_layout(idx, E)
    recv_x, recv_idx, recv_w, counts, h = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=E, layout=layout,
        num_worst_tokens=num_worst_tokens)
    out, out_w = buf.combine(y, h, topk_weights=recv_w)
    recv_x2, _, recv_w2, _, _ = buf.dispatch(x2, handle=h, topk_weights=w)
    # Autodiff: the gradient of dispatch (here without weights or a layout,
    # which the cuda backend then derives itself) is a combine of the cotangent.
    _, vjp = jax.vjp(lambda x: buf.dispatch(x, topk_idx=idx, num_experts=E,
                                            num_worst_tokens=num_worst_tokens)[0], x)
    (grad_x,) = vjp(y)
    res = (layout.num_tokens_per_rank, layout.num_tokens_per_expert,
           layout.is_token_in_rank, recv_x, recv_idx, recv_w, counts, h.send_pos,
           h.recv_src_idx, h.recv_src_rank, h.num_recv_tokens, out, out_w, recv_x2,
           recv_w2, grad_x)
    return tuple(r[None] for r in res)

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
  num_recv = {}
  for rep in range(repeats):
    xs, idxs, ws, ys, x2s = make_case((seed, rep), R, N, H, K, E, num_worst_tokens, dtype)
    outs = [_local_ranks(o) for o in
            fn(*[_to_global(mesh, a, axis) for a in (xs, idxs, ws, ys, x2s)])]
    ref = reference_dispatch(xs, idxs, ws, E, num_worst_tokens)
    ref2 = reference_dispatch(x2s, idxs, ws, E, num_worst_tokens)
    combined, combined_w = reference_combine(ys, ref, N, [r["recv_topk_weights"] for r in ref])
    grad_ref, _ = reference_combine(ys, ref, N)
    for rank in outs[0]:
      (per_rank_counts, per_expert, in_rank, recv_x, recv_idx, recv_w, counts, send_pos,
       src_idx, src_rank, n_recv, out, out_w, recv_x2, recv_w2, grad_x) = [
           o[rank] for o in outs]
      e = ref[rank]
      where = f"rank {rank}/{R} repeat {rep}"
      _assert_layout_and_rows(e, where, per_rank_counts, per_expert, in_rank, recv_x,
                              recv_idx, counts, send_pos)
      np.testing.assert_array_equal(recv_w, e["recv_topk_weights"], where)
      exp_rank = -np.ones(cap, np.int32)
      exp_idx = -np.ones(cap, np.int32)
      exp_w2 = np.zeros((cap, K), np.float32)
      for row, (s, i) in enumerate(e["recv_src"]):
        exp_rank[row], exp_idx[row] = s, i
        exp_w2[row] = ws[s][i]
      np.testing.assert_array_equal(src_rank, exp_rank, where)
      np.testing.assert_array_equal(src_idx, exp_idx, where)
      assert int(n_recv[0]) == e["num_recv_tokens"], where
      assert_combined(out, combined[rank], where)
      assert_combined(out_w, combined_w[rank], where + " (weights)")
      np.testing.assert_array_equal(recv_x2.astype(np.float32), ref2[rank]["recv_x"], where)
      np.testing.assert_array_equal(recv_w2, exp_w2, where)
      assert_combined(grad_x, grad_ref[rank], where + " (gradient of dispatch)")
      num_recv[rank] = int(n_recv[0])
  buf.destroy()
  return {"ranks": sorted(num_recv), "num_ranks": R, "num_recv_tokens": num_recv,
          "capacity": cap, "repeats": repeats}


def random_configs(rng: np.random.Generator, num_ranks: int, count: int):
  """``count`` random dispatch configurations for ``num_ranks`` ranks.

  Each is ``dict(N, H, K, E, M, dtype, weighted)``: N in 0..40 (0 and 1 often),
  K in 1..8, E a multiple of R up to 64 (some below K, so tokens name every
  expert), H a multiple of 8 (16-byte bf16 rows, as the cuda backend needs),
  capacity M from tight (a few rows: heavy drops) to loose (N * R, the
  default), bf16 or f32, with or without weights.
  """
  out = []
  for _ in range(count):
    N = int(rng.choice([0, 1, int(rng.integers(2, 41))], p=[0.1, 0.15, 0.75]))
    K = int(rng.integers(1, 9))
    E = num_ranks * int(rng.integers(1, max(2, 64 // num_ranks) + 1))
    tight = rng.random() < 0.5
    M = int(rng.integers(1, max(2, N * num_ranks // 2 + 1))) if tight else None
    out.append(dict(N=N, H=8 * int(rng.integers(1, 5)), K=K, E=E, M=M,
                    dtype=str(rng.choice(["float32", "bfloat16"])),
                    weighted=bool(rng.random() < 0.7)))
  return out


def _assert_layout_and_rows(e, where, per_rank_count, per_expert, in_rank, recv_x,
                            recv_idx, counts, send_pos):
  """One rank's layout, received rows, ids, counts and send positions against
  the reference dispatch ``e`` (bit for bit)."""
  np.testing.assert_array_equal(per_rank_count, e["num_tokens_per_rank"], where)
  np.testing.assert_array_equal(per_expert, e["num_tokens_per_expert"], where)
  np.testing.assert_array_equal(in_rank, e["is_token_in_rank"], where)
  np.testing.assert_array_equal(recv_x.astype(np.float32), e["recv_x"], where)
  np.testing.assert_array_equal(recv_idx, e["recv_topk_idx"], where)
  np.testing.assert_array_equal(counts, e["num_recv_tokens_per_expert"], where)
  np.testing.assert_array_equal(send_pos, e["send_pos"], where)


def check_random_routings(process, num_processes, *, count=1008, seed=0, backend="xla",
                          ranks=(1, 2, 4, 8), per_config=24, num_sms=8):
  """``count`` random routings through every op, each against the NumPy reference.

  In one process, for each R in ``ranks`` that fits the local devices (a mesh
  of the first R); under ``jax_ep.multiprocess`` for the global mesh only.
  Routings come in groups of ``per_config`` with one random configuration
  (``random_configs``) per group, run by one jitted program over the group
  (``lax.map``), so a configuration compiles once. Each routing has fresh
  inputs with -1 and out-of-range ids, and checks layout, dispatch (rows, ids,
  weights, counts, handle), combine with weights, and cached dispatch.
  Raises AssertionError naming the configuration and routing on a mismatch.
  """
  import jax_ep
  from jax import lax
  rng = np.random.default_rng(seed)
  if num_processes > 1:
    meshes = [_global_mesh()]
  else:
    local = jax.local_devices()
    meshes = [Mesh(np.array(local[:r]), ("ep",)) for r in ranks if r <= len(local)]
  groups = -(-count // per_config)
  done, configs = 0, []
  for g in range(groups):
    mesh = meshes[g % len(meshes)]
    R = mesh.size
    c = random_configs(rng, R, 1)[0]
    if c["N"] == 0 and R > 1 and mesh.devices.flat[0].platform != "cpu":
      # XLA 0.11.2's GPU compiler segfaults (in backend_compile_and_load)
      # compiling this program with N = 0 on two or more GPUs, in one process
      # or several, and still does with every jax_ep custom call taken out of
      # it (two H100s, 2026-11-26, benchmarks/RESULTS.md). N = 0 runs at R = 1
      # and on CPU meshes.
      c["N"] = 1
    configs.append(dict(c, R=R))
    print(f"jax_ep.testing: routing group {g}: {configs[-1]}", flush=True)  # if XLA dies
    N, H, K, E, M, weighted = c["N"], c["H"], c["K"], c["E"], c["M"], c["weighted"]
    B = min(per_config, count - done)
    cap = M or N * R
    dt = jnp.dtype(c["dtype"])
    nbytes = (jax_ep.Buffer.get_buffer_size_hint(max(N, 1), H, R, K, dt, M)
              if backend == "cuda" else None)
    buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes,
                        **({"num_sms": num_sms} if backend == "cuda" else {}))

    def one(args):
      x, idx, w, y, x2 = args
      x, y, x2 = x.astype(dt), y.astype(dt), x2.astype(dt)
      w = w if weighted else None
      layout = buf.get_dispatch_layout(idx, E)
      recv_x, recv_idx, recv_w, counts, h = buf.dispatch(
          x, topk_idx=idx, topk_weights=w, num_experts=E, num_worst_tokens=M)
      out, out_w = buf.combine(y, h, topk_weights=recv_w)
      recv_x2, _, _, _, _ = buf.dispatch(x2, handle=h)
      res = (tuple(layout), recv_x, recv_idx, counts, h.send_pos, h.recv_src_idx,
             h.recv_src_rank, h.num_recv_tokens, out, recv_x2)
      return res + ((recv_w, out_w) if weighted else ())

    def per_rank(anchor, *args):
      out = lax.map(one, [a[0] for a in args])
      return jax.tree_util.tree_map(lambda a: a[None], out), anchor

    # `anchor` (one element per rank) keeps the program from being all empty
    # arrays when N = 0: XLA (Shardy) then fails to compile the shard_map.

    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))

    def rounded(shape):
      return np.asarray(jnp.asarray(rng.standard_normal(shape), dt).astype(jnp.float32))

    cases = []
    for _ in range(B):
      cases.append(dict(
          x=[rounded((N, H)) for _ in range(R)], y=[rounded((cap, H)) for _ in range(R)],
          x2=[rounded((N, H)) for _ in range(R)],
          idx=[random_routing(rng, N, K, E, none_fraction=0.15, invalid_fraction=0.05)
               for _ in range(R)],
          w=[(rng.random((N, K)) + 0.1).astype(np.float32) for _ in range(R)]))
    stacked = [_to_global(mesh, [np.stack([cs[k][r] for cs in cases]) for r in range(R)])
               for k in ("x", "idx", "w", "y", "x2")]
    anchor = _to_global(mesh, [np.zeros((1,), np.int32)] * R)
    leaves, tree = jax.tree_util.tree_flatten(fn(anchor, *stacked)[0])
    pieces = [_local_ranks(leaf) for leaf in leaves]  # {rank: [B, ...]} per leaf
    got = {rank: jax.tree_util.tree_unflatten(tree, [p[rank] for p in pieces])
           for rank in pieces[0]}
    for b, cs in enumerate(cases):
      ws = cs["w"] if weighted else [None] * R
      ref = reference_dispatch(cs["x"], cs["idx"], ws, E, M)
      ref2 = reference_dispatch(cs["x2"], cs["idx"], ws, E, M)
      comb, comb_w = reference_combine(cs["y"], ref, N,
                                       [r["recv_topk_weights"] for r in ref] if weighted
                                       else None)
      for rank, outs in got.items():
        outs = [jax.tree_util.tree_map(lambda a: np.asarray(a[b]), o) for o in outs]
        (per_rank_count, per_expert, in_rank), recv_x, recv_idx, counts, send_pos, src_idx, \
            src_rank, n_recv, out, recv_x2 = outs[:10]
        e = ref[rank]
        where = f"{backend} config {c} routing {b} rank {rank}/{R}"
        _assert_layout_and_rows(e, where, per_rank_count, per_expert, in_rank, recv_x,
                                recv_idx, counts, send_pos)
        kept = e["recv_src"]
        np.testing.assert_array_equal(src_rank, [s for s, _ in kept] + [-1] * (cap - len(kept)),
                                      where)
        np.testing.assert_array_equal(src_idx, [i for _, i in kept] + [-1] * (cap - len(kept)),
                                      where)
        np.testing.assert_array_equal(n_recv, [e["num_recv_tokens"]], where)
        assert_combined(out, comb[rank], where)
        np.testing.assert_array_equal(recv_x2.astype(np.float32), ref2[rank]["recv_x"], where)
        if weighted:
          recv_w, out_w = outs[10], outs[11]
          np.testing.assert_array_equal(recv_w, e["recv_topk_weights"], where)
          assert_combined(out_w, comb_w[rank], where + " (weights)")
    buf.destroy()
    done += B
  return {"routings": done, "backend": backend, "configs": configs}


def _run_failing(fn, args, hang_s=120):
  """Run a jitted call that must fail (a kernel trap); a hang dumps stacks and exits."""
  import faulthandler
  faulthandler.dump_traceback_later(hang_s, exit=True)
  out = fn(*args)
  jax.block_until_ready(out)
  return {"unexpected": "the call returned"}


def check_op_mismatch(process, num_processes, *, hidden=64, timeout_s=30.0):
  """Rank 0 runs a dispatch where the other ranks run a combine: both must stop.

  Every rank first runs one dispatch together (so a handle exists), then the
  ranks disagree on the next op (rank-dependent control flow). The kernels
  must trap with ``jax_ep: dispatch on rank 0 met combine from rank 1`` (or
  the mirror image) instead of pairing the wrong rows.
  """
  import jax_ep
  from jax import lax
  mesh = _global_mesh()
  R, N, E, K = mesh.size, 8, 2 * mesh.size, 2
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", timeout_s=timeout_s, num_nvl_bytes=1 << 20)

  def per_rank(x, i):
    x, i = x[0].astype(jnp.bfloat16), i[0]
    recv_x, _, _, _, h = buf.dispatch(x, topk_idx=i, num_experts=E)
    first = lax.axis_index("ep") == 0
    total = lax.cond(
        first,
        lambda: buf.dispatch(x, topk_idx=i, num_experts=E)[0].astype(jnp.float32).sum(),
        lambda: buf.combine(recv_x, h)[0].astype(jnp.float32).sum())
    return total[None]

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, *_ = make_case(2, R, N, hidden, K, E)
  return _run_failing(fn, (_to_global(mesh, xs), _to_global(mesh, idxs)))


def check_fp8_dispatch(process, num_processes, *, seed=0, num_tokens=24, hidden=256,
                       num_topk=3, num_experts=16, num_worst_tokens=None, backend="cuda",
                       num_sms=8, fp8_apart=None):
  """FP8 normal dispatch and cached dispatch of the ranks this process holds
  against NumPy: FP8 bytes and scales moved bit for bit (padding rows zero
  bytes and zero scales), ids, weights and counts as for any dispatch.
  ``fp8_apart``: force the backend's way of moving them (values and scales
  apart, or packed; see ``_ll_ops._rows_fp8``); None keeps the backend's own.

  The reference moves the FP8 bytes as float32 values of the uint8 bytes.
  Returns a summary with ``dropped``, whether the capacity dropped a row.
  """
  import jax_ep
  from jax import lax
  mesh = _global_mesh()
  R, N, H, K, E = mesh.size, num_tokens, hidden, num_topk, num_experts
  nbytes = (jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.bfloat16, num_worst_tokens)
            if backend == "cuda" else None)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes, num_sms=num_sms)
  if fp8_apart is not None:
    buf._backend.fp8_apart = fp8_apart
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  x2s = [(rng.standard_normal((N, H)) * 300).astype(np.float32) for _ in range(R)]
  idxs = [random_routing(rng, N, K, E) for _ in range(R)]
  ws = [(rng.random((N, K)) + 0.1).astype(np.float32) for _ in range(R)]
  quant = [jax.jit(jax_ep.quantize_fp8)(jnp.asarray(x)) for x in xs + x2s]
  qs = [np.asarray(q).view(np.uint8) for q, _ in quant]
  ss = [np.asarray(s_) for _, s_ in quant]
  u8 = lambda a: lax.bitcast_convert_type(a, jnp.uint8)

  def per_rank(x, idx, w, x2):
    x, idx, w, x2 = x[0], idx[0], w[0], x2[0]
    (q, sc), recv_idx, recv_w, counts, h = buf.dispatch(
        jax_ep.quantize_fp8(x), topk_idx=idx, topk_weights=w, num_experts=E,
        num_worst_tokens=num_worst_tokens)
    (q2, sc2), _, recv_w2, _, _ = buf.dispatch(jax_ep.quantize_fp8(x2), handle=h,
                                                topk_weights=w)
    res = (u8(q), sc, recv_idx, recv_w, counts, u8(q2), sc2, recv_w2)
    return tuple(r[None] for r in res)

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  outs = [_local_ranks(o) for o in fn(*[_to_global(mesh, a) for a in (xs, idxs, ws, x2s)])]
  as_f32 = lambda arrays: [a.astype(np.float32) for a in arrays]
  ref = reference_dispatch(as_f32(qs[:R]), idxs, ws, E, num_worst_tokens)
  ref_s = reference_dispatch(ss[:R], idxs, ws, E, num_worst_tokens)
  ref2 = reference_dispatch(as_f32(qs[R:]), idxs, ws, E, num_worst_tokens)
  ref2_s = reference_dispatch(ss[R:], idxs, ws, E, num_worst_tokens)
  for rank in outs[0]:
    q, sc, recv_idx, recv_w, counts, q2, sc2, recv_w2 = [o[rank] for o in outs]
    where = f"rank {rank}/{R}"
    np.testing.assert_array_equal(q, ref[rank]["recv_x"], where)  # padding: zero bytes
    np.testing.assert_array_equal(sc, ref_s[rank]["recv_x"], where)  # padding: 0.0
    np.testing.assert_array_equal(recv_idx, ref[rank]["recv_topk_idx"], where)
    np.testing.assert_array_equal(recv_w, ref[rank]["recv_topk_weights"], where)
    np.testing.assert_array_equal(counts, ref[rank]["num_recv_tokens_per_expert"], where)
    np.testing.assert_array_equal(q2, ref2[rank]["recv_x"], where)
    np.testing.assert_array_equal(sc2, ref2_s[rank]["recv_x"], where)
  buf.destroy()
  return {"ranks": sorted(outs[0]), "num_ranks": R,
          "dropped": any(len(r["recv_src"]) < r["num_recv_tokens"] for r in ref)}


def check_stale_flags(process, num_processes, *, seed=3, num_tokens=1024, hidden=64,
                      pattern_width=1024, num_max_tokens=512, backend="cuda"):
  """Row bytes an earlier op left where a later op keeps its flags must not pass
  for that op's flags (where the flags sit depends on each op's shapes).

  Each op its own jitted call, in this order: a dispatch; a one-token dispatch to
  every rank whose row is int32 words laid out as the flags of sequence numbers
  1..64 (what the two-axis Buffer's int32 gathers did by chance); a cached dispatch
  with the first handle; the one-token dispatch again; a low-latency dispatch. The
  cached and low-latency rows must be the reference's. (Before every op reset its
  flags first, the cached dispatch stopped with "a row from rank 1 does not match
  the handle" where the gather's bytes sat.)
  """
  import jax_ep
  from jax_ep.handles import DispatchHandle
  mesh = _global_mesh()
  R, N, H, T, W = mesh.size, num_tokens, hidden, num_max_tokens, pattern_width
  K, E = 2, 2 * mesh.size
  nbytes = (max(jax_ep.Buffer.get_buffer_size_hint(N, H, R, K, jnp.float32),
                jax_ep.Buffer.get_low_latency_buffer_size_hint(T, H, R, K))
            if backend == "cuda" else None)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes)
  rng = np.random.default_rng(seed)
  xs = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  x2s = [rng.standard_normal((N, H)).astype(np.float32) for _ in range(R)]
  idxs = [random_routing(rng, N, K, E) for _ in range(R)]
  lls = [np.asarray(jnp.asarray(rng.standard_normal((T, H)), jnp.bfloat16).astype(jnp.float32))
         for _ in range(R)]
  ll_idxs = [random_routing(rng, T, K, E) for _ in range(R)]
  words = np.arange(W // 2)
  flag_like = np.stack([(words * 7) % N, 1 + words % 64], axis=1).astype(np.int32)
  pattern = [flag_like.reshape(1, W).view(np.float32) for _ in range(R)]
  to_all = [(2 * np.arange(R, dtype=np.int32))[None, :] for _ in range(R)]

  jitted = lambda fn: jax.jit(per_rank_fn(fn, mesh))
  g = lambda a: _to_global(mesh, a)
  fields = ("send_pos", "recv_src_idx", "recv_src_rank", "num_recv_tokens")
  dispatch = jitted(lambda x, i: (lambda o: (o[0], *(getattr(o[4], f) for f in fields)))(
      buf.dispatch(x, topk_idx=i, num_experts=E)))
  scatter = jitted(lambda x, i: buf.dispatch(x, topk_idx=i, num_experts=E,
                                             num_worst_tokens=R)[0])
  cached = jitted(lambda x, *h: buf.dispatch(x, handle=DispatchHandle(*h))[0])
  ll = jitted(lambda x, i: buf.low_latency_dispatch(x.astype(jnp.bfloat16), i, T, E)[:2])

  handle = dispatch(g(xs), g(idxs))[1:]
  scatter(g(pattern), g(to_all))
  recv2 = cached(g(x2s), *handle)
  scatter(g(pattern), g(to_all))
  recv_ll, count_ll = ll(g(lls), g(ll_idxs))
  ref2 = reference_dispatch(x2s, idxs, [None] * R, E)
  ref_ll = reference_low_latency_dispatch(lls, ll_idxs, T, E)
  got2, got_ll, got_count = (_local_ranks(o) for o in (recv2, recv_ll, count_ll))
  for rank in got2:
    where = f"rank {rank}/{R}"
    n = len(ref2[rank]["recv_x"])
    np.testing.assert_array_equal(got2[rank][:n], ref2[rank]["recv_x"], where + " cached")
    np.testing.assert_array_equal(got_count[rank], ref_ll[rank]["recv_count"], where)
    for e, c in enumerate(ref_ll[rank]["recv_count"]):
      np.testing.assert_array_equal(got_ll[rank][e, :c].astype(np.float32),
                                    ref_ll[rank]["recv_x"][e, :c], f"{where} ll expert {e}")
  buf.destroy()
  return {"ranks": sorted(got2), "num_ranks": R}


def check_layouts(process, num_processes, *, seed=11, backend="cuda",
                  cases=((128, 8, 256), (1100, 8, 256), (64, 4, 16384), (1, 1, 2))):
  """``get_dispatch_layout`` against NumPy for ``(num_tokens, num_topk,
  num_experts)`` cases that take each path: XLA's fusions (the cuda backend
  up to ``LAYOUT_XLA_MAX_SLOTS`` slots), and on cuda the layout kernel at
  every case too, called directly: few blocks, many blocks counting in shared
  memory, many blocks counting in global memory (too many experts for shared
  memory). Each case runs twice with fresh routings (the kernel keeps a
  sequence number between calls)."""
  import jax_ep
  mesh = _global_mesh()
  R = mesh.size
  rng = np.random.default_rng(seed)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend,
                      num_nvl_bytes=jax_ep.Buffer.get_buffer_size_hint(8, 64, R, 1)
                      if backend == "cuda" else None)
  paths = {"get_dispatch_layout": buf.get_dispatch_layout}
  if backend == "cuda":
    paths["layout kernel"] = buf._backend.layout_kernel
  checked = 0
  for N, K, E in cases:
    E = max(E, R) // R * R
    for path, fn in paths.items():
      layout = jax.jit(per_rank_fn(lambda i, E=E, fn=fn: tuple(fn(i, E)), mesh))
      for _ in range(2):
        idxs = [random_routing(rng, N, K, E) for _ in range(R)]
        got = [_local_ranks(o) for o in layout(_to_global(mesh, idxs))]
        for rank in got[0]:
          ref = reference_layout(idxs[rank], E, R)
          for name, g, r in zip(("num_tokens_per_rank", "num_tokens_per_expert",
                                 "is_token_in_rank"), (o[rank] for o in got), ref):
            np.testing.assert_array_equal(
                g, r, f"{path}, rank {rank}/{R}, {N}x{K} of {E}: {name}")
          checked += 1
  buf.destroy()
  return {"ranks": sorted(got[0]), "num_ranks": R, "checked": checked,
          "paths": sorted(paths)}


def check_stale_layout(process, num_processes, *, hidden=64, timeout_s=30.0):
  """Rank 0 passes a layout made for other routing: dispatch must refuse it."""
  import jax_ep
  from jax import lax
  mesh = _global_mesh()
  R, N, E, K = mesh.size, 16, 2 * mesh.size, 2
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", timeout_s=timeout_s, num_nvl_bytes=1 << 20)

  def per_rank(x, i, stale):
    x, i, stale = x[0].astype(jnp.bfloat16), i[0], stale[0]
    first = lax.axis_index("ep") == 0
    layout = buf.get_dispatch_layout(jnp.where(first, stale, i), E)
    return buf.dispatch(x, topk_idx=i, num_experts=E, layout=layout)[0][None]

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, *_ = make_case(3, R, N, hidden, K, E)
  stale = [np.roll(i, 1, axis=0) for i in idxs]  # same ids, other tokens
  return _run_failing(fn, tuple(_to_global(mesh, a) for a in (xs, idxs, stale)))


def check_use_after_destroy(process, num_processes, *, hidden=64, command_buffers=False):
  """A jitted call made before Buffer.destroy() and run after it must fail loudly."""
  import jax_ep
  mesh = _global_mesh()
  R, N, E, K = mesh.size, 8, 2 * mesh.size, 2
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", num_nvl_bytes=1 << 20)
  fn = jax.jit(jax.shard_map(
      lambda x, i: buf.dispatch(x[0], topk_idx=i[0], num_experts=E)[0][None],
      mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, *_ = make_case(4, R, N, hidden, K, E, dtype="bfloat16")
  args = (_to_global(mesh, [x.astype(jnp.bfloat16) for x in xs]), _to_global(mesh, idxs))
  compiled = fn.lower(*args).compile(_command_buffer_options(command_buffers))
  jax.block_until_ready(compiled(*args))
  buf.destroy()
  return _run_failing(compiled, args)


def _command_buffer_options(on: bool) -> dict:
  """XLA options that put custom calls into CUDA graphs (or keep everything out)."""
  if on:
    return {"xla_gpu_enable_command_buffer": "FUSION,CUSTOM_CALL",
            "xla_gpu_graph_min_graph_size": 1}
  return {"xla_gpu_enable_command_buffer": ""}


def check_command_buffers(process, num_processes, *, seed=5, num_tokens=96, hidden=256,
                          num_topk=4, num_experts=None, num_sms=8, mode="normal"):
  """dispatch -> expert -> combine captured into CUDA graphs equals the plain run.

  Compiles the same jitted layer twice, with XLA's command buffers holding our
  custom calls and with command buffers off; checks that the first really put
  jax_ep's calls into a command buffer, runs both several times (graph
  replays) and compares every output bit for bit, and with the reference.
  ``mode="low_latency"``: the layer is low_latency_dispatch -> low_latency_combine,
  in the plain form and in the split form (return_recv_hook) with work between
  each send and its receive.
  """
  import jax_ep
  mesh = _global_mesh()
  R, N, H, K = mesh.size, num_tokens, hidden, num_topk
  E = num_experts or 4 * R
  low_latency = mode == "low_latency"
  nbytes = (jax_ep.Buffer.get_low_latency_buffer_size_hint(N, H, R, K) if low_latency
            else jax_ep.Buffer.get_buffer_size_hint(N, H, R, K))
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", num_sms=num_sms, num_nvl_bytes=nbytes)

  def per_rank(x, idx, w):
    x, idx, w = x[0].astype(jnp.bfloat16), idx[0], w[0]
    if low_latency:
      two = jnp.asarray(2, jnp.bfloat16)
      recv_x, counts, h = buf.low_latency_dispatch(x, idx, N, E)
      out = buf.low_latency_combine(recv_x * two, idx, w, h)
      # XLA orders custom calls by data alone: the split form after the plain one.
      x_after, _ = jax.lax.optimization_barrier((x, out))
      _, recv_fn = buf.low_latency_dispatch(x_after, idx, N, E, return_recv_hook=True)
      work = jnp.tanh(w).sum()  # placed between the sends and their receives
      recv2, counts2, h2 = recv_fn(work)
      _, out_fn = buf.low_latency_combine(recv2 * two, idx, w, h2, return_recv_hook=True)
      return out[None], counts[None], out_fn(work)[None], counts2[None]
    recv_x, recv_idx, recv_w, counts, h = buf.dispatch(x, topk_idx=idx, topk_weights=w,
                                                       num_experts=E)
    y = (recv_x.astype(jnp.float32) * recv_w.sum(1, keepdims=True)).astype(jnp.bfloat16)
    out, _ = buf.combine(y, h)
    return out[None], counts[None]

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, ws, _, _ = make_case(seed, R, N, H, K, E, dtype="bfloat16")
  args = [_to_global(mesh, a) for a in (xs, idxs, ws)]
  with_graphs = fn.lower(*args).compile(_command_buffer_options(True))
  without = fn.lower(*args).compile(_command_buffer_options(False))
  hlo = with_graphs.as_text()
  targets = (("jax_ep_ll_dispatch", "jax_ep_ll_combine") if low_latency
             else ("jax_ep_dispatch", "jax_ep_combine"))
  captured = [line for line in hlo.splitlines() if any(t in line for t in targets)]
  in_graph = "command_buffer" in hlo
  results = {}
  for name, compiled in (("graphs", with_graphs), ("plain", without), ("graphs2", with_graphs)):
    for _ in range(3):
      outs = compiled(*args)
    per_rank = [_local_ranks(o) for o in outs]  # (out, counts[, split out, split counts])
    results[name] = {r: tuple(p[r] for p in per_rank) for r in per_rank[0]}
  if low_latency:
    ref = reference_low_latency_dispatch(xs, idxs, N, E)
    ys = [np.nan_to_num(2 * r["recv_x"]) for r in ref]
    expected = reference_low_latency_combine(ys, ref, ws, N)
    slack, u = low_latency_combine_tolerance(ys, ref, ws, N, jnp.bfloat16)
  else:
    ref = reference_dispatch(xs, idxs, ws, E)
    ys = [(r["recv_x"] * r["recv_topk_weights"].sum(1, keepdims=True)) for r in ref]
    expected, _ = reference_combine(ys, ref, N)
  for rank, got in results["plain"].items():
    out, counts = got[:2]
    for other in ("graphs", "graphs2"):
      for k, (a, b) in enumerate(zip(results[other][rank], got)):
        np.testing.assert_array_equal(a, b, f"rank {rank} {other} output {k}")
    if low_latency:
      for o, c, form in ((out, counts, ""), (got[2], got[3], " split form")):
        np.testing.assert_array_equal(c, ref[rank]["recv_count"], f"rank {rank}{form}")
        err = np.abs(o.astype(np.float32) - expected[rank])
        assert (err <= u * np.abs(expected[rank]) + slack[rank]).all(), f"rank {rank}{form}"
    else:
      np.testing.assert_allclose(out.astype(np.float32), expected[rank], rtol=2e-2, atol=2e-2)
  buf.destroy()
  return {"captured_in_command_buffer": bool(in_graph and captured),
          "ranks": sorted(results["plain"])}


def check_timeout(rank, num_ranks, *, timeout_s=2.0, hidden=64, command_buffers=False):
  """Rank 0 dispatches while the other ranks never do: rank 0 must fail, not hang."""
  import faulthandler
  import os
  import time
  import jax_ep
  mesh = _global_mesh()
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", timeout_s=timeout_s,
                      num_nvl_bytes=1 << 20)
  N, E = 8, 2 * num_ranks
  fn = jax.jit(jax.shard_map(
      lambda x, i: buf.dispatch(x[0], topk_idx=i[0], num_experts=E)[0][None],
      mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, *_ = make_case(1, num_ranks, N, hidden, 2, E)
  args = (_to_global(mesh, xs), _to_global(mesh, idxs))
  # Every process compiles (XLA may share autotuning across processes, which
  # makes compilation collective); only rank 0 runs.
  compiled = fn.lower(*args).compile(_command_buffer_options(command_buffers))
  faulthandler.dump_traceback_later(60, exit=True)  # a hang shows its stack
  if rank != 0:
    time.sleep(timeout_s * 5)
    # Leave without the distributed shutdown handshake: rank 0 is gone.
    print('JAX_EP_RESULT:{"rank": %d, "skipped_dispatch": true}' % rank, flush=True)
    os._exit(0)
  # Rank 0 runs alone: its barrier must time out.
  out = compiled(*args)
  out.block_until_ready()
  return {"rank": rank, "unexpected": "dispatch returned"}


def check_cuda_vs_xla(process, num_processes, *, seed=0, num_tokens=128, hidden=512,
                      num_topk=8, num_experts=32):
  """Both backends on the same inputs, every output compared bit for bit.

  Needs XLA's collectives for the xla backend: one process (driving every
  local GPU), not ranks emulated on one GPU.
  """
  import jax_ep
  assert num_processes == 1, "the xla backend needs XLA collectives across the ranks"
  mesh = _global_mesh()
  R = mesh.size
  xs, idxs, ws, ys, _ = make_case(seed, R, num_tokens, hidden, num_topk, num_experts,
                                  dtype="bfloat16")
  results = {}
  for backend in ("cuda", "xla"):
    buf = jax_ep.Buffer(mesh, "ep", backend=backend)

    def per_rank(x, idx, w, y):
      x, y = x[0].astype(jnp.bfloat16), y[0].astype(jnp.bfloat16)
      recv_x, recv_idx, recv_w, counts, h = buf.dispatch(
          x, topk_idx=idx[0], topk_weights=w[0], num_experts=num_experts)
      out, out_w = buf.combine(y, h, topk_weights=recv_w)
      g = jax.grad(lambda y: buf.combine(y, h)[0].astype(jnp.float32).sum())(y)
      return jax.tree_util.tree_map(lambda a: a[None], (
          recv_x, recv_idx, recv_w, counts, h, out, out_w, g))

    fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
    out = fn(*[_to_global(mesh, a) for a in (xs, idxs, ws, ys)])
    results[backend] = [np.asarray(a) for a in jax.tree_util.tree_leaves(out)]
    buf.destroy()
  for a, b in zip(results["cuda"], results["xla"]):
    np.testing.assert_array_equal(a, b)
  return {"num_ranks": R, "compared": len(results["cuda"])}


def describe_rank(rank, num_ranks, *, fail_on_rank=None):
  """What one launched process sees (a smoke target for ``jax_ep.multiprocess``)."""
  if rank == fail_on_rank:
    raise RuntimeError(f"rank {rank} was asked to fail")
  import jax_ep
  from jax_ep import _ext
  c = _ext.load()
  return {"rank": rank, "process_index": jax.process_index(),
          "process_count": jax.process_count(), "platform": jax.devices()[0].platform,
          "jax_ep": jax_ep.__file__, "jax_ep._C": None if c is None else c.__file__}


# --------------------------------------------------------------------------
# The low-latency contract and FP8 (issue 10), in plain NumPy loops.

def reference_low_latency_dispatch(xs, topk_idxs, num_max_tokens: int, num_experts: int):
  """Per-rank results of ``low_latency_dispatch`` for all ranks' inputs.

  Args: lists (one per rank) of ``x [N, H]`` and ``topk_idx [N, K]``.
  Returns a list of dicts, one per rank: ``recv_x [E_local, R*T, H]`` float32
  (NaN past the counts: the contract leaves those rows unspecified),
  ``recv_count [E_local]`` and ``recv_src`` (per local expert, the list of
  ``(source rank, token, k)`` of its rows). Copies past ``R*T`` rows of one
  expert (possible only with an id repeated in a token's row) are dropped.
  """
  R = len(xs)
  T, El = num_max_tokens, num_experts // R
  H = xs[0].shape[1]
  rows = R * T
  out = []
  for d in range(R):
    lists = [[] for _ in range(El)]
    for s in range(R):
      for i in range(xs[s].shape[0]):
        for k in range(topk_idxs[s].shape[1]):
          e = int(topk_idxs[s][i, k])
          if 0 <= e < num_experts and e // El == d:
            lists[e - d * El].append((s, i, k))
    lists = [lst[:rows] for lst in lists]
    recv_x = np.full((El, rows, H), np.nan, np.float32)
    for e, lst in enumerate(lists):
      for r, (s, i, _) in enumerate(lst):
        recv_x[e, r] = xs[s][i]
    out.append(dict(recv_x=recv_x, recv_count=np.array([len(l) for l in lists], np.int32),
                    recv_src=lists))
  return out


def reference_low_latency_combine(ys, dispatched, topk_weights, num_tokens: int):
  """``out[s][i] = sum_k w[s][i, k] * ys[d][e, row of (s, i, k)]`` in float32."""
  R = len(ys)
  H = ys[0].shape[2]
  outs = [np.zeros((num_tokens, H), np.float32) for _ in range(R)]
  for d in range(R):
    for e, lst in enumerate(dispatched[d]["recv_src"]):
      for r, (s, i, k) in enumerate(lst):
        outs[s][i] += np.float32(topk_weights[s][i, k]) * np.asarray(ys[d][e, r], np.float32)
  return outs


def low_latency_combine_tolerance(ys, dispatched, topk_weights, num_tokens: int, dtype):
  """Per rank, ``(slack [N, H], u)``: combine may be off by ``u |want| + slack``.

  ``u`` is the output rounding to ``dtype`` (unit roundoff 2^-8 for bf16,
  2^-24 for f32); ``slack`` covers float32 reassociation of the K-term sum (a
  rank sums its copies first): at most ``2 K 2^-24`` of the sum of |terms|,
  computed by the reference on absolute values.
  """
  R, K = len(ys), topk_weights[0].shape[1]
  u = 2.0 ** -8 if jnp.dtype(dtype) == jnp.bfloat16 else 2.0 ** -24
  abs_terms = reference_low_latency_combine([np.abs(y) for y in ys], dispatched,
                                            [np.abs(w) for w in topk_weights], num_tokens)
  return [2 * K * 2.0 ** -24 * abs_terms[s] for s in range(R)], u


def check_low_latency(process, num_processes, *, seed=0, num_ranks=None, num_tokens=24,
                      num_max_tokens=32, hidden=256, num_topk=4, num_experts=16,
                      dtype="bfloat16", backend="cuda", repeat_fraction=0.1,
                      hot_fraction=0.0):
  """The low-latency contract for the ranks this process holds, against NumPy.

  One jitted program per rank runs: dispatch (rows bit for bit in (source rank,
  token, k) order, counts, the handle's slots), combine with NaN/Inf in the rows
  past the counts (they must not leak), the split (return_recv_hook) forms of
  both (identical results), FP8 dispatch, plain and split (the sender's
  quantized bytes and scales, when hidden % 128 == 0), and the gradients of
  ``sum(combine(2 * dispatch(x), w) * g)`` in x and w (autodiff's weighted
  dispatch and unweighted combine), all against NumPy. Routings have -1,
  out-of-range ids and repeated experts within a token; ``hot_fraction`` of the
  ids become expert 0 (more than R*T copies then get dropped). ``num_ranks``: in one
  process, a mesh of the first R devices (default every device).
  Returns a summary (ranks checked, copies, and whether any row was dropped).
  """
  import jax_ep
  from jax import lax
  mesh = (Mesh(np.array(jax.devices()[:num_ranks]), ("ep",))
          if num_ranks and num_processes == 1 else _global_mesh())
  R, N, T, H, K, E = mesh.size, num_tokens, num_max_tokens, hidden, num_topk, num_experts
  El, rows, dt = E // R, R * T, jnp.dtype(dtype)
  nbytes = (jax_ep.Buffer.get_low_latency_buffer_size_hint(T, H, R, K)
            if backend == "cuda" else None)
  buf = jax_ep.Buffer(mesh, "ep", backend=backend, num_nvl_bytes=nbytes)
  rng = np.random.default_rng(seed)
  rounded = lambda a: np.asarray(jnp.asarray(a, dt).astype(jnp.float32))
  xs = [rounded(rng.standard_normal((N, H))) for _ in range(R)]
  idxs = []
  for _ in range(R):
    idx = random_routing(rng, N, K, E, none_fraction=0.15, invalid_fraction=0.05)
    rep = (rng.random(N) < repeat_fraction) & (idx[:, 0] >= 0) & (idx[:, 0] < E)
    idx[rep, K - 1] = idx[rep, 0]  # the same expert twice in a row
    idx[rng.random(idx.shape) < hot_fraction] = 0
    idxs.append(idx)
  ws = [(rng.random((N, K)) + 0.1).astype(np.float32) for _ in range(R)]
  ys = [rounded(rng.standard_normal((El, rows, H))) for _ in range(R)]
  gs = [rounded(rng.standard_normal((N, H))) for _ in range(R)]
  fp8 = H % 128 == 0
  u8 = lambda a: lax.bitcast_convert_type(a, jnp.uint8)

  def per_rank(x, idx, w, y, g):
    x, idx, w, y, g = x[0].astype(dt), idx[0], w[0], y[0].astype(dt), g[0].astype(dt)
    recv_x, count, h = buf.low_latency_dispatch(x, idx, T, E)
    past = jnp.arange(rows)[None, :, None] >= count[:, None, None]
    poison = jnp.where(jnp.arange(H) % 2 == 0, jnp.array(jnp.inf, dt), jnp.array(jnp.nan, dt))
    out = buf.low_latency_combine(jnp.where(past, poison, y), idx, w, h)
    state, recv_fn = buf.low_latency_dispatch(x, idx, T, E, return_recv_hook=True)
    recv_x2, count2, h2 = recv_fn()
    state, out_fn = buf.low_latency_combine(y, idx, w, h2, return_recv_hook=True)
    out2 = out_fn()

    def loss(x, w):
      recv, _, hl = buf.low_latency_dispatch(x, idx, T, E)
      o = buf.low_latency_combine(recv * jnp.asarray(2, dt), idx, w, hl)
      return jnp.sum(o.astype(jnp.float32) * g.astype(jnp.float32))

    gx, gw = jax.grad(loss, (0, 1))(x.astype(jnp.float32), w)
    res = (recv_x, count, h.src_slot, h.recv_slot, out, recv_x2, count2, out2, gx, gw)
    if fp8:
      (q, sc), count3, _ = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True)
      _, recv_fp8 = buf.low_latency_dispatch(x, idx, T, E, use_fp8=True, return_recv_hook=True)
      (q4, sc4), count4, _ = recv_fp8()
      res = res + (u8(q), sc, count3, u8(q4), sc4, count4)
    return tuple(r[None] for r in res)

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  outs = [_local_ranks(o) for o in fn(*[_to_global(mesh, a) for a in (xs, idxs, ws, ys, gs)])]
  ref = reference_low_latency_dispatch(xs, idxs, T, E)
  want = reference_low_latency_combine(ys, ref, ws, N)
  slack, u = low_latency_combine_tolerance(ys, ref, ws, N, dt)
  # Gradients: d/dx_i = 2 sum_k w_ik g_i, d/dw_ik = 2 <g_i, x_i>, over kept copies.
  gx_ref = [np.zeros((N, H), np.float32) for _ in range(R)]
  gw_ref = [np.zeros((N, K), np.float32) for _ in range(R)]
  for d in range(R):
    for lst in ref[d]["recv_src"]:
      for s, i, k in lst:
        gx_ref[s][i] += 2 * ws[s][i, k] * gs[s][i]
        gw_ref[s][i, k] += 2 * np.dot(gs[s][i], xs[s][i])
  for rank in outs[0]:
    got = [o[rank] for o in outs]
    recv_x, count, src_slot, recv_slot, out, recv_x2, count2, out2, gx, gw = got[:10]
    e_ref, where = ref[rank], f"{backend} rank {rank}/{R}"
    np.testing.assert_array_equal(count, e_ref["recv_count"], where)
    np.testing.assert_array_equal(count2, e_ref["recv_count"], where)
    want_src = np.full((El, rows), -1, np.int64)
    want_recv = np.full((rows * K,), -1, np.int64)
    for e, lst in enumerate(e_ref["recv_src"]):
      n = len(lst)
      np.testing.assert_array_equal(recv_x[e, :n].astype(np.float32), e_ref["recv_x"][e, :n],
                                    f"{where} expert {e}")
      np.testing.assert_array_equal(recv_x2[e, :n], recv_x[e, :n], f"{where} split form")
      for r, (s, i, k) in enumerate(lst):
        want_src[e, r] = (s * T + i) * K + k
        want_recv[(s * T + i) * K + k] = e * rows + r
    np.testing.assert_array_equal(src_slot, want_src, where + " src_slot")
    np.testing.assert_array_equal(recv_slot.reshape(-1), want_recv, where + " recv_slot")
    for o, form in ((out, ""), (out2, " (split form)")):
      # (Not bit for bit between the forms: XLA may fuse either one's sum.)
      assert o.dtype == dt and np.isfinite(o.astype(np.float32)).all(), where + form
      err = np.abs(o.astype(np.float32) - want[rank])
      assert (err <= u * np.abs(want[rank]) + slack[rank]).all(), f"{where}{form}: {err.max()}"
    none = ~_valid(idxs[rank], E).any(1)
    assert (out[none].astype(np.float32) == 0).all(), where
    # (The loss runs in float32: float32 reassociation only.)
    np.testing.assert_allclose(gx, gx_ref[rank], rtol=1e-5, atol=1e-5, err_msg=where + " grad x")
    np.testing.assert_allclose(gw, gw_ref[rank], rtol=1e-5, atol=1e-4, err_msg=where + " grad w")
    if fp8:
      qb, sc, count3, qb4, sc4, count4 = got[10:]
      np.testing.assert_array_equal(count3, e_ref["recv_count"], where)
      np.testing.assert_array_equal(count4, e_ref["recv_count"], where + " fp8 split form")
      for e, lst in enumerate(e_ref["recv_src"]):
        for r, (s, i, _) in enumerate(lst):
          q_ref, s_ref = reference_quantize_fp8(xs[s][i])
          for q_got, s_got, form in ((qb, sc, ""), (qb4, sc4, " (split form)")):
            np.testing.assert_array_equal(q_got[e, r], q_ref.view(np.uint8),
                                          f"{where} fp8{form}")
            np.testing.assert_array_equal(s_got[e, r], s_ref, f"{where} fp8 scales{form}")
  buf.destroy()
  copies = sum(len(l) for r in ref for l in r["recv_src"])
  routed = sum(int((_valid(i, E)).sum()) for i in idxs)
  return {"ranks": sorted(outs[0]), "num_ranks": R, "copies": copies,
          "dropped": copies < routed, "fp8": fp8}


def check_low_latency_cases(process, num_processes, *, backend="cuda", large=True):
  """``check_low_latency`` over the GPU suite's configurations: bfloat16 with
  FP8, float32 with K = 3, one expert per rank with repeats (copies dropped
  past R*T rows), more (token, rank) tasks than the send has warp groups (a
  group numbers several tokens' copies, 2 * SMs groups on a GPU), and (with
  ``large``, R <= 2) DeepEP's decode shape."""
  R = _global_mesh().size if num_processes > 1 else len(jax.devices())
  cases = [dict(seed=1, num_tokens=24, num_max_tokens=32, hidden=256, num_topk=4,
                num_experts=4 * R),
           dict(seed=2, num_tokens=7, num_max_tokens=9, hidden=64, num_topk=3,
                num_experts=2 * R, dtype="float32"),
           dict(seed=3, num_tokens=16, num_max_tokens=16, hidden=128, num_topk=4,
                num_experts=2 * R, hot_fraction=0.6),
           dict(seed=5, num_tokens=300, num_max_tokens=320, hidden=128, num_topk=6,
                num_experts=8 * R)]
  if large and R <= 2:
    cases.append(dict(seed=4, num_tokens=100, num_max_tokens=128, hidden=7168, num_topk=8,
                      num_experts=256))
  results = [check_low_latency(process, num_processes, backend=backend, **c) for c in cases]
  return {"ranks": results[0]["ranks"], "num_ranks": R,
          "dropped": any(r["dropped"] for r in results),
          "cases": len(results)}


def check_receive_pending(process, num_processes, *, hidden=128, timeout_s=30.0):
  """A low-latency dispatch is sent and, before its receive, a normal dispatch
  runs on the Buffer: the kernels must stop with ``jax_ep: dispatch on rank r:
  the low_latency_dispatch sent before it was not received yet`` instead of
  overwriting the rows in flight."""
  import jax_ep
  mesh = _global_mesh()
  R, N, E, K = mesh.size, 8, 2 * mesh.size, 2
  buf = jax_ep.Buffer(mesh, "ep", backend="cuda", timeout_s=timeout_s, num_nvl_bytes=8 << 20)

  def per_rank(x, i):
    x, i = x[0].astype(jnp.bfloat16), i[0]
    state, _ = buf.low_latency_dispatch(x, i, N, E, return_recv_hook=True)
    after = x + jnp.zeros((), x.dtype) * state.ticket.astype(x.dtype)  # after the send
    return buf.dispatch(after, topk_idx=i, num_experts=E)[0].astype(jnp.float32).sum()[None]

  fn = jax.jit(jax.shard_map(per_rank, mesh=mesh, in_specs=P("ep"), out_specs=P("ep")))
  xs, idxs, *_ = make_case(3, R, N, hidden, K, E)
  return _run_failing(fn, (_to_global(mesh, xs), _to_global(mesh, idxs)))


def reference_quantize_fp8(x: np.ndarray):
  """NumPy (ml_dtypes) per-128-channel e4m3fn quantization: ``(q, scales)``."""
  import ml_dtypes
  x = np.asarray(x, np.float32)
  blocks = x.reshape(x.shape[:-1] + (x.shape[-1] // 128, 128))
  amax = np.abs(blocks).max(-1)
  scales = np.maximum(amax * np.float32(1.0 / 448.0), np.finfo(np.float32).tiny).astype(np.float32)
  v = np.clip(blocks * (np.float32(1.0) / scales)[..., None], -448.0, 448.0)
  return v.astype(ml_dtypes.float8_e4m3fn).reshape(x.shape), scales


def fp8_error_bound(x: np.ndarray, scales: np.ndarray) -> np.ndarray:
  """Largest ``|x - q * s|`` per element that e4m3fn rounding allows.

  With ``v = x / s`` (``|v| <= 448``), e4m3fn has 3 stored mantissa bits: in
  its normal range (``|v| >= 2^-6``) neighbours are ``2^-3 |v|`` apart at
  most, so round-to-nearest is off by at most half of that, ``2^-4 |v|``;
  below ``2^-6`` (subnormals) the spacing is ``2^-9``, so the error is at most
  ``2^-10``. Scaling back by ``s``: ``|x - q s| <= 2^-4 |x| + 2^-10 s``. The
  reciprocal ``1/s``, the product ``x * (1/s)`` and the product ``q * s`` in
  float32 add a relative ``2^-24`` each, covered by the ``2^-20`` terms.
  XLA flushes float32 subnormals (``|x| <`` 2^-126) to zero on CPU and GPU,
  so there the error may be ``|x|`` itself.
  """
  s = np.repeat(np.asarray(scales, np.float32), 128, axis=-1)
  ax = np.abs(np.asarray(x, np.float32))
  bound = (2.0 ** -4 + 2.0 ** -20) * ax + (2.0 ** -10 + 2.0 ** -20) * s
  return np.where(ax < np.finfo(np.float32).tiny, np.maximum(bound, ax), bound)
