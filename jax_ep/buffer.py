"""``Buffer``: the user-facing object, in the spirit of DeepEP's ``deep_ep.Buffer``.

Make one outside ``jit`` for a mesh axis, then call its methods inside
``jax.shard_map`` over that axis. Each method takes and returns the per-rank
view of the arrays.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from jax_ep import _ops
from jax_ep.handles import DispatchHandle, DispatchLayout

BACKENDS = ("auto", "xla", "cuda", "ragged")


def _mesh_is_nvidia_gpu(mesh) -> bool:
  # NVIDIA devices report kinds such as "NVIDIA H100 80GB HBM3".
  return all(d.platform == "gpu" and "nvidia" in d.device_kind.lower()
             for d in mesh.devices.flat)


class Buffer:
  """Expert-parallel communication over one mesh axis.

  Args:
    mesh: a ``jax.sharding.Mesh`` (``jax.make_mesh`` or ``Mesh``) containing
      ``axis_name``.
    axis_name: the expert-parallel axis; its size is the number of ranks R. Or
      two axes ``(node, local)``: R = |node| * |local|, rank ``node * |local| +
      local``, the same contract, with rows crossing the node axis once per
      destination node (``backends/hierarchical.py``: the node hop on XLA's
      collectives, the local hop on the local axis's own backend).
    backend: ``"xla"`` (portable ``lax.all_to_all``), ``"cuda"`` (our kernels
      over NVLink peer memory), ``"auto"`` (``"cuda"`` when the mesh devices
      are NVIDIA GPUs and the extension was built with CUDA, else ``"xla"``),
      or ``"ragged"`` (a ``lax.ragged_all_to_all`` baseline for benchmarks;
      not on CPU, where XLA lacks that collective).
    num_nvl_bytes: size of the CUDA communication buffer per GPU; default
      ``256 MiB``. ``Buffer.get_buffer_size_hint`` tells what a shape needs. A
      call that needs more raises a ValueError at trace time.
    num_sms: thread blocks (one per SM) the CUDA kernels that talk to peers
      use, at most 64; default ``jax_ep.backends.cuda.DEFAULT_NUM_SMS``. The
      bound leaves the other SMs to XLA's own kernels.
    timeout_s: how long a CUDA kernel waits for a peer before it reports
      ``jax_ep: <op> timed out on rank <r> waiting for rank <s>`` and aborts;
      must be positive.

  Creating a CUDA buffer is collective in a multi-process job: every process
  must create its Buffers in the same order.
  """

  def __init__(self, mesh, axis_name: str = "ep", backend: str = "auto", *,
               num_nvl_bytes: Optional[int] = None, num_sms: Optional[int] = None,
               timeout_s: float = 100.0):
    if not isinstance(mesh, jax.sharding.Mesh):
      raise TypeError(f"jax_ep.Buffer: mesh must be a jax.sharding.Mesh, got "
                      f"{type(mesh).__name__}.")
    if isinstance(axis_name, (tuple, list)):
      if backend not in BACKENDS:
        raise ValueError(f"jax_ep.Buffer: unknown backend {backend!r}; choose one of "
                         f"{BACKENDS}.")
      from jax_ep.backends import hierarchical
      from jax_ep import _ext
      self.mesh = mesh
      self.axis_name, self.num_ranks, self._backend, self.backend = hierarchical.make(
          mesh, axis_name, backend, _ext.has_cuda() and _mesh_is_nvidia_gpu(mesh),
          num_nvl_bytes=num_nvl_bytes, num_sms=num_sms, timeout_s=timeout_s)
      return
    if axis_name not in mesh.axis_names:
      raise ValueError(f"jax_ep.Buffer: axis_name {axis_name!r} is not an axis of "
                       f"the mesh (axes: {mesh.axis_names}).")
    if not (isinstance(timeout_s, (int, float)) and timeout_s > 0):
      raise ValueError(f"jax_ep.Buffer: timeout_s must be a positive number of seconds, "
                       f"got {timeout_s!r}.")
    if backend not in BACKENDS:
      raise ValueError(f"jax_ep.Buffer: unknown backend {backend!r}; choose one of "
                       f"{BACKENDS}.")
    self.mesh = mesh
    self.axis_name = axis_name
    self.num_ranks = int(mesh.shape[axis_name])
    if backend == "auto":
      from jax_ep import _ext
      backend = "cuda" if (_ext.has_cuda() and _mesh_is_nvidia_gpu(mesh)) else "xla"
    if backend == "xla":
      from jax_ep.backends.xla import XlaBackend
      self._backend = XlaBackend(axis_name, self.num_ranks)
    elif backend == "ragged":
      from jax_ep.backends.ragged import RaggedBackend
      self._backend = RaggedBackend(axis_name, self.num_ranks)
    else:
      from jax_ep.backends.cuda import CudaBackend
      self._backend = CudaBackend(mesh, axis_name, num_nvl_bytes=num_nvl_bytes,
                                  num_sms=num_sms, timeout_s=timeout_s)
    self.backend = backend

  # -- lifetime -------------------------------------------------------------
  def destroy(self) -> None:
    """Release the communication memory now (collective for the cuda backend)."""
    destroy = getattr(self._backend, "destroy", None)
    if destroy is not None:
      destroy()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.destroy()

  def __repr__(self):
    return (f"jax_ep.Buffer(axis_name={self.axis_name!r}, num_ranks={self.num_ranks}, "
            f"backend={self.backend!r})")

  @staticmethod
  def get_buffer_size_hint(num_tokens: int, hidden: int, num_ranks: int,
                           num_topk: int, dtype=jnp.bfloat16,
                           num_worst_tokens: Optional[int] = None, num_nodes: int = 1,
                           num_worst_forward_tokens: Optional[int] = None) -> int:
    """Bytes of CUDA communication buffer one GPU needs for this shape.

    ``num_nodes`` > 1: a Buffer over two axes (node, local) of ``num_ranks``
    ranks in all, whose cuda local hop dispatches the forwarders'
    ``num_nodes * F`` slot rows over the local axis (F =
    ``num_worst_forward_tokens``, default ``num_tokens``).
    """
    from jax_ep.backends.cuda import buffer_bytes_needed
    itemsize = jnp.dtype(dtype).itemsize
    if num_nodes > 1:
      F = num_worst_forward_tokens or max(num_tokens, 1)
      rows = num_nodes * F
      return buffer_bytes_needed(num_ranks // num_nodes, rows, num_ranks * F, hidden,
                                 num_topk, itemsize)
    capacity = num_worst_tokens or num_tokens * num_ranks
    return buffer_bytes_needed(num_ranks, num_tokens, capacity, hidden, num_topk, itemsize)

  @staticmethod
  def get_low_latency_buffer_size_hint(num_max_dispatch_tokens_per_rank: int, hidden: int,
                                       num_ranks: int, num_topk: int) -> int:
    """Bytes of CUDA communication buffer one GPU needs for the low-latency ops
    at this shape (bf16, f32 or FP8 dispatch, and combine)."""
    from jax_ep.backends.cuda import low_latency_bytes_needed
    return low_latency_bytes_needed(num_ranks, num_max_dispatch_tokens_per_rank, num_topk,
                                    4 * hidden)

  # -- ops (call inside shard_map over axis_name) -----------------------------
  def get_dispatch_layout(self, topk_idx: jax.Array,
                          num_experts: int) -> DispatchLayout:
    """Where each local token goes.

    Args:
      topk_idx: ``[N, K]`` int32/int64 expert ids; ``-1`` (and any id outside
        ``[0, num_experts)``) means no expert.
      num_experts: total experts E, divisible by R.

    Returns:
      ``DispatchLayout(num_tokens_per_rank [R] int32, num_tokens_per_expert [E]
      int32, is_token_in_rank [N, R] bool)``. Expert counts count ``(token, k)``
      slots.
    """
    op = "get_dispatch_layout"
    _ops.check_axis(self.axis_name, self.num_ranks, op)
    num_experts = _ops.check_num_experts(num_experts, self.num_ranks, op)
    shape = _ops._shape_of(topk_idx, "topk_idx", op)
    if len(shape) != 2:
      raise ValueError(f"jax_ep.{op}: topk_idx must have shape [num_tokens, "
                       f"num_topk], got {shape}.")
    topk_idx = _ops.check_topk_idx(topk_idx, shape[0], num_experts, op)
    return self._backend.layout(topk_idx, num_experts)

  def dispatch(self, x: jax.Array, topk_idx: Optional[jax.Array] = None,
               topk_weights: Optional[jax.Array] = None,
               num_experts: Optional[int] = None,
               layout: Optional[DispatchLayout] = None,
               num_worst_tokens: Optional[int] = None,
               handle: Optional[DispatchHandle] = None, *,
               num_worst_forward_tokens: Optional[int] = None):
    """Send each token to every rank that holds one of its experts.

    Args:
      x: ``[N, H]`` bfloat16 or float32 tokens of this rank, or the FP8 pair
        ``(x_fp8 [N, H] float8_e4m3fn, scales [N, H // 128] float32)`` (see
        ``jax_ep.quantize_fp8``; every backend), which comes back as
        ``recv_x = (recv_fp8 [M, H], recv_scales [M, H // 128])``, rows moved
        bit for bit, padding rows zero bytes with zero scales. FP8 dispatch is
        not differentiable.
      topk_idx: ``[N, K]`` int32/int64 global expert ids, ``-1`` = none. Ids
        outside ``[0, num_experts)`` are ignored like ``-1``.
      topk_weights: ``[N, K]`` float32 or None.
      num_experts: E, static, divisible by R.
      layout: the result of ``get_dispatch_layout`` for ``topk_idx``, or None
        (the backend derives the routing itself). The cuda backend checks a
        given layout against ``topk_idx`` and stops the job on a mismatch.
      num_worst_tokens: static receive capacity M; default ``N * R`` (never
        overflows). Tokens beyond M rows are dropped: see
        ``handle.num_dropped_tokens`` and ``jax_ep.check_no_dropped_tokens``.
      num_worst_forward_tokens: two-axis Buffers only: static rows per (source
        rank, destination node) slot of the node hop; default ``N`` (never
        overflows). A token past it reaches no rank of that node (counted in
        ``handle.num_forward_dropped_tokens`` and ``num_dropped_tokens``).
      handle: a previous dispatch's handle for a cached dispatch (same routing,
        no layout work); then give only ``x`` (and optionally
        ``topk_weights``, sent unmasked).

    Returns:
      ``(recv_x [M, H], recv_topk_idx [M, K] int32, recv_topk_weights [M, K]
      float32 or None, num_recv_tokens_per_expert [E/R] int32, handle)``.
      Rows are ordered by (source rank, source token); rows past the received
      count are zero, with ``recv_topk_idx`` -1. ``recv_topk_idx`` holds local
      expert ids (``e - rank * E/R``) for experts on this rank, else -1, and
      ``recv_topk_weights`` the matching weights, else 0. A cached dispatch
      returns ``(recv_x, None, recv_weights or None, None, handle)``.
    """
    op = "dispatch"
    R = self.num_ranks
    _ops.check_axis(self.axis_name, R, op)
    fp8_rows = isinstance(x, tuple) and len(x) == 2  # (x_fp8, scales)
    if fp8_rows:
      from jax_ep import _ll_ops, fp8
      x = fp8.check_fp8_pair(x, op)
      N = x[0].shape[0]
    else:
      x = _ops.check_x(x, op)
      N = x.shape[0]
    if handle is not None:
      if any(a is not None for a in (topk_idx, num_experts, layout, num_worst_tokens,
                                     num_worst_forward_tokens)):
        raise ValueError("jax_ep.dispatch: with handle= (cached dispatch) pass only "
                         "x and optionally topk_weights; the routing and capacity "
                         "come from the handle.")
      handle = self._check_handle(handle, op, num_tokens=N)
      weights = None
      if topk_weights is not None:
        if getattr(topk_weights, "ndim", None) != 2:
          raise ValueError(f"jax_ep.dispatch: topk_weights must be [{N}, num_topk], "
                           f"got {getattr(topk_weights, 'shape', None)}.")
        weights = _ops.check_weights(topk_weights, (N, topk_weights.shape[1]), op,
                                     "topk_weights")
      cached = _ll_ops.cached_dispatch_fp8 if fp8_rows else _ops.cached_dispatch
      recv_x, recv_w = cached(self._backend, x, handle, weights)
      return recv_x, None, recv_w, None, handle

    if topk_idx is None or num_experts is None:
      raise ValueError("jax_ep.dispatch: topk_idx and num_experts are required "
                       "(or pass handle= for a cached dispatch).")
    num_experts = _ops.check_num_experts(num_experts, R, op)
    topk_idx = _ops.check_topk_idx(topk_idx, N, num_experts, op)
    topk_weights = _ops.check_weights(topk_weights, topk_idx.shape, op, "topk_weights")
    capacity = _ops.check_num_worst_tokens(num_worst_tokens, N, R, op)
    if layout is not None:
      layout = _ops.check_layout(layout, N, R, num_experts, op)
    options = {}
    if num_worst_forward_tokens is not None:
      if not isinstance(self.axis_name, tuple):
        raise ValueError("jax_ep.dispatch: num_worst_forward_tokens is for Buffers over "
                         "two axes (node, local); this Buffer's axis_name is "
                         f"{self.axis_name!r}.")
      options["num_worst_forward_tokens"] = _ops.check_static_int(
          num_worst_forward_tokens, "num_worst_forward_tokens", op, 1)
    run = _ll_ops.dispatch_fp8 if fp8_rows else _ops.dispatch
    return run(self._backend, x, topk_idx, topk_weights, layout, num_experts, capacity,
               **options)

  def _check_handle(self, handle, op, **expected):
    handle = _ops.check_handle(handle, self.num_ranks, op, **expected)
    check = getattr(self._backend, "check_handle", None)  # a backend's own leaves
    return handle if check is None else check(handle, op)

  def combine(self, y: jax.Array, handle: DispatchHandle,
              topk_weights: Optional[jax.Array] = None):
    """Sum the expert outputs of each token back on its home rank.

    Args:
      y: ``[M, H]`` bfloat16 or float32, row r for dispatch's receive row r.
        Padding rows are ignored.
      handle: the handle from the matching dispatch.
      topk_weights: ``[M, K]`` float32 or None, reduced the same way (pass
        dispatch's ``recv_topk_weights`` to get the original weights back).

    Returns:
      ``(combined_x [N, H] in y's dtype, combined_topk_weights [N, K] float32 or
      None)``: ``combined_x[i]`` is the float32 sum of the rows received for
      token i on every rank; tokens sent nowhere (or dropped everywhere) get
      zeros. The sum is unweighted, as in DeepEP: weight ``y`` first.
    """
    op = "combine"
    R = self.num_ranks
    _ops.check_axis(self.axis_name, R, op)
    y = _ops.check_x(y, op, name="y")
    handle = self._check_handle(handle, op, capacity=y.shape[0])
    weights = None
    if topk_weights is not None:
      if getattr(topk_weights, "ndim", None) != 2:
        raise ValueError(f"jax_ep.combine: topk_weights must be [M, num_topk], got "
                         f"{getattr(topk_weights, 'shape', None)}.")
      weights = _ops.check_weights(topk_weights, (y.shape[0], topk_weights.shape[1]),
                                   op, "topk_weights")
    return _ops.combine(self._backend, y, handle, weights)

  # -- FP8 and the low-latency mode (issue 10) -------------------------------
  def _unsupported(self, op: str, what: str):
    return NotImplementedError(
        f"jax_ep.{op}: {what} is not implemented on the {self.backend!r} backend yet "
        f"(its kernels have not been written); make the Buffer with backend='xla' "
        f"for now.")

  def _low_latency_impl(self, op: str):
    impl = self.__dict__.get("_ll_impl")
    if impl is None:
      if self.backend == "xla":  # one axis or two: all_to_all takes both
        from jax_ep.backends.xla_ll import XlaLowLatency
        impl = XlaLowLatency(self.axis_name, self.num_ranks)
      elif hasattr(self._backend, "low_latency"):  # cuda over one axis
        impl = self._backend.low_latency()
      else:
        two = " over two mesh axes" if isinstance(self.axis_name, tuple) else ""
        raise self._unsupported(op, "the low-latency mode" + two)
      self._ll_impl = impl
    return impl

  def low_latency_dispatch(self, x: jax.Array, topk_idx: jax.Array,
                           num_max_dispatch_tokens_per_rank: int, num_experts: int,
                           use_fp8: bool = False, return_recv_hook: bool = False):
    """DeepEP's low-latency dispatch (decoding): fixed shapes, grouped by expert.

    Args:
      x: ``[N, H]`` bfloat16 (float32 also accepted) with
        ``N <= num_max_dispatch_tokens_per_rank``.
      topk_idx: ``[N, K]`` int32/int64 global expert ids; -1 and ids outside
        ``[0, num_experts)`` mean no expert.
      num_max_dispatch_tokens_per_rank: ``T``, static, the same on every rank.
      num_experts: E, static, divisible by R.
      use_fp8: quantize each row on the sending side (``jax_ep.quantize_fp8``,
        ``H % 128 == 0``); ``recv_x`` is then ``(x_fp8, scales)``.
      return_recv_hook: return ``(state, recv_fn)`` instead: the exchange is
        issued here (``state`` holds what is in flight) and ``recv_fn(*after)``,
        called later in the same traced function, returns the outputs. XLA
        orders ops by data alone: pass the results of the work placed between
        the two as ``after`` (arrays the receive waits for, never read).

    Returns:
      ``(recv_x [E_local, R*T, H], recv_count [E_local] int32, handle)``: rows
      ``0 .. recv_count[e]-1`` of local expert ``e`` hold one copy per valid
      ``(token, k)`` routed to it (no dedup per rank), ordered by (source rank,
      source token, k); later rows are unspecified. With ``use_fp8``, ``recv_x``
      is ``(x_fp8 [E_local, R*T, H] float8_e4m3fn, scales [E_local, R*T, H/128]
      float32)``. The xla and cuda backends have this op.
    """
    from jax_ep import _ll_ops, fp8
    op = "low_latency_dispatch"
    R = self.num_ranks
    _ops.check_axis(self.axis_name, R, op)
    x = _ops.check_x(x, op)
    N, H = x.shape
    T = _ll_ops.check_tokens(N, num_max_dispatch_tokens_per_rank, op)
    num_experts = _ops.check_num_experts(num_experts, R, op)
    topk_idx = _ops.check_topk_idx(topk_idx, N, num_experts, op)
    if use_fp8:
      fp8.check_hidden(H, op)
    impl = self._low_latency_impl(op)
    if not return_recv_hook:
      if use_fp8:
        return _ll_ops.low_latency_dispatch_fp8(impl, x, topk_idx, T, num_experts)
      return _ll_ops.low_latency_dispatch(impl, x, topk_idx, T, num_experts)
    # Split form: the same computation cut after the collective (autodiff is
    # JAX's own through the xla code).
    rows = _ll_ops.fp8_rows(impl, x) if use_fp8 else x
    state = impl.dispatch_send(rows, topk_idx, T, num_experts, split=H if use_fp8 else 0)

    def recv_fn(*after):
      return impl.dispatch_recv(_ordered_after(state, after, op), num_experts,
                                split=H if use_fp8 else 0)
    return state, recv_fn

  def low_latency_combine(self, y: jax.Array, topk_idx: jax.Array,
                          topk_weights: jax.Array, handle, *,
                          return_recv_hook: bool = False):
    """DeepEP's low-latency combine: ``out[i] = sum_k topk_weights[i, k] *
    y_row(i, k)`` over the valid ``k``, accumulated in float32.

    Args:
      y: ``[E_local, R*T, H]`` bfloat16 (or float32), laid out as
        ``low_latency_dispatch``'s ``recv_x``. Rows past ``recv_count`` are
        never read (NaN or Inf there cannot reach the output).
      topk_idx: ``[N, K]``, the ids given to the dispatch.
      topk_weights: ``[N, K]`` float; weights at invalid ids are ignored.
      handle: the dispatch's ``LowLatencyHandle``.
      return_recv_hook: return ``(state, recv_fn)``; ``recv_fn(*after)`` gives
        ``out`` (``after`` as in ``low_latency_dispatch``).

    Returns:
      ``out [N, H]`` in ``y``'s dtype; tokens with no valid expert get zeros.
    """
    from jax_ep import _ll_ops
    op = "low_latency_combine"
    R = self.num_ranks
    _ops.check_axis(self.axis_name, R, op)
    handle = _ll_ops.check_ll_handle(handle, R, op)
    El, rows, K = handle.num_local_experts, handle.num_rows, handle.num_topk
    shape = _ops._shape_of(y, "y", op)
    if len(shape) != 3 or shape[:2] != (El, rows):
      raise ValueError(f"jax_ep.{op}: y must have shape [{El}, {rows}, hidden] "
                       f"(recv_x's layout for this handle), got {shape}.")
    if jnp.dtype(y.dtype) not in _ops._DATA_DTYPES:
      raise TypeError(f"jax_ep.{op}: y must be bfloat16 or float32, got {y.dtype}.")
    tshape = _ops._shape_of(topk_idx, "topk_idx", op)
    if len(tshape) != 2 or tshape[1] != K or tshape[0] > rows // R:
      raise ValueError(f"jax_ep.{op}: topk_idx must have shape [num_tokens, {K}] with "
                       f"num_tokens <= {rows // R} as given to the dispatch, got {tshape}.")
    num_experts = El * R
    topk_idx = _ops.check_topk_idx(topk_idx, tshape[0], num_experts, op)
    weights = _ops.check_weights(topk_weights, tshape, op, "topk_weights")
    if weights is None:
      raise ValueError(f"jax_ep.{op}: topk_weights is required.")
    # Weights at invalid ids are ignored (a select: NaN there cannot leak).
    weights = jnp.where(topk_idx >= 0, weights, 0.0)
    impl = self._low_latency_impl(op)
    if not return_recv_hook:
      return _ll_ops.low_latency_combine(impl, y, topk_idx, weights, handle)
    state = impl.combine_send(y, handle, weights)
    return state, lambda *after: impl.combine_recv(_ordered_after(state, after, op),
                                                   tshape[0], y.dtype)


def _ordered_after(state, after, op):
  """``state`` as a split receive's operand, available only once the arrays
  in ``after`` are (a barrier: no copy, no kernel), so XLA cannot move the
  receive before the work the caller placed between send and receive."""
  if not after:
    return state
  leaves = jax.tree_util.tree_leaves(after)
  bad = [type(a).__name__ for a in leaves if not isinstance(a, jax.Array)]
  if bad or not leaves:
    raise TypeError(f"jax_ep.{op}: recv_fn(*after) takes the arrays the receive must "
                    f"wait for (results of the work placed before it); got "
                    f"{', '.join(bad) if bad else 'no arrays'}.")
  return jax.lax.optimization_barrier((state, after))[0]


def check_no_dropped_tokens(handle: DispatchHandle) -> None:
  """Fail a ``checkify``-ed function when a dispatch dropped tokens.

  Use inside a function wrapped with ``jax.experimental.checkify.checkify``;
  the error names the number of tokens routed and the capacity. Raise it with
  ``jax.device_get(err).throw()``: on an Explicit mesh JAX's ``err.throw()``
  fails on an error raised inside ``shard_map`` (a JAX limitation). Without
  checkify, read ``handle.num_dropped_tokens`` (e.g. its ``psum`` over the
  axis), which works on every mesh.
  """
  from jax.experimental import checkify
  from jax_ep.backends import hierarchical
  if isinstance(handle, hierarchical.HierarchicalDispatchHandle):
    return hierarchical.check_no_dropped(handle)  # drops at either hop
  routed = handle.num_recv_tokens.reshape(())
  checkify.check(routed <= handle.capacity,
                 "jax_ep: {routed} tokens were routed to this rank but "
                 "num_worst_tokens is {cap}; the excess was dropped.",
                 routed=routed,
                 cap=jnp.int32(handle.capacity))
