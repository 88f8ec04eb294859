"""FP8 (e4m3fn) rows with per-128-channel float32 scales, as DeepEP sends them.

``quantize_fp8(x)`` splits each row of ``x [..., H]`` into ``H // 128`` blocks
of 128 channels and gives every block one float32 scale ``s = amax / 448``
(computed as ``amax * float32(1/448)``)
(448 is e4m3fn's largest finite value), so ``x ≈ q * s`` with ``q`` in
``float8_e4m3fn``. ``dequantize_fp8(q, s)`` undoes it.

``pack_rows`` / ``unpack_rows`` put a row's FP8 bytes and its scales' bytes
side by side in one ``uint8`` row, so the dispatch ops move an FP8 row and its
scales in one exchange, bit for bit, and a zero padding row unpacks to zero
FP8 bytes with zero (finite) scales.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

FP8_DTYPE = jnp.dtype(jnp.float8_e4m3fn)
BLOCK = 128
FP8_MAX = 448.0
# A block's scale is never below this (the smallest normal float32), so x / s
# never divides by zero or overflows to inf, even for an all-zero block or one
# of float32 subnormals (then q is 0 or small, still with |x - q*s| tiny).
_MIN_SCALE = float(jnp.finfo(jnp.float32).tiny)


def check_hidden(hidden: int, op: str) -> None:
  if hidden % BLOCK:
    raise ValueError(f"jax_ep.{op}: FP8 needs the hidden size H to be a multiple of "
                     f"{BLOCK} (one scale per {BLOCK} channels), got H={hidden}.")


def quantize_fp8(x: jax.Array):
  """``x [..., H]`` (any float dtype, ``H % 128 == 0``) -> ``(q [..., H]
  float8_e4m3fn, scales [..., H // 128] float32)`` with ``x ≈ q * scales``
  per 128-channel block, rounded to nearest even."""
  H = x.shape[-1]
  check_hidden(H, "quantize_fp8")
  blocks = x.astype(jnp.float32).reshape(x.shape[:-1] + (H // BLOCK, BLOCK))
  amax = jnp.max(jnp.abs(blocks), axis=-1)
  # amax * f32(1/448), written out: XLA turns a division by a constant into
  # this product anyway, and spelling it keeps every implementation bit-equal.
  scales = jnp.maximum(amax * jnp.float32(1.0 / FP8_MAX), _MIN_SCALE)
  # x * (1/s), written out: XLA rewrites a division by a broadcast into this
  # anyway; spelling it makes the result the same on every implementation.
  v = blocks * (1.0 / scales)[..., None]
  # |v| <= 448 up to one rounding of the division; clip so it can never
  # become NaN (e4m3fn has no inf: out-of-range converts to NaN).
  q = jnp.clip(v, -FP8_MAX, FP8_MAX).astype(FP8_DTYPE)
  return q.reshape(x.shape), scales


def dequantize_fp8(q: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
  """``q [..., H]`` float8_e4m3fn, ``scales [..., H // 128]`` -> ``q * scales``
  in ``dtype`` (computed in float32)."""
  H = q.shape[-1]
  check_hidden(H, "dequantize_fp8")
  if tuple(scales.shape) != tuple(q.shape[:-1]) + (H // BLOCK,):
    raise ValueError(f"jax_ep.dequantize_fp8: scales must have shape "
                     f"{tuple(q.shape[:-1]) + (H // BLOCK,)} for q of shape "
                     f"{tuple(q.shape)}, got {tuple(scales.shape)}.")
  blocks = q.astype(jnp.float32).reshape(q.shape[:-1] + (H // BLOCK, BLOCK))
  return (blocks * scales.astype(jnp.float32)[..., None]).reshape(q.shape).astype(dtype)


def check_fp8_pair(x, op: str, name: str = "x"):
  """``(q [N, H] float8_e4m3fn, scales [N, H // 128] float32)``, checked."""
  if not (isinstance(x, (tuple, list)) and len(x) == 2):
    raise TypeError(f"jax_ep.{op}: an FP8 {name} is the pair (x_fp8, scales), got "
                    f"{type(x).__name__}.")
  q, s = x
  for a, what in ((q, "x_fp8"), (s, "scales")):
    if not hasattr(a, "shape") or not hasattr(a, "dtype"):
      raise TypeError(f"jax_ep.{op}: {name}'s {what} must be an array, got "
                      f"{type(a).__name__}.")
  if q.ndim != 2:
    raise ValueError(f"jax_ep.{op}: {name}'s x_fp8 must have shape [num_tokens, hidden], "
                     f"got {tuple(q.shape)}.")
  if jnp.dtype(q.dtype) != FP8_DTYPE:
    raise TypeError(f"jax_ep.{op}: {name}'s x_fp8 must be float8_e4m3fn, got {q.dtype}.")
  check_hidden(q.shape[1], op)
  if tuple(s.shape) != (q.shape[0], q.shape[1] // BLOCK):
    raise ValueError(f"jax_ep.{op}: {name}'s scales must have shape "
                     f"{(q.shape[0], q.shape[1] // BLOCK)}, got {tuple(s.shape)}.")
  if jnp.dtype(s.dtype) != jnp.dtype(jnp.float32):
    raise TypeError(f"jax_ep.{op}: {name}'s scales must be float32, got {s.dtype}.")
  return q, s


def to_bytes(q: jax.Array, scales: jax.Array):
  """``[..., H]`` FP8 and ``[..., H/128]`` f32 -> ``([..., H], [..., H/32])`` uint8
  (bitcasts only)."""
  qb = lax.bitcast_convert_type(q, jnp.uint8)
  sb = lax.bitcast_convert_type(scales, jnp.uint8)  # [..., H/128, 4]
  return qb, sb.reshape(scales.shape[:-1] + (scales.shape[-1] * 4,))


def from_bytes(qb: jax.Array, sb: jax.Array):
  """Inverse of ``to_bytes``: ``(q [..., H] float8_e4m3fn, scales [..., H/128] f32)``."""
  sb = sb.reshape(sb.shape[:-1] + (sb.shape[-1] // 4, 4))
  return lax.bitcast_convert_type(qb, FP8_DTYPE), lax.bitcast_convert_type(sb, jnp.float32)


def pack_rows(q: jax.Array, scales: jax.Array) -> jax.Array:
  """``[..., H]`` FP8 and ``[..., H/128]`` f32 -> ``[..., H + H/32]`` uint8: one row."""
  return jnp.concatenate(to_bytes(q, scales), axis=-1)


def unpack_rows(packed: jax.Array, hidden: int):
  """Inverse of ``pack_rows``: ``(q [..., H] float8_e4m3fn, scales [..., H/128] f32)``."""
  return from_bytes(packed[..., :hidden], packed[..., hidden:])
