"""jax_ep: DeepEP-style expert-parallel dispatch and combine for JAX.

    buf = jax_ep.Buffer(mesh, axis_name="ep")
    # inside jax.shard_map over "ep":
    recv_x, recv_idx, recv_w, counts, handle = buf.dispatch(
        x, topk_idx=idx, topk_weights=w, num_experts=E)
    out, _ = buf.combine(expert(recv_x), handle)

See README.md and docs/design.md.
"""
from jax_ep._ext import build_info
from jax_ep.buffer import Buffer, check_no_dropped_tokens
from jax_ep.handles import DispatchHandle, DispatchLayout, LowLatencyHandle
from jax_ep.fp8 import dequantize_fp8, quantize_fp8
from jax_ep import moe

__version__ = "0.1.0"
__all__ = ["Buffer", "DispatchHandle", "DispatchLayout", "build_info",
           "check_no_dropped_tokens", "moe", "LowLatencyHandle", "quantize_fp8",
           "dequantize_fp8"]
