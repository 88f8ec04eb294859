"""Checks and autodiff for the low-latency ops and FP8 dispatch.

Same mechanism as ``_ops.py`` (``jax_ep.linear.linear_call``): for a fixed
handle, LL dispatch is linear in ``x`` and LL combine is linear in ``y``, and
the weighted dispatch ``D_w`` (copy ``(i, k)`` scaled by ``w[i, k]``) and the
weighted combine ``C_w`` are each other's transposes. So:

- LL dispatch is a ``custom_jvp`` (it also computes the routing) whose tangent
  is ``D_1`` of the tangent, a ``linear_call``: its gradient is the unweighted
  combine ``C_1`` of the cotangent (each token's copies summed).
- LL combine is bilinear in ``(y, w)``, a ``custom_jvp`` whose tangent is
  ``C_w(y_dot) + C_{w_dot}(y)``: ``linear_call(C_w, D_w)`` (gradient in ``y``:
  ``D_w`` of the cotangent, zero past the counts) plus a ``linear_call`` whose
  transpose dots the cotangent's copies with ``y``'s rows (gradient in ``w``).
  Nothing differentiates a backend's own code, so the cuda kernels need none.

FP8 dispatch is not differentiable (quantization has no useful derivative);
``dispatch_dequantized`` gives the MoE layer a straight-through derivative
instead: the tangent of dequantize(dispatch(quantize(x))) is taken to be a
cached bf16/f32 dispatch of x's tangent, as in FP8 training recipes where the
backward pass runs in high precision.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_ep import _ops
from jax_ep import fp8 as _fp8
from jax_ep.handles import LowLatencyHandle
from jax_ep.linear import linear_call

NUM_MAX = "num_max_dispatch_tokens_per_rank"


# --------------------------------------------------------------------------
# Trace-time checks.

def check_tokens(num_tokens: int, num_max_tokens, op: str) -> int:
  T = _ops.check_static_int(num_max_tokens, NUM_MAX, op, 1)
  if num_tokens > T:
    raise ValueError(f"jax_ep.{op}: x has {num_tokens} tokens but "
                     f"{NUM_MAX}={T}; it must be at least the number of tokens.")
  return T


def check_ll_handle(handle, num_ranks: int, op: str) -> LowLatencyHandle:
  if not isinstance(handle, LowLatencyHandle):
    raise TypeError(f"jax_ep.{op}: handle must be the LowLatencyHandle returned by "
                    f"low_latency_dispatch, got {type(handle).__name__}.")
  shapes = {f: tuple(getattr(getattr(handle, f), "shape", ()))
            for f in ("src_slot", "recv_slot", "recv_count")}
  El = shapes["recv_count"][0] if len(shapes["recv_count"]) == 1 else None
  ok = (El is not None and len(shapes["src_slot"]) == 2 and len(shapes["recv_slot"]) == 2
        and shapes["src_slot"][0] == El and shapes["src_slot"][1] == shapes["recv_slot"][0]
        and shapes["src_slot"][1] % num_ranks == 0)
  if not ok:
    raise ValueError(f"jax_ep.{op}: the handle's leaves have shapes {shapes}, not one "
                     f"rank's view of a low-latency handle; pass it into shard_map with "
                     f"in_specs=P(axis), as it left with out_specs=P(axis).")
  return handle


# --------------------------------------------------------------------------
# Differentiable ops.

def _leaves(handle: LowLatencyHandle) -> tuple:
  return (handle.src_slot, handle.recv_slot, handle.recv_count)


def _pair(impl, weighted: bool):
  """(D_w, C_w) as linear maps for linear_call. Residuals: the handle's leaves,
  the home rank's topk_idx [N, K] (gives N), then the weights if ``weighted``."""
  def make():
    def split(residuals):
      handle = LowLatencyHandle(*residuals[:3])
      num_tokens = residuals[3].shape[0]
      return handle, num_tokens, (residuals[4] if weighted else None)

    def send(residuals, operands):
      handle, _, w = split(residuals)
      return (impl.cached_dispatch(operands[0], handle, w, residuals[3]),)

    def back(residuals, operands):
      handle, num_tokens, w = split(residuals)
      return (impl.combine(operands[0], handle, w, num_tokens),)

    return send, back
  return _ops._cached_on(impl, ("ll_pair", weighted), make)


def _dispatch_fn(impl, num_max_tokens: int, num_experts: int):
  def make():
    @jax.custom_jvp
    def dispatch(x, topk_idx):
      return impl.dispatch(x, topk_idx, num_max_tokens, num_experts)

    def jvp(primals, tangents):
      x, topk_idx = primals
      x_dot, _ = tangents
      out = dispatch(x, topk_idx)
      recv_x, recv_count, handle = out
      if _ops._is_zero(x_dot):
        t_x = jnp.zeros_like(recv_x)
      else:
        send, back = _pair(impl, weighted=False)
        (t_x,) = linear_call(send, back, _leaves(handle) + (topk_idx,), (x_dot,))
      return out, (t_x, _ops._float0_zeros(recv_count), _ops._float0_zeros(handle))

    dispatch.defjvp(jvp, symbolic_zeros=True)
    return dispatch
  return _ops._cached_on(impl, ("ll_dispatch", num_max_tokens, num_experts), make)


def low_latency_dispatch(impl, x, topk_idx, num_max_tokens, num_experts):
  return _dispatch_fn(impl, num_max_tokens, num_experts)(x, topk_idx)


def _weight_pair(impl):
  """(w -> C_w(y), its transpose) for a fixed ``y``: combine is linear in the
  weights too. Residuals: the handle's leaves, topk_idx, then y."""
  def make():
    def split(residuals):
      return LowLatencyHandle(*residuals[:3]), residuals[3], residuals[4]

    def forward(residuals, operands):
      handle, topk_idx, y = split(residuals)
      return (impl.combine(y, handle, operands[0], topk_idx.shape[0]),)

    def transpose(residuals, operands):
      # d w[i, k] = <ct_i, y_row(i, k)>: the cotangent's copies (an unweighted
      # cached dispatch) dotted with y's rows on the experts' ranks; each dot
      # goes home as column k of a row that is zero elsewhere, so an
      # unweighted combine returns w's layout. Rows past the counts (any
      # values, NaN included) are selected away, never multiplied.
      handle, topk_idx, y = split(residuals)
      N, K = topk_idx.shape
      copies = impl.cached_dispatch(operands[0], handle, None, topk_idx)
      valid = handle.src_slot >= 0
      dots = jnp.where(valid, jnp.sum(copies.astype(jnp.float32) *
                                      jnp.where(valid[..., None], y, 0).astype(jnp.float32),
                                      axis=-1), 0.0)
      width = -(-K // 4) * 4  # float32 rows of whole 16-byte vectors
      column = jnp.where(valid, handle.src_slot % K, -1)
      rows = jnp.where(column[..., None] == jnp.arange(width), dots[..., None], 0.0)
      return (impl.combine(rows, handle, None, N)[:, :K],)

    return forward, transpose
  return _ops._cached_on(impl, ("ll_weight_pair",), make)


def _combine_fn(impl):
  """Combine as a bilinear map of (y, weights): its JVP is C_w(y_dot) +
  C_{w_dot}(y), each a linear_call with a known transpose, so the gradients
  need no differentiation through a backend's code (the cuda kernels have
  none)."""
  def make():
    send, back = _pair(impl, weighted=True)
    w_forward, w_transpose = _weight_pair(impl)

    @jax.custom_jvp
    def combine(y, weights, topk_idx, src_slot, recv_slot, recv_count):
      residuals = (src_slot, recv_slot, recv_count, topk_idx, weights)
      return linear_call(back, send, residuals, (y,))[0]

    def jvp(primals, tangents):
      y, weights, topk_idx, *leaves = primals
      y_dot, w_dot = tangents[:2]
      out = combine(*primals)
      terms = []
      if not _ops._is_zero(y_dot):
        terms += linear_call(back, send, tuple(leaves) + (topk_idx, weights), (y_dot,))
      if not _ops._is_zero(w_dot):
        terms += linear_call(w_forward, w_transpose, tuple(leaves) + (topk_idx, y), (w_dot,))
      t = sum(terms[1:], terms[0]) if terms else jnp.zeros_like(out)
      return out, t.astype(out.dtype)

    combine.defjvp(jvp, symbolic_zeros=True)
    return combine
  return _ops._cached_on(impl, ("ll_combine",), make)


def low_latency_combine(impl, y, topk_idx, weights, handle):
  return _combine_fn(impl)(y, weights, topk_idx, *_leaves(handle))


def _fp8_not_differentiable(fn, op):
  """``fn`` whose derivative is a clear error instead of a silent zero."""
  @jax.custom_jvp
  def wrapped(x, *rest):
    return fn(x, *rest)

  def jvp(primals, tangents):
    raise NotImplementedError(
        f"jax_ep.{op} with FP8 is not differentiable (quantization has no useful "
        f"derivative); differentiate the bf16/f32 op, or use "
        f"jax_ep.moe.moe_block(..., fp8_dispatch=True), whose derivative is "
        f"straight-through.")

  wrapped.defjvp(jvp)
  return wrapped


def fp8_rows(impl, x):
  """What ``impl.dispatch`` / ``impl.dispatch_send`` take (with ``split`` = H)
  for an FP8 dispatch of ``x``: ``x`` itself where the backend quantizes while
  it sends (``quantizes_fp8``: the cuda kernels, for bfloat16 ``x``), else the
  rows quantized and packed here (``fp8.pack_rows``). Either way the same
  bytes arrive (``fp8.quantize_fp8``'s arithmetic)."""
  if getattr(impl, "quantizes_fp8", False) and x.dtype == jnp.bfloat16:
    return x
  return _fp8.pack_rows(*_fp8.quantize_fp8(x))


def low_latency_dispatch_fp8(impl, x, topk_idx, num_max_tokens, num_experts):
  H = x.shape[1]

  def run(x, topk_idx):
    return impl.dispatch(fp8_rows(impl, x), topk_idx, num_max_tokens, num_experts, split=H)

  return _fp8_not_differentiable(run, "low_latency_dispatch")(x, topk_idx)


# --------------------------------------------------------------------------
# FP8 in normal mode.

# Two ways to move (values, scales), by what the backend's rows cost:
# - packed (default): one byte row of H + H/32 bytes per token, one dispatch;
#   XLA packs and unpacks the rows (a pass over them each way), which a backend
#   of collectives gets back in fewer exchanges;
# - apart (a backend with ``fp8_apart = True``, the cuda one): the values by the
#   dispatch, the scales by a cached dispatch with its handle, both byte rows
#   the kernels copy as they are, so no pass touches the [M, H] rows. (Packed,
#   the cuda FP8 dispatch at DeepEP's shape took 334 us on two H200s, against
#   248 us for bf16's twice-as-large rows.)

def _rows_fp8(backend, q, s, topk_idx, topk_weights, layout, num_experts, num_worst_tokens,
              **options):
  """``backend.dispatch`` of FP8 rows ``(q, s)``: ``((recv_q, recv_s), recv_idx, recv_w,
  counts, handle)``."""
  if getattr(backend, "fp8_apart", False):
    qb, sb = _fp8.to_bytes(q, s)
    recv_qb, recv_idx, recv_w, counts, handle = backend.dispatch(
        qb, topk_idx, topk_weights, layout, num_experts, num_worst_tokens, **options)
    recv_sb, _ = backend.cached_dispatch(sb, None, handle)
    return _fp8.from_bytes(recv_qb, recv_sb), recv_idx, recv_w, counts, handle
  recv, recv_idx, recv_w, counts, handle = backend.dispatch(
      _fp8.pack_rows(q, s), topk_idx, topk_weights, layout, num_experts, num_worst_tokens,
      **options)
  return _fp8.unpack_rows(recv, q.shape[1]), recv_idx, recv_w, counts, handle


def dispatch_fp8(backend, pair, topk_idx, topk_weights, layout, num_experts,
                 num_worst_tokens, **options):
  """Normal dispatch of ``(q, scales)``, packed or apart (above).
  ``options`` as in ``_ops.dispatch``."""

  def run(q, s, topk_idx, topk_weights):
    return _rows_fp8(backend, q, s, topk_idx, topk_weights, layout, num_experts,
                     num_worst_tokens, **options)

  return _fp8_not_differentiable(run, "dispatch")(*pair, topk_idx, topk_weights)


def cached_dispatch_fp8(backend, pair, handle, weights):
  q, s = pair
  if getattr(backend, "fp8_apart", False):
    qb, sb = _fp8.to_bytes(q, s)
    recv_qb, recv_w = backend.cached_dispatch(qb, weights, handle)
    recv_sb, _ = backend.cached_dispatch(sb, None, handle)
    return _fp8.from_bytes(recv_qb, recv_sb), recv_w
  recv, recv_w = backend.cached_dispatch(_fp8.pack_rows(q, s), weights, handle)
  return _fp8.unpack_rows(recv, q.shape[1]), recv_w


def _dequantized_fn(backend, num_experts: int, num_worst_tokens: int):
  def make():
    @jax.custom_jvp
    def dispatch(x, topk_idx, topk_weights):
      q, s = _fp8.quantize_fp8(x)
      recv, recv_idx, recv_w, counts, handle = _rows_fp8(
          backend, q, s, topk_idx, topk_weights, None, num_experts, num_worst_tokens)
      return _fp8.dequantize_fp8(*recv, dtype=x.dtype), recv_idx, recv_w, counts, handle

    def jvp(primals, tangents):
      # Straight through: the tangent rides a bf16/f32 cached dispatch, exactly
      # as _ops.dispatch's tangent does; its transpose is a combine.
      x, _, topk_weights = primals
      x_dot, _, w_dot = tangents
      out = dispatch(*primals)
      recv_x, recv_idx, recv_w, counts, handle = out
      weighted = not _ops._is_zero(w_dot)
      if _ops._is_zero(x_dot) and not weighted:
        t_x, t_w = jnp.zeros_like(recv_x), jnp.zeros_like(recv_w)
      else:
        x_dot = jnp.zeros_like(x) if _ops._is_zero(x_dot) else x_dot
        send, back = _ops._send_and_back(backend, weighted, True,
                                         jax.tree_util.tree_structure(handle))
        t = linear_call(send, back, _ops._leaves(handle) + (recv_idx,),
                        (x_dot, w_dot) if weighted else (x_dot,))
        t_x, t_w = t[0], (t[1] if weighted else jnp.zeros_like(recv_w))
      return out, (t_x, _ops._float0_zeros(recv_idx), t_w, _ops._float0_zeros(counts),
                   _ops._float0_zeros(handle))

    dispatch.defjvp(jvp, symbolic_zeros=True)
    return dispatch
  return _ops._cached_on(backend, ("fp8_dequantized", num_experts, num_worst_tokens),
                         make)


def dispatch_dequantized(backend, x, topk_idx, topk_weights, num_experts,
                         num_worst_tokens):
  """Dispatch ``x`` in FP8 and dequantize on arrival, with a straight-through
  derivative. ``topk_weights`` is required (the MoE layer's case)."""
  return _dequantized_fn(backend, num_experts, num_worst_tokens)(x, topk_idx, topk_weights)
