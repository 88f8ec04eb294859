"""The CUDA backend: our kernels over NVLink peer memory, as XLA FFI custom calls.

``CudaBackend`` owns one communication buffer per local GPU of the mesh and
maps every peer's buffer into it (CUDA IPC across processes, peer access inside
a process). The ops are thin ``jax.ffi.ffi_call``s; ``ffi/handlers.cc`` checks
and launches, ``ffi/intranode.cu`` moves the data. The buffer layout and the
semantics are in ``docs/design.md``.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import sys
import threading
import weakref

import numpy as np

import jax
import jax.numpy as jnp
from jax import lax

from jax_ep import _ext, _ops, fp8
from jax_ep.backends.xla import compute_layout
from jax_ep.backends.xla_ll import XlaLowLatency
from jax_ep.handles import DispatchHandle, DispatchLayout, LowLatencyHandle

DEFAULT_NUM_NVL_BYTES = 256 << 20
DEFAULT_NUM_SMS = 24
# Up to this many (token, k) slots per rank the layout is XLA's fusions (the
# xla backend's jnp code, which XLA can also fuse into the router), above it
# our kernel. Measured on two H100s (tools/layout_sweep.py, benchmarks/
# RESULTS.md): XLA 4.3 / 6.1 us against the kernel's 4.3 / 7.8 us at 128 /
# 1024 tokens of top-8, the kernel 6.7 / 6.9 us against XLA's 8.6 / 13.3 at
# 2048 / 4096.
LAYOUT_XLA_MAX_SLOTS = 8192

_registered = False
_register_lock = threading.Lock()
# Buffer ids must agree across processes: every process creates its Buffers in
# the same order (creation is collective), so a counter is enough.
_buffer_ids = itertools.count(1)


def _cuda_module():
  c = _ext.load()
  if c is None or not c.build_info().get("cuda"):
    raise RuntimeError("jax_ep: backend='cuda' needs the extension built with CUDA "
                       "(nvcc present at `pip install` time); this install has "
                       f"build_info()={_ext.build_info()}.")
  return c


def buffer_bytes_needed(num_ranks: int, num_tokens: int, num_worst_tokens: int,
                        hidden: int, num_topk: int, elt_bytes: int) -> int:
  """Bytes of communication buffer per GPU for one shape (``ffi/buffer_layout.h``)."""
  return int(_ext.load_required().buffer_bytes_needed(
      num_ranks, num_tokens, num_worst_tokens, hidden, num_topk, elt_bytes))


def low_latency_bytes_needed(num_ranks: int, num_max_tokens: int, num_topk: int,
                             data_row_bytes: int) -> int:
  """Bytes of communication buffer per GPU for the low-latency ops, with
  ``data_row_bytes`` the larger of a dispatched row's bytes and ``4 * hidden``
  (combine's float32 partial sums); ``ffi/buffer_layout.h``."""
  return int(_ext.load_required().low_latency_bytes_needed(
      num_ranks, num_max_tokens, num_topk, data_row_bytes))


def _register_targets(c) -> None:
  global _registered
  with _register_lock:
    if _registered:
      return
    for name, capsule in c.ffi_targets().items():
      jax.ffi.register_ffi_target(name, capsule, platform="CUDA")
    _install_timeout_reporter(c)
    _registered = True


def fault_message():
  """What a jax_ep kernel of this process recorded before it aborted, or None.

  For example ``"jax_ep: dispatch timed out on rank 0 waiting for rank 1"`` or
  ``"jax_ep: dispatch on rank 0 met combine from rank 1"``. A kernel that
  cannot go on records why in host memory and aborts the CUDA context; XLA
  then only reports a generic launch failure. This says what happened.
  """
  c = _ext.load()
  if c is None or not _registered:
    return None
  return c.fault_message()


def _install_timeout_reporter(c) -> None:
  """Name the op and ranks of a timeout when the process dies of it."""
  reported = []

  def report():
    msg = fault_message()
    if msg and not reported:
      reported.append(msg)
      sys.stderr.write(msg + "\n")
      sys.stderr.flush()

  previous_hook = sys.excepthook

  def excepthook(*exc_info):
    previous_hook(*exc_info)
    report()

  sys.excepthook = excepthook
  atexit.register(report)


def _or_empty(weights, num_topk):
  """The weights operand: the weights, or [0, K] when there are none (a
  constant: no kernel, and the handlers then send no weights)."""
  return weights if weights is not None else jnp.zeros((0, num_topk), jnp.float32)


def _kv_client():
  from jax._src import distributed
  return distributed.global_state.client


def _pad16(nbytes: int) -> int:
  """A row of ``nbytes`` as our kernels move it: rounded up to 16 bytes."""
  return -(-nbytes // 16) * 16


def byte_rows_as_bf16(rows):
  """``[N, W]`` uint8 rows as ``[N, W'/2]`` bfloat16 rows (W' = W rounded up to
  16 bytes, zero-padded), and the function that turns received rows back.

  FP8 dispatch packs each row's FP8 bytes and scales into one byte row. Our
  kernels only copy rows (no arithmetic on dispatched data), so they move any
  16-byte-aligned row of bfloat16 bit for bit, NaN patterns included; padding
  rows come back as zero bytes. (The portable backends keep uint8 rows: XLA may
  convert bfloat16 through float32 on the way, which need not keep NaN bits.)
  """
  n, w = rows.shape
  wp = _pad16(w)
  if wp != w:
    rows = jnp.pad(rows, ((0, 0), (0, wp - w)))
  view = lax.bitcast_convert_type(rows.reshape(n, wp // 2, 2), jnp.bfloat16)
  return view, lambda received: bf16_rows_as_bytes(received, w)


def bf16_rows_as_bytes(received, width: int):
  """The inverse of ``byte_rows_as_bf16``: ``[..., W'/2]`` bfloat16 rows back to
  their first ``width`` bytes, ``[..., width]`` uint8."""
  back = lax.bitcast_convert_type(received, jnp.uint8)  # [..., W'/2, 2]
  return back.reshape(received.shape[:-1] + (-1,))[..., :width]


class CudaBackend:
  name = "cuda"
  # FP8 rows in normal mode move as values and scales apart (_ll_ops._rows_fp8):
  # our kernels copy byte rows as they are, so nothing packs or unpacks them.
  fp8_apart = True

  def __init__(self, mesh, axis_name: str, *, num_nvl_bytes=None, num_sms=None,
               timeout_s: float = 100.0):
    c = _cuda_module()
    self.axis_name = axis_name
    self.num_ranks = int(mesh.shape[axis_name])
    if not 1 <= self.num_ranks <= c.MAX_RANKS:
      raise ValueError(f"jax_ep.Buffer: the cuda backend supports 1 to {c.MAX_RANKS} "
                       f"ranks on axis {axis_name!r}, got {self.num_ranks}.")
    if any(d.platform != "gpu" for d in mesh.devices.flat):
      raise ValueError("jax_ep.Buffer: backend='cuda' needs a mesh of NVIDIA GPUs.")
    num_sms = DEFAULT_NUM_SMS if num_sms is None else num_sms
    if not 1 <= num_sms <= c.MAX_SMS:
      raise ValueError(f"jax_ep.Buffer: num_sms must be in [1, {c.MAX_SMS}], got {num_sms}.")
    self.num_bytes = int(num_nvl_bytes or DEFAULT_NUM_NVL_BYTES)
    self.num_sms = int(num_sms)
    self.timeout_ns = max(1, int(timeout_s * 1e9))
    self.buffer_id = next(_buffer_ids)
    _register_targets(c)
    self._c = c
    self._local = {}  # device id -> DeviceBuffer
    self._open(mesh)
    self._finalizer = weakref.finalize(self, CudaBackend._release, c, self.buffer_id,
                                       self._local, jax.process_count() > 1)

  # -- buffer lifetime ----------------------------------------------------------
  def _open(self, mesh) -> None:
    c = self._c
    axis = mesh.axis_names.index(self.axis_name)
    devices = np.moveaxis(mesh.devices, axis, -1).reshape(-1, self.num_ranks)
    me = jax.process_index()
    multiprocess = jax.process_count() > 1
    client = _kv_client() if multiprocess else None
    key = f"jax_ep/{self.buffer_id}"
    # What this process sees of the Buffer: every process must agree, or a
    # peer with a smaller buffer would be written past its end.
    mine = {"num_nvl_bytes": self.num_bytes,
            "groups": [[int(d.id) for d in group] for group in devices]}
    gpu_of = {}  # device id -> PCI bus id (which physical GPU)
    for group in devices:
      for d in group:
        if d.process_index == me:
          buf = c.DeviceBuffer(d.local_hardware_id, self.num_bytes)
          self._local[d.id] = buf
          gpu_of[d.id] = c.pci_bus_id(d.local_hardware_id)
          if multiprocess:
            client.key_value_set_bytes(f"{key}/{d.id}", buf.ipc_handle())
            client.key_value_set(f"{key}/gpu/{d.id}", gpu_of[d.id])
    if multiprocess:
      import json
      client.key_value_set(f"{key}/config/{me}", json.dumps(mine))
      for p in range(jax.process_count()):
        theirs = json.loads(client.blocking_key_value_get(f"{key}/config/{p}", 300_000))
        for field in ("num_nvl_bytes", "groups"):
          if theirs[field] != mine[field]:
            raise ValueError(
                f"jax_ep.Buffer: processes disagree on {field}: process {me} has "
                f"{mine[field]}, process {p} has {theirs[field]}. Every process must "
                f"create its Buffers in the same order with the same arguments.")
      for group in devices:
        for d in group:
          if d.id not in gpu_of:
            gpu_of[d.id] = client.blocking_key_value_get(f"{key}/gpu/{d.id}", 300_000)
    for group in devices:
      for rank, d in enumerate(group):
        if d.process_index != me:
          continue
        peers = []
        for p in group:
          if p.process_index == me:
            peers.append(self._local[p.id])
          else:
            peers.append(client.blocking_key_value_get_bytes(f"{key}/{p.id}", 300_000))
        sharing = sum(gpu_of[p.id] == gpu_of[d.id] for p in group)
        c.register_group(self.buffer_id, self._local[d.id], rank, self.num_ranks, sharing,
                         peers)
    if multiprocess:
      client.wait_at_barrier(f"{key}/open", 300_000)

  @staticmethod
  def _release(c, buffer_id, local, multiprocess):
    if not local:
      return
    try:  # Work PJRT has accepted but not yet run may still use the buffers.
      jax.effects_barrier()
    except Exception:  # The job is tearing down; go on.
      pass
    for buf in local.values():
      buf.synchronize()  # Our own kernels are done with every peer's memory.
    if multiprocess:
      try:  # Peers must stop using our memory before we free it.
        _kv_client().wait_at_barrier(f"jax_ep/{buffer_id}/close", 300_000)
      except Exception:  # The job is tearing down; free anyway.
        pass
    for buf in local.values():
      # After this the handlers refuse the buffer_id and kernels replayed from
      # captured graphs trap on the liveness word: nothing touches freed memory.
      c.unregister_group(buffer_id, buf.device_ordinal)
      buf.free()
    local.clear()

  def destroy(self) -> None:
    self._finalizer()

  def low_latency(self) -> "CudaLowLatency":
    """The low-latency ops on this Buffer's communication buffer."""
    return CudaLowLatency(self)

  # -- trace-time checks ----------------------------------------------------------
  def _check_shape(self, op, num_tokens, capacity, hidden, num_topk, dtype):
    itemsize = jnp.dtype(dtype).itemsize
    if hidden * itemsize % 16:
      raise ValueError(f"jax_ep.{op}: the cuda backend needs rows of a multiple of "
                       f"16 bytes; hidden={hidden} x {itemsize} bytes is not.")
    if num_topk > self._c.MAX_TOPK:
      raise ValueError(f"jax_ep.{op}: the cuda backend supports num_topk <= "
                       f"{self._c.MAX_TOPK}, got {num_topk}.")
    need = buffer_bytes_needed(self.num_ranks, num_tokens, capacity, hidden,
                               num_topk, itemsize)
    if need > self.num_bytes:
      raise ValueError(
          f"jax_ep.{op}: this shape needs {need} bytes of communication buffer per "
          f"GPU but the Buffer has num_nvl_bytes={self.num_bytes}; make the Buffer "
          f"with num_nvl_bytes=Buffer.get_buffer_size_hint(...) or more.")

  def _attrs(self, *, num_experts=0, has_weights, has_layout=False):
    """The intranode ops' attribute struct (``IntranodeAttrs`` in ffi/handlers.cc)."""
    return dict(buffer_id=np.int64(self.buffer_id), num_experts=np.int64(num_experts),
                num_sms=np.int64(self.num_sms), timeout_ns=np.int64(self.timeout_ns),
                has_weights=np.bool_(has_weights), has_layout=np.bool_(has_layout))

  def _rank(self):
    return lax.axis_index(self.axis_name).astype(jnp.int32)

  def _call(self, target, result_shapes, *operands, **attrs):
    """``ffi_call`` whose results vary over the axis like its operands do.

    Inside shard_map, JAX tracks which mesh axes a value varies over; an
    ffi_call's results carry none, yet they differ per rank (and autodiff
    checks that cotangents match). Mark them varying over the operands' axes
    plus ours.
    """
    outs = jax.ffi.ffi_call(target, result_shapes)(*operands, **attrs)
    return tuple(_ops.mark_varying(a, operands, (self.axis_name,)) for a in outs)

  # -- ops ------------------------------------------------------------------------
  def layout(self, topk_idx, num_experts):
    if topk_idx.size <= LAYOUT_XLA_MAX_SLOTS:
      return compute_layout(topk_idx, num_experts, self.num_ranks)
    return self.layout_kernel(topk_idx, num_experts)

  def layout_kernel(self, topk_idx, num_experts):
    """The layout kernel at any size (``layout`` uses it above LAYOUT_XLA_MAX_SLOTS)."""
    N, R = topk_idx.shape[0], self.num_ranks
    return DispatchLayout(*self._call("jax_ep_layout", (
        jax.ShapeDtypeStruct((R,), jnp.int32),
        jax.ShapeDtypeStruct((num_experts,), jnp.int32),
        jax.ShapeDtypeStruct((N, R), jnp.bool_)), topk_idx,
        buffer_id=np.int64(self.buffer_id), num_experts=np.int64(num_experts),
        num_ranks=np.int64(R)))

  def dispatch(self, x, topk_idx, topk_weights, layout, num_experts, num_worst_tokens):
    if x.dtype == jnp.uint8:  # FP8 rows packed as bytes (jax_ep.fp8.pack_rows)
      view, restore = byte_rows_as_bf16(x)
      recv, *rest = self.dispatch(view, topk_idx, topk_weights, layout, num_experts,
                                  num_worst_tokens)
      return (restore(recv), *rest)
    (N, H), K, R, M = x.shape, topk_idx.shape[1], self.num_ranks, num_worst_tokens
    self._check_shape("dispatch", N, M, H, K, x.dtype)
    weights = _or_empty(topk_weights, K)
    if layout is not None:
      in_rank, per_rank = layout.is_token_in_rank, layout.num_tokens_per_rank
    else:
      in_rank, per_rank = jnp.zeros((0, R), jnp.bool_), jnp.zeros((0,), jnp.int32)
    i32 = jnp.int32
    shapes = (
        jax.ShapeDtypeStruct((M, H), x.dtype),
        jax.ShapeDtypeStruct((M, K), i32),
        jax.ShapeDtypeStruct((M, K), jnp.float32),
        jax.ShapeDtypeStruct((num_experts // R,), i32),
        jax.ShapeDtypeStruct((N, R), i32),
        jax.ShapeDtypeStruct((M,), i32),
        jax.ShapeDtypeStruct((M,), i32),
        jax.ShapeDtypeStruct((), i32))
    (recv_x, recv_idx, recv_w, counts, send_pos, src_idx, src_rank,
     num_recv) = self._call("jax_ep_dispatch", shapes, x, topk_idx, weights, in_rank,
                            per_rank, self._rank(),
                            **self._attrs(num_experts=num_experts,
                                          has_weights=topk_weights is not None,
                                          has_layout=layout is not None))
    # The kernels keep a scalar; the handle's leaf is [1] (see handles.py).
    handle = DispatchHandle(send_pos, src_idx, src_rank, num_recv.reshape(1))
    return (recv_x, recv_idx, recv_w if topk_weights is not None else None, counts,
            handle)

  def cached_dispatch(self, x, weights, handle):
    if x.dtype == jnp.uint8:
      view, restore = byte_rows_as_bf16(x)
      recv, recv_w = self.cached_dispatch(view, weights, handle)
      return restore(recv), recv_w
    (N, H), M = x.shape, handle.capacity
    K = weights.shape[1] if weights is not None else 1
    self._check_shape("dispatch", N, M, H, K, x.dtype)
    w = _or_empty(weights, K)
    recv_x, recv_w = self._call(
        "jax_ep_cached_dispatch",
        (jax.ShapeDtypeStruct((M, H), x.dtype), jax.ShapeDtypeStruct((M, K), jnp.float32)),
        x, w, handle.send_pos, handle.recv_src_idx, handle.recv_src_rank,
        handle.num_recv_tokens.reshape(()), self._rank(), **self._attrs(has_weights=weights is not None))
    return recv_x, (recv_w if weights is not None else None)

  def combine(self, y, weights, handle):
    (M, H), N = y.shape, handle.num_tokens
    K = weights.shape[1] if weights is not None else 1
    self._check_shape("combine", N, M, H, K, y.dtype)
    w = _or_empty(weights, K)
    out, out_w = self._call(
        "jax_ep_combine",
        (jax.ShapeDtypeStruct((N, H), y.dtype), jax.ShapeDtypeStruct((N, K), jnp.float32)),
        y, w, handle.send_pos, handle.recv_src_idx, handle.recv_src_rank,
        handle.num_recv_tokens.reshape(()), self._rank(), **self._attrs(has_weights=weights is not None))
    return out, (out_w if weights is not None else None)


# --------------------------------------------------------------------------
# The low-latency mode (ffi/low_latency.cu).

@dataclasses.dataclass(frozen=True)
class CudaLowLatencyState:
  """A low-latency send in flight: the send's ticket (its sequence number,
  the receive's operand) and the static facts the receive needs."""

  ticket: jax.Array   # [] uint32
  num_max_tokens: int
  num_topk: int
  num_experts: int
  row_dtype: str      # rows as the kernels move them: bfloat16 or float32
  row_width: int      # their elements
  byte_width: int     # FP8 byte rows (moved as bfloat16): their bytes, else 0


jax.tree_util.register_dataclass(
    CudaLowLatencyState, data_fields=["ticket"],
    meta_fields=["num_max_tokens", "num_topk", "num_experts", "row_dtype", "row_width",
                 "byte_width"])


class CudaLowLatency:
  """``low_latency_dispatch`` / ``low_latency_combine`` on our kernels, with the
  interface of ``xla_ll.XlaLowLatency`` (``_ll_ops`` adds the checks and
  autodiff), on the Buffer's communication buffer.

  A plain op is one custom call (one kernel: the send phase, then the receive
  phase). The
  split form (``*_send`` / ``*_recv``) is two: XLA orders custom calls by data
  alone, so between a send and its receive it may schedule any work that does
  not depend on them, including another jax_ep op of the same Buffer; such an
  op stops with "the low_latency_... sent before it was not received yet"
  (one low-latency op in flight per Buffer: use two Buffers for two).
  """

  name = "cuda"
  # An FP8 dispatch takes the bfloat16 rows and quantizes them in its send
  # kernel (``_ll_ops.fp8_rows``): no XLA pass before it.
  quantizes_fp8 = True

  def __init__(self, backend: "CudaBackend"):
    self._b = backend
    self.axis_name = backend.axis_name
    self.num_ranks = backend.num_ranks

  def _attrs(self, *, num_experts, num_max_tokens, num_topk, has_weights=False,
             quantize_fp8=False):
    """``LowLatencyAttrs`` in ffi/low_latency_handlers.cc."""
    b = self._b
    if num_experts > b._c.MAX_LOW_LATENCY_EXPERTS:
      raise ValueError(f"jax_ep.low_latency ops: the cuda backend supports num_experts <= "
                       f"{b._c.MAX_LOW_LATENCY_EXPERTS} (the dispatch sends per-expert "
                       f"counts), got {num_experts}.")
    return dict(buffer_id=np.int64(b.buffer_id), num_ranks=np.int64(self.num_ranks),
                num_experts=np.int64(num_experts), num_max_tokens=np.int64(num_max_tokens),
                num_topk=np.int64(num_topk), timeout_ns=np.int64(b.timeout_ns),
                has_weights=np.bool_(has_weights), quantize_fp8=np.bool_(quantize_fp8))

  def _check_bytes(self, op, num_max_tokens, num_topk, data_row_bytes):
    if num_topk > self._b._c.MAX_TOPK:
      raise ValueError(f"jax_ep.{op}: the cuda backend supports num_topk <= "
                       f"{self._b._c.MAX_TOPK}, got {num_topk}.")
    need = low_latency_bytes_needed(self.num_ranks, num_max_tokens, num_topk, data_row_bytes)
    if need > self._b.num_bytes:
      raise ValueError(
          f"jax_ep.{op}: this shape needs {need} bytes of communication buffer per GPU "
          f"but the Buffer has num_nvl_bytes={self._b.num_bytes}; make the Buffer with "
          f"num_nvl_bytes=Buffer.get_low_latency_buffer_size_hint(...) or more.")

  def _rows_to_send(self, rows, num_max_tokens, num_topk, split=0):
    """(rows as the kernels move them, the inverse for received rows, whether
    the kernel quantizes them): FP8 byte rows ride as bfloat16
    (``byte_rows_as_bf16``); with ``split`` = H, bfloat16 rows are quantized
    to FP8 by the send kernel and cross in ``fp8.pack_rows``' layout."""
    op = "low_latency_dispatch"
    if split and rows.dtype == jnp.bfloat16:
      packed = _pad16(split + 4 * (split // fp8.BLOCK))  # pack_rows' row: H FP8 bytes, H/128 scales
      self._check_bytes(op, num_max_tokens, num_topk, packed)
      return rows, None, True
    if rows.dtype == jnp.uint8:
      view, restore = byte_rows_as_bf16(rows)
    else:
      if rows.shape[1] * rows.dtype.itemsize % 16:
        raise ValueError(f"jax_ep.{op}: the cuda backend needs rows of a multiple of 16 "
                         f"bytes; hidden={rows.shape[1]} x {rows.dtype.itemsize} bytes "
                         f"is not.")
      view, restore = rows, (lambda received: received)
    self._check_bytes(op, num_max_tokens, num_topk, view.shape[1] * view.dtype.itemsize)
    return view, restore, False

  def _check_combine(self, y, num_max_tokens, num_topk):
    H = y.shape[-1]
    if H > self._b._c.MAX_LOW_LATENCY_HIDDEN:
      raise ValueError(f"jax_ep.low_latency_combine: the cuda backend supports hidden <= "
                       f"{self._b._c.MAX_LOW_LATENCY_HIDDEN} (its partial sums are staged "
                       f"in shared memory), got {H}.")
    if H * y.dtype.itemsize % 16:
      raise ValueError(f"jax_ep.low_latency_combine: the cuda backend needs rows of a "
                       f"multiple of 16 bytes; hidden={H} x {y.dtype.itemsize} bytes is not.")
    self._check_bytes("low_latency_combine", num_max_tokens, num_topk, 4 * H)

  def _recv_shapes(self, num_experts, num_max_tokens, num_topk, view, split):
    """The receive's outputs: rows (or, with ``split``, FP8 values and scales)
    and the handle's leaves."""
    El, rows, i32 = num_experts // self.num_ranks, self.num_ranks * num_max_tokens, jnp.int32
    if split:
      out = (jax.ShapeDtypeStruct((El * rows, split), jnp.uint8),
             jax.ShapeDtypeStruct((El * rows, split // fp8.BLOCK), jnp.float32))
    else:
      out = (jax.ShapeDtypeStruct((El * rows, view.shape[1]), view.dtype),
             jax.ShapeDtypeStruct((0, 0), jnp.float32))
    return out + (jax.ShapeDtypeStruct((El,), i32), jax.ShapeDtypeStruct((El, rows), i32),
                  jax.ShapeDtypeStruct((rows, num_topk), i32))

  def _received(self, recv, tail, count, src_slot, recv_slot, restore, split):
    El, rows = src_slot.shape
    if split:  # already apart: no pass over the [E_local, R*T, ...] outputs
      recv = (lax.bitcast_convert_type(recv, fp8.FP8_DTYPE).reshape(El, rows, split),
              tail.reshape(El, rows, split // fp8.BLOCK))
    else:
      recv = restore(recv.reshape(El, rows, recv.shape[-1]))
    return recv, count, LowLatencyHandle(src_slot, recv_slot, count)

  # -- dispatch ------------------------------------------------------------------
  def dispatch(self, rows, topk_idx, num_max_tokens, num_experts, split=0):
    """``(recv [E_local, R*T, W], recv_count [E_local], handle)`` for ``rows
    [N, W]`` (bfloat16, float32, or uint8 FP8 rows), in one custom call. With
    ``split`` = H (FP8 rows: bfloat16 ``x`` to quantize, or rows packed by
    ``fp8.pack_rows``), ``recv`` is the pair ``(values float8_e4m3fn [.., H],
    scales float32 [.., H/128])``."""
    K = topk_idx.shape[1]
    view, restore, quantize = self._rows_to_send(rows, num_max_tokens, K, split)
    _, *outs = self._b._call(
        "jax_ep_ll_dispatch",
        (jax.ShapeDtypeStruct((), jnp.uint32),) + self._recv_shapes(
            num_experts, num_max_tokens, K, view, split),
        view, topk_idx, self._b._rank(),
        **self._attrs(num_experts=num_experts, num_max_tokens=num_max_tokens, num_topk=K,
                      quantize_fp8=quantize))
    return self._received(*outs, restore, split)

  def dispatch_send(self, rows, topk_idx, num_max_tokens, num_experts, split=0):
    """The split form's send (``split`` as for ``dispatch``); ``dispatch_recv``
    finishes it."""
    K = topk_idx.shape[1]
    view, restore, quantize = self._rows_to_send(rows, num_max_tokens, K, split)
    (ticket,) = self._b._call(
        "jax_ep_ll_dispatch_send", (jax.ShapeDtypeStruct((), jnp.uint32),), view, topk_idx,
        _or_empty(None, K), jnp.zeros((), jnp.int32), self._b._rank(),
        **self._attrs(num_experts=num_experts, num_max_tokens=num_max_tokens, num_topk=K,
                      quantize_fp8=quantize))
    return CudaLowLatencyState(ticket, num_max_tokens, K, num_experts, view.dtype.name,
                               view.shape[1], rows.shape[1] if rows.dtype == jnp.uint8 else 0)

  def dispatch_recv(self, state: CudaLowLatencyState, num_experts, split=0):
    T, K, nbytes = state.num_max_tokens, state.num_topk, state.byte_width
    view = jax.ShapeDtypeStruct((1, state.row_width), state.row_dtype)
    restore = ((lambda received: bf16_rows_as_bytes(received, nbytes)) if nbytes
               else (lambda received: received))
    outs = self._b._call(
        "jax_ep_ll_dispatch_recv", self._recv_shapes(num_experts, T, K, view, split),
        state.ticket, self._b._rank(),
        **self._attrs(num_experts=num_experts, num_max_tokens=T, num_topk=K))
    return self._received(*outs, restore, split)

  def cached_dispatch(self, x, handle: LowLatencyHandle, weights=None, topk_idx=None):
    """``x [N, H]`` along ``handle``, zeros past the counts, copy ``(i, k)``
    scaled by ``weights[i, k]`` if given (autodiff's linear maps). ``topk_idx``
    (the dispatch's) says where rows must go."""
    El, rows = handle.src_slot.shape
    R, K = self.num_ranks, handle.recv_slot.shape[1]
    view, restore, _ = self._rows_to_send(x, rows // R, K)
    _, recv = self._b._call(
        "jax_ep_ll_cached_dispatch",
        (jax.ShapeDtypeStruct((), jnp.uint32),
         jax.ShapeDtypeStruct((El * rows, view.shape[1]), view.dtype)),
        view, topk_idx, _or_empty(weights, K), handle.src_slot, self._b._rank(),
        **self._attrs(num_experts=El * R, num_max_tokens=rows // R, num_topk=K,
                      has_weights=weights is not None))
    return restore(recv.reshape(El, rows, view.shape[1]))

  # -- combine -------------------------------------------------------------------
  def combine(self, y, handle, weights, num_tokens):
    """``out [N, H]``: each token's copies weighted and summed in float32 on the
    experts' ranks, the partial sums added at home in rank order; one call."""
    El, rows, H = y.shape
    R, K = self.num_ranks, handle.recv_slot.shape[1]
    self._check_combine(y, rows // R, K)
    if R == 1:
      # Nothing crosses: XLA's K gathers and weighted sum (one fusion) took
      # 6.4 us at 128 x 7168, top-8, where our kernel took 18.3 (H100,
      # benchmarks/RESULTS.md). The handle is the same for both backends.
      return XlaLowLatency(self.axis_name, 1).combine(y, handle, weights, num_tokens)
    _, out = self._b._call(
        "jax_ep_ll_combine",
        (jax.ShapeDtypeStruct((), jnp.uint32), jax.ShapeDtypeStruct((num_tokens, H), y.dtype)),
        y.reshape(El * rows, H), _or_empty(weights, K), handle.recv_slot, self._b._rank(),
        **self._attrs(num_experts=El * R, num_max_tokens=rows // R, num_topk=K,
                      has_weights=weights is not None))
    return out

  def combine_send(self, y, handle: LowLatencyHandle, weights=None):
    """The split form's send: the partial sums go home; ``combine_recv`` adds them."""
    El, rows, H = y.shape
    R, K = self.num_ranks, handle.recv_slot.shape[1]
    self._check_combine(y, rows // R, K)
    (ticket,) = self._b._call(
        "jax_ep_ll_combine_send", (jax.ShapeDtypeStruct((), jnp.uint32),),
        y.reshape(El * rows, H), _or_empty(weights, K), handle.recv_slot, self._b._rank(),
        **self._attrs(num_experts=El * R, num_max_tokens=rows // R, num_topk=K,
                      has_weights=weights is not None))
    return CudaLowLatencyState(ticket, rows // R, K, El * R, jnp.dtype(y.dtype).name, H, 0)

  def combine_recv(self, state: CudaLowLatencyState, num_tokens, dtype):
    T, K, H = state.num_max_tokens, state.num_topk, state.row_width
    (out,) = self._b._call(
        "jax_ep_ll_combine_recv", (jax.ShapeDtypeStruct((num_tokens, H), state.row_dtype),),
        state.ticket, self._b._rank(),
        **self._attrs(num_experts=state.num_experts, num_max_tokens=T, num_topk=K))
    return out.astype(dtype)


def device_clock(after):
  """The device's clock (ns, uint64) once the stream has produced ``after``.

  A benchmark aid: two readings around a region give its device time, with no
  host clock involved. Use inside ``jit``; the reading is ordered after the
  computation of ``after`` (pass what the region produced).
  """
  _register_targets(_cuda_module())
  return jax.ffi.ffi_call("jax_ep_clock", jax.ShapeDtypeStruct((), jnp.uint64))(after)
