"""Buffer over two mesh axes ("node", "local") against a flat xla Buffer (issue 13).

The flat Buffer runs over the same 8 devices in the same order (rank = node * L
+ local). Every output must be bit-identical, in float32 combine's sums (and
so the gradient of dispatch) too: combine adds a token's copies in pairwise
rank order, and the hierarchical combine's per-node sums are subtrees of that
order. In bfloat16 the node partials are rounded once more, so there combine
is checked bit for bit against a NumPy model of that order (``_model_combine``),
as it is in float32.
Drops at the node hop are checked against the flat Buffer run on the routing
that survived the node hop (the lost (token, node) experts set to -1).
"""
import re

import ml_dtypes
import numpy as np
import pytest

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jax_ep
from jax_ep import testing as ept

AXES = ("node", "local")
R, N, H, K, E = 8, 24, 16, 4, 32
B = 3  # random routings per compiled program
TIGHT_M, TIGHT_F = 40, 8  # both overflow with these routings (asserted below)


def _meshes(shape):
  devices = np.array(jax.devices()[:R])
  return Mesh(devices.reshape(shape), AXES), Mesh(devices, ("ep",))


def _case(seed, dtype):
  rng = np.random.default_rng(seed)

  def rounded(shape):
    a = rng.standard_normal(shape).astype(np.float32)
    return a.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else a

  return dict(
      x=rounded((B, R, N, H)), y=rounded((B, R, N * R, H)), x2=rounded((B, R, N, H)),
      idx=np.stack([np.stack([ept.random_routing(rng, N, K, E) for _ in range(R)])
                    for _ in range(B)]),
      w=(rng.random((B, R, N, K)) + 0.1).astype(np.float32))


def _surviving_ids(idx, num_local, capacity):
  """ids with the experts of each (token, node) past the node hop's ``capacity`` set to
  -1: the routing a forward-dropping dispatch delivers (NumPy, per source rank)."""
  out = idx.copy()
  per_rank = E // R
  for b in range(idx.shape[0]):
    for s in range(R):
      seen = {}
      for i in range(N):
        nodes = {int(e) // per_rank // num_local for e in idx[b, s, i] if 0 <= e < E}
        for n in sorted(nodes):
          seen[n] = seen.get(n, 0) + 1
          if seen[n] > capacity:
            ids = out[b, s, i]
            ids[(ids >= 0) & (ids < E) & (ids // per_rank // num_local == n)] = -1
  return out


def _tree_sum(terms):
  """NumPy: pairwise sum over the list, padded with zeros to a power of two."""
  while len(terms) > 1:
    terms = terms + [np.zeros_like(terms[0])] * (len(terms) % 2)
    terms = [terms[i] + terms[i + 1] for i in range(0, len(terms), 2)]
  return terms[0]


def _model_combine(ys, src_rank, src_idx, num_local, dtype):
  """combine in the hierarchical order: float32 pairwise sums per (token, node)
  over the node's local ranks, rounded to ``dtype``, then pairwise over nodes."""
  num_nodes = R // num_local
  copies = np.zeros((R, R, N) + ys.shape[2:], np.float32)  # [home s, rank d, token]
  for d in range(R):
    rows = np.nonzero(src_rank[d] >= 0)[0]
    copies[src_rank[d][rows], d, src_idx[d][rows]] = ys[d][rows]
  partial = [_tree_sum([copies[:, n * num_local + l] for l in range(num_local)])
             for n in range(num_nodes)]
  if dtype == "bfloat16":
    partial = [p.astype(ml_dtypes.bfloat16).astype(np.float32) for p in partial]
  total = _tree_sum(partial)
  return total.astype(ml_dtypes.bfloat16).astype(np.float32) if dtype == "bfloat16" else total


def _program(buf, axis, dtype, variants):
  """jit(shard_map) running, per routing, layout + dispatch + combine + cached
  dispatch + both gradients for each (ids input, M, F) of ``variants``."""
  dt = jnp.dtype(dtype)

  def one(args):
    x, y, x2, w, *ids = args
    x, y, x2 = x.astype(dt), y.astype(dt), x2.astype(dt)
    res = []
    for which, M, F in variants:
      idx = ids[which]
      extra = {} if F is None else {"num_worst_forward_tokens": F}
      layout = buf.get_dispatch_layout(idx, E)
      disp = lambda x: buf.dispatch(x, topk_idx=idx, topk_weights=w, num_experts=E,
                                    num_worst_tokens=M, **extra)
      recv_x, recv_idx, recv_w, counts, h = disp(x)
      yM = y[:h.capacity]
      out, out_w = buf.combine(yM, h, topk_weights=recv_w)
      recv_x2, _, recv_w2, _, _ = buf.dispatch(x2, handle=h, topk_weights=w)
      _, vjp_d = jax.vjp(lambda x: disp(x)[0], x)
      (grad_x,) = vjp_d(yM)
      _, vjp_c = jax.vjp(lambda y: buf.combine(y, h)[0], yM)
      (grad_y,) = vjp_c(x2)
      r = dict(layout=tuple(layout), recv_x=recv_x, recv_idx=recv_idx, recv_w=recv_w,
               counts=counts, send_pos=h.send_pos, src_idx=h.recv_src_idx,
               src_rank=h.recv_src_rank, num_recv=h.num_recv_tokens, out=out,
               out_w=out_w, recv_x2=recv_x2, recv_w2=recv_w2, grad_x=grad_x,
               grad_y=grad_y, dropped=h.num_dropped_tokens[None])
      if isinstance(axis, tuple):
        r.update(forward_src_idx=h.forward_src_idx, forward_pos=h.forward_pos,
                 forward_dropped=h.num_forward_dropped_tokens[None])
      res.append(r)
    return res

  def per_rank(*args):
    out = lax.map(one, [a[:, 0] for a in args])  # [B, ...] per rank
    return jax.tree_util.tree_map(lambda a: a[:, None], out)

  spec = P(None, axis)
  return jax.jit(jax.shard_map(per_rank, mesh=buf.mesh, in_specs=spec, out_specs=spec))


def _run(fn, mesh, axis, case, ids):
  sh = NamedSharding(mesh, P(None, axis))
  args = [case[k] for k in ("x", "y", "x2", "w")] + list(ids)
  out = fn(*[jax.device_put(a, sh) for a in args])
  return jax.tree_util.tree_map(lambda a: np.asarray(a.astype(jnp.float32))
                                if a.dtype == jnp.bfloat16 else np.asarray(a), out)


FLAT_SAME = ("layout", "recv_x", "recv_idx", "recv_w", "counts", "send_pos", "src_idx",
             "src_rank", "recv_x2", "recv_w2", "grad_y")


@pytest.mark.parametrize("shape,dtype", [((2, 4), "float32"), ((4, 2), "float32"),
                                         ((8, 1), "float32"), ((4, 2), "bfloat16")])
def test_matches_flat(shape, dtype):
  hmesh, fmesh = _meshes(shape)
  L = shape[1]
  case = _case(hash((shape, dtype)) % 2**31, dtype)
  survived = _surviving_ids(case["idx"], L, TIGHT_F)
  hier = jax_ep.Buffer(hmesh, AXES, backend="xla")
  flat = jax_ep.Buffer(fmesh, "ep", backend="xla")
  # (ids: 0 = drawn, 1 = what survives F = TIGHT_F; M; F)
  h = _run(_program(hier, AXES, dtype, [(0, None, None), (0, TIGHT_M, None),
                                        (0, TIGHT_M, TIGHT_F)]),
           hmesh, AXES, case, [case["idx"]])
  f = _run(_program(flat, "ep", dtype, [(0, None, None), (0, TIGHT_M, None),
                                        (1, TIGHT_M, None)]),
           fmesh, "ep", case, [case["idx"], survived])
  assert (f[1]["dropped"] > 0).any() and (h[2]["forward_dropped"] > 0).any()
  for v, (hv, fv) in enumerate(zip(h, f)):
    where = f"mesh {shape} {dtype} variant {v}"
    for key in FLAT_SAME:
      # The layout is of the drawn routing, whatever the node hop drops later.
      other = f[1] if key == "layout" and v == 2 else fv
      for a, b in zip(jax.tree_util.tree_leaves(hv[key]),
                      jax.tree_util.tree_leaves(other[key])):
        np.testing.assert_array_equal(a, b, f"{where}: {key}")
    # The routed count is the drawn routing's, whatever the node hop dropped.
    np.testing.assert_array_equal(hv["num_recv"], f[min(v, 1)]["num_recv"], where)
    np.testing.assert_array_equal(hv["dropped"], fv["dropped"] + (
        hv["forward_dropped"] if v == 2 else 0), where)
    for b in range(B):
      M = hv["recv_x"].shape[2]
      for key, ys in (("out", case["y"][b][:, :M]), ("grad_x", case["y"][b][:, :M]),
                      ("out_w", fv["recv_w"][b])):
        model = _model_combine(ys, fv["src_rank"][b], fv["src_idx"][b], L,
                               dtype if key != "out_w" else "float32")
        np.testing.assert_array_equal(hv[key][b], model, f"{where}: {key} routing {b}")
        if dtype == "float32":  # the flat tree split at the nodes: the same bits
          np.testing.assert_array_equal(hv[key][b], fv[key][b],
                                        f"{where}: {key} routing {b} against flat")

  # Node hop traffic: rows that crossed into each forwarder from other nodes are
  # exactly the distinct (token, destination node != home node) pairs.
  per_rank = E // R
  for b in range(B):
    pairs = 0
    for s in range(R):
      for i in range(N):
        nodes = {int(e) // per_rank // L for e in case["idx"][b, s, i] if 0 <= e < E}
        pairs += len(nodes - {s // L})
    fwd = h[0]["forward_src_idx"][b]  # [R, Nn, F]
    crossed = sum(int((fwd[d, n] >= 0).sum()) for d in range(R) for n in range(R // L)
                  if n != d // L)
    sent = sum(int((h[0]["forward_pos"][b][s][:, n] >= 0).sum()) for s in range(R)
               for n in range(R // L) if n != s // L)
    assert crossed == sent == pairs
    if L > 1:  # fewer than a flat exchange's (token, rank on another node) copies
      flat_rows = sum(int(f[0]["layout"][2][b][s][:, [d for d in range(R) if d // L != s // L]]
                          .sum()) for s in range(R))
      assert pairs < flat_rows


def test_handle_leaves_jit_and_drops_are_reported():
  from jax.experimental import checkify
  hmesh, _ = _meshes((2, 4))
  buf = jax_ep.Buffer(hmesh, AXES, backend="xla")
  case = _case(7, "float32")
  sh = NamedSharding(hmesh, P(AXES))
  x, idx, y = (jax.device_put(case[k][0], sh) for k in ("x", "idx", "y"))
  spec = P(AXES)

  def dispatch(x, idx, M=None, F=None):
    return buf.dispatch(x[0], topk_idx=idx[0], num_experts=E, num_worst_tokens=M,
                        num_worst_forward_tokens=F)

  one_jit = jax.jit(jax.shard_map(
      lambda x, idx, y: buf.combine(y[0], dispatch(x, idx)[4])[0][None],
      mesh=hmesh, in_specs=spec, out_specs=spec))(x, idx, y)
  handle = jax.jit(jax.shard_map(lambda x, idx: dispatch(x, idx)[4], mesh=hmesh,
                                 in_specs=spec, out_specs=spec))(x, idx)
  assert isinstance(handle, jax_ep.DispatchHandle) and handle.num_recv_tokens.shape == (R,)
  two_jits = jax.jit(jax.shard_map(lambda h, y: buf.combine(y[0], h)[0][None], mesh=hmesh,
                                   in_specs=spec, out_specs=spec))(handle, y)
  np.testing.assert_array_equal(one_jit, two_jits)

  def checked(M, F):
    def per_rank(x, idx):
      jax_ep.check_no_dropped_tokens(dispatch(x, idx, M, F)[4])
      return x
    return jax.jit(checkify.checkify(jax.shard_map(
        per_rank, mesh=hmesh, in_specs=spec, out_specs=spec)))(x, idx)[0]

  jax.device_get(checked(None, None)).throw()
  with pytest.raises(checkify.JaxRuntimeError, match="dropped at the node hop: "
                     "num_worst_forward_tokens is 4"):
    jax.device_get(checked(None, 4)).throw()
  with pytest.raises(checkify.JaxRuntimeError, match="num_worst_tokens is 10"):
    jax.device_get(checked(10, None)).throw()

  # Without checkify: lost (token, rank) pairs, summed over the ranks, equal what
  # the flat routing loses when the node hop's overflow is removed from it.
  lost = jax.jit(jax.shard_map(
      lambda x, idx: lax.psum(dispatch(x, idx, None, 4)[4].num_dropped_tokens, AXES),
      mesh=hmesh, in_specs=spec, out_specs=P()))(x, idx)
  ids = case["idx"][:1]
  in_rank = lambda ids: sum(ept.reference_layout(ids[0, s], E, R)[2].sum() for s in range(R))
  assert int(lost) == in_rank(ids) - in_rank(_surviving_ids(ids, 4, 4)) > 0


def test_bad_arguments():
  hmesh, fmesh = _meshes((2, 4))
  with pytest.raises(ValueError, match="NVIDIA GPUs"):  # the local hop's cuda backend
    jax_ep.Buffer(hmesh, AXES, backend="cuda")
  with pytest.raises(ValueError, match="ragged"):
    jax_ep.Buffer(hmesh, AXES, backend="ragged")
  with pytest.raises(ValueError, match="'nodes'.*is not an axis"):
    jax_ep.Buffer(hmesh, ("nodes", "local"), backend="xla")
  with pytest.raises(ValueError, match="two different mesh axes"):
    jax_ep.Buffer(hmesh, ("node", "node"), backend="xla")
  buf = jax_ep.Buffer(hmesh, AXES, backend="xla")  # auto on CPU is xla too
  assert jax_ep.Buffer(hmesh, AXES).backend == "xla" and buf.num_ranks == R
  flat = jax_ep.Buffer(fmesh, "ep", backend="xla")
  x, idx = jnp.zeros((R * N, H)), jnp.zeros((R * N, K), jnp.int32)

  def run(b, mesh, axis, fn):
    return jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(axis))(x, idx)

  with pytest.raises(ValueError, match="num_worst_forward_tokens is for Buffers over two"):
    run(flat, fmesh, "ep", lambda x, i: flat.dispatch(
        x, topk_idx=i, num_experts=E, num_worst_forward_tokens=4)[0])
  with pytest.raises(ValueError, match="num_worst_forward_tokens must be >= 1"):
    run(buf, hmesh, AXES, lambda x, i: buf.dispatch(
        x, topk_idx=i, num_experts=E, num_worst_forward_tokens=0)[0])
  i32 = lambda *shape: jnp.zeros(shape, jnp.int32)
  flat_handle = jax_ep.DispatchHandle(i32(N, R), i32(N), i32(N), i32(1))
  with pytest.raises(TypeError, match="handle must come from this Buffer's dispatch"):
    run(buf, hmesh, AXES, lambda x, i: buf.combine(x, flat_handle)[0])


def test_main_job_on_a_two_axis_mesh(capsys):
  from jax_ep import __main__ as main_job
  rc = main_job.main(["--mesh", "2x4", "--tokens", "16", "--hidden", "32", "--iters", "1"])
  text = capsys.readouterr().out
  assert rc == 0, text
  assert re.search(r"mesh 2x4 \(node x local\): .* MB cross the node axis", text), text
  row = next(l for l in text.splitlines() if l.split()[:1] == ["xla"])
  assert row.split()[-1] == "ok", row


def test_fp8_dispatch_over_two_axes_equals_flat():
  """FP8 rows take the same path as bf16 ones: byte for byte the flat result."""
  devs = np.array(jax.devices()[:8]).reshape(2, 4)
  N, H, K, E = 16, 256, 2, 16
  rng = np.random.default_rng(21)
  x = jnp.asarray(rng.standard_normal((8 * N, H)), jnp.bfloat16)
  idx = jnp.asarray(rng.integers(-1, E + 2, (8 * N, K)), jnp.int32)
  q, s = jax_ep.quantize_fp8(x)
  outs = []
  for mesh, axis in ((Mesh(devs, ("node", "local")), ("node", "local")),
                     (Mesh(devs.reshape(-1), ("ep",)), "ep")):
    buf = jax_ep.Buffer(mesh, axis, backend="xla")
    run = jax.jit(jax.shard_map(
        lambda q, s, i: buf.dispatch((q, s), topk_idx=i, num_experts=E,
                                     num_worst_tokens=3 * N)[0],
        mesh=mesh, in_specs=P(axis), out_specs=P(axis)))
    outs.append([np.asarray(a) for a in run(q, s, idx)])
  (q2, s2), (q1, s1) = outs
  np.testing.assert_array_equal(q2.view(np.uint8), q1.view(np.uint8))
  np.testing.assert_array_equal(s2, s1)
  assert np.any(q1.view(np.uint8))  # rows did arrive


@pytest.mark.parametrize("nodes", [2, 4])
def test_contract_check_over_two_axes(nodes):
  # testing.check_contract(nodes=...) is what the GPU suite runs with the cuda
  # local hop; here on xla, against the NumPy reference, drops included.
  res = ept.check_contract(0, 1, backend="xla", nodes=nodes, dtype="float32",
                           num_experts=16, num_worst_tokens=200)
  assert res["num_ranks"] == 8 and res["ranks"] == list(range(8))
  assert any(n > res["capacity"] for n in res["num_recv_tokens"].values())  # drops


@pytest.mark.parametrize("shape", [(2, 4), (4, 2)])
def test_gather_by_dispatch_is_all_gather(shape):
  # The cuda local hop gathers the forwarders' metadata with a dispatch (XLA's NCCL
  # refuses local ranks that share a GPU); the same function on the xla backend's
  # dispatch must give lax.all_gather's result, including -1s and odd lengths.
  from jax_ep.backends.hierarchical import gather_by_dispatch
  from jax_ep.backends.xla import XlaBackend
  hmesh, _ = _meshes(shape)
  L = shape[1]
  local = XlaBackend("local", L)
  rng = np.random.default_rng(5)
  a = rng.integers(0, 1 << 30, (R, 7)).astype(np.int32)
  a[rng.random(a.shape) < 0.3] = -1
  a = jnp.asarray(a)

  def both(v):
    v = v[0]
    return gather_by_dispatch(local, L, v)[None], lax.all_gather(v, "local")[None]

  got, want = jax.jit(jax.shard_map(both, mesh=hmesh, in_specs=P(AXES),
                                    out_specs=P(AXES)))(a)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  assert np.asarray(want).shape == (R, L, 7) and np.any(np.asarray(a) == -1)
