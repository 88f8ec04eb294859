// XLA FFI handlers of jax_ep: decode, check, launch. No host sync, no
// allocation and no host-side state between calls: everything is enqueued on
// XLA's stream, and the state the ops share across calls (sequence numbers)
// lives in device memory. That is why every handler is marked command-buffer
// compatible: a call captured into a CUDA graph and replayed does exactly what
// a fresh call would (a replay after Buffer.destroy() traps on the liveness
// word instead of touching freed memory). The device-side rank and
// num_recv_tokens operands are read by the kernels, never by the host.
#include <cstdint>
#include <string>

#include "ffi_helpers.h"

namespace jax_ep {

// Attributes of jax_ep_layout (one struct per op family; mirrored by
// jax_ep/backends/cuda.py).
struct LayoutAttrs {
  int64_t buffer_id;
  int64_t num_experts;
  int64_t num_ranks;
};

// Attributes of the intranode ops (dispatch, cached dispatch, combine).
struct IntranodeAttrs {
  int64_t buffer_id;
  int64_t num_experts;  // dispatch only (0 elsewhere)
  int64_t num_sms;
  int64_t timeout_ns;
  bool has_weights;     // else the weights operand is [0, K] and nothing is sent
  bool has_layout;      // dispatch: else the layout operands are [0, R] and [0]
};

}  // namespace jax_ep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LayoutAttrs,
                                      ::xla::ffi::StructMember<int64_t>("buffer_id"),
                                      ::xla::ffi::StructMember<int64_t>("num_experts"),
                                      ::xla::ffi::StructMember<int64_t>("num_ranks"));

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::IntranodeAttrs,
                                      ::xla::ffi::StructMember<int64_t>("buffer_id"),
                                      ::xla::ffi::StructMember<int64_t>("num_experts"),
                                      ::xla::ffi::StructMember<int64_t>("num_sms"),
                                      ::xla::ffi::StructMember<int64_t>("timeout_ns"),
                                      ::xla::ffi::StructMember<bool>("has_weights"),
                                      ::xla::ffi::StructMember<bool>("has_layout"));

namespace jax_ep {

namespace {

// ---------------------------------------------------------------------------
ffi::Error LayoutImpl(cudaStream_t stream, int32_t device, I32x2 topk_idx,
                      ffi::Result<I32x1> num_tokens_per_rank,
                      ffi::Result<I32x1> num_tokens_per_expert,
                      ffi::Result<PredX2> is_token_in_rank, LayoutAttrs at) {
  const char* op = "jax_ep_layout";
  const int64_t N = topk_idx.dimensions()[0], K = topk_idx.dimensions()[1];
  const int64_t E = at.num_experts, R = at.num_ranks;
  if (R < 1 || R > kMaxRanks || E < 1 || E % R != 0 || E > INT32_MAX) {
    return Invalid(op, "num_experts (" + std::to_string(E) +
                           ") must be a positive multiple of num_ranks (" + std::to_string(R) +
                           ") and num_ranks in [1, " + std::to_string(kMaxRanks) + "]");
  }
  if (N * (K > R ? K : R) > (int64_t{1} << 40)) return Invalid(op, "problem too large");
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "num_tokens_per_rank", *num_tokens_per_rank, {R}));
  JAX_EP_RETURN_IF_FFI_ERROR(
      ExpectShape(op, "num_tokens_per_expert", *num_tokens_per_expert, {E}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "is_token_in_rank", *is_token_in_rank, {N, R}));
  GroupView g{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, at.buffer_id, device, R, kHeaderBytes, &g));
  JAX_EP_RETURN_IF_FFI_ERROR(UseDevice(op, device));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {Bytes(*num_tokens_per_rank),
                                                 Bytes(*num_tokens_per_expert),
                                                 Bytes(*is_token_in_rank)}));
  layout::Args a{};
  a.topk_idx = topk_idx.typed_data();
  a.num_tokens_per_rank = num_tokens_per_rank->typed_data();
  a.num_tokens_per_expert = num_tokens_per_expert->typed_data();
  a.is_token_in_rank = is_token_in_rank->typed_data();
  a.own_buffer = g.peers[g.rank];
  a.num_tokens = N;
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.num_ranks = static_cast<int>(R);
  cudaError_t err = layout::Launch(a, stream);
  if (err != cudaSuccess) return CudaError(op, "layout launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error DispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, I32x2 topk_idx,
                        F32x2 topk_weights, PredX2 is_token_in_rank,
                        I32x1 num_tokens_per_rank, I32x0 rank, ffi::Result<ffi::AnyBuffer> recv_x,
                        ffi::Result<I32x2> recv_topk_idx, ffi::Result<F32x2> recv_topk_weights,
                        ffi::Result<I32x1> num_recv_tokens_per_expert,
                        ffi::Result<I32x2> send_pos, ffi::Result<I32x1> recv_src_idx,
                        ffi::Result<I32x1> recv_src_rank, ffi::Result<I32x0> num_recv_tokens,
                        IntranodeAttrs at) {
  const char* op = "jax_ep_dispatch";
  RowType type;
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "x", x, &type, &row_bytes));
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "recv_x", *recv_x, &type, &row_bytes));
  const int64_t N = x.dimensions()[0], H = x.dimensions()[1];
  const int64_t K = topk_idx.dimensions()[1], R = send_pos->dimensions()[1];
  const int64_t M = recv_x->dimensions()[0], E = at.num_experts;
  JAX_EP_RETURN_IF_FFI_ERROR(CheckSizes(op, R, K, N, M, at.num_sms));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckTimeout(op, at.timeout_ns));
  if (E < 1 || E % R != 0 || E > INT32_MAX) {
    return Invalid(op, "num_experts (" + std::to_string(E) +
                           ") must be a positive multiple of num_ranks (" + std::to_string(R) +
                           ")");
  }
  if (x.element_type() != recv_x->element_type()) {
    return Invalid(op, "recv_x must have x's dtype");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "topk_idx", topk_idx, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(
      ExpectShape(op, "topk_weights", topk_weights, {at.has_weights ? N : 0, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(
      ExpectShape(op, "is_token_in_rank", is_token_in_rank, {at.has_layout ? N : 0, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(
      ExpectShape(op, "num_tokens_per_rank", num_tokens_per_rank, {at.has_layout ? R : 0}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_x", *recv_x, {M, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_topk_idx", *recv_topk_idx, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_topk_weights", *recv_topk_weights, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "num_recv_tokens_per_expert",
                                         *num_recv_tokens_per_expert, {E / R}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "send_pos", *send_pos, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_idx", *recv_src_idx, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_rank", *recv_src_rank, {M}));

  DispatchArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, at.buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, EltBytes(type)),
                                       &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseDevice(op, device));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(
      op, stream,
      {Bytes(*recv_x), Bytes(*recv_topk_idx), Bytes(*recv_topk_weights),
       Bytes(*num_recv_tokens_per_expert), Bytes(*send_pos), Bytes(*recv_src_idx),
       Bytes(*recv_src_rank), Bytes(*num_recv_tokens)}));
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.topk_weights = at.has_weights ? topk_weights.typed_data() : nullptr;
  a.is_token_in_rank = at.has_layout ? is_token_in_rank.typed_data() : nullptr;
  a.num_tokens_per_rank = at.has_layout ? num_tokens_per_rank.typed_data() : nullptr;
  a.rank = rank.typed_data();
  a.recv_x = recv_x->untyped_data();
  a.recv_topk_idx = recv_topk_idx->typed_data();
  a.recv_topk_weights = recv_topk_weights->typed_data();
  a.num_recv_tokens_per_expert = num_recv_tokens_per_expert->typed_data();
  a.send_pos = send_pos->typed_data();
  a.recv_src_idx = recv_src_idx->typed_data();
  a.recv_src_rank = recv_src_rank->typed_data();
  a.num_recv_tokens = num_recv_tokens->typed_data();
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = row_bytes;
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.num_sms = static_cast<int>(at.num_sms);
  a.timeout_ns = at.timeout_ns;
  cudaError_t err = LaunchDispatch(a, stream);
  if (err != cudaSuccess) return CudaError(op, "dispatch launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error CachedDispatchImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                              F32x2 weights, I32x2 send_pos, I32x1 recv_src_idx,
                              I32x1 recv_src_rank, I32x0 num_recv_tokens, I32x0 rank,
                              ffi::Result<ffi::AnyBuffer> recv_x,
                              ffi::Result<F32x2> recv_weights, IntranodeAttrs at) {
  const char* op = "jax_ep_cached_dispatch";
  RowType type;
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "x", x, &type, &row_bytes));
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "recv_x", *recv_x, &type, &row_bytes));
  const int64_t N = x.dimensions()[0], H = x.dimensions()[1];
  const int64_t K = recv_weights->dimensions()[1], R = send_pos.dimensions()[1];
  const int64_t M = recv_x->dimensions()[0];
  JAX_EP_RETURN_IF_FFI_ERROR(CheckSizes(op, R, K, N, M, at.num_sms));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckTimeout(op, at.timeout_ns));
  if (x.element_type() != recv_x->element_type()) {
    return Invalid(op, "recv_x must have x's dtype");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "weights", weights, {at.has_weights ? N : 0, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "send_pos", send_pos, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_idx", recv_src_idx, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_rank", recv_src_rank, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_x", *recv_x, {M, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_weights", *recv_weights, {M, K}));

  CachedDispatchArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, at.buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, EltBytes(type)),
                                       &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseDevice(op, device));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {Bytes(*recv_x), Bytes(*recv_weights)}));
  a.x = x.untyped_data();
  a.weights = at.has_weights ? weights.typed_data() : nullptr;
  a.send_pos = send_pos.typed_data();
  a.recv_src_idx = recv_src_idx.typed_data();
  a.recv_src_rank = recv_src_rank.typed_data();
  a.num_recv_tokens = num_recv_tokens.typed_data();
  a.rank = rank.typed_data();
  a.recv_x = recv_x->untyped_data();
  a.recv_weights = recv_weights->typed_data();
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = row_bytes;
  a.num_topk = static_cast<int>(K);
  a.num_sms = static_cast<int>(at.num_sms);
  a.timeout_ns = at.timeout_ns;
  cudaError_t err = LaunchCachedDispatch(a, stream);
  if (err != cudaSuccess) return CudaError(op, "cached dispatch launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error CombineImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, F32x2 weights,
                       I32x2 send_pos, I32x1 recv_src_idx, I32x1 recv_src_rank,
                       I32x0 num_recv_tokens, I32x0 rank, ffi::Result<ffi::AnyBuffer> combined_x,
                       ffi::Result<F32x2> combined_weights, IntranodeAttrs at) {
  const char* op = "jax_ep_combine";
  RowType type;
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "y", y, &type, &row_bytes));
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "combined_x", *combined_x, &type, &row_bytes));
  const int64_t M = y.dimensions()[0], H = y.dimensions()[1];
  const int64_t K = combined_weights->dimensions()[1];
  const int64_t N = send_pos.dimensions()[0], R = send_pos.dimensions()[1];
  JAX_EP_RETURN_IF_FFI_ERROR(CheckSizes(op, R, K, N, M, at.num_sms));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckTimeout(op, at.timeout_ns));
  if (y.element_type() != combined_x->element_type()) {
    return Invalid(op, "combined_x must have y's dtype");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "weights", weights, {at.has_weights ? M : 0, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_idx", recv_src_idx, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_src_rank", recv_src_rank, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "combined_x", *combined_x, {N, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "combined_weights", *combined_weights, {N, K}));

  CombineArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, at.buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, EltBytes(type)),
                                       &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseDevice(op, device));
  JAX_EP_RETURN_IF_FFI_ERROR(
      Poison(op, stream, {Bytes(*combined_x), Bytes(*combined_weights)}));
  a.y = y.untyped_data();
  a.weights = at.has_weights ? weights.typed_data() : nullptr;
  a.send_pos = send_pos.typed_data();
  a.recv_src_idx = recv_src_idx.typed_data();
  a.recv_src_rank = recv_src_rank.typed_data();
  a.num_recv_tokens = num_recv_tokens.typed_data();
  a.rank = rank.typed_data();
  a.combined_x = combined_x->untyped_data();
  a.combined_weights = combined_weights->typed_data();
  a.row_type = type;
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = row_bytes;
  a.num_topk = static_cast<int>(K);
  a.num_sms = static_cast<int>(at.num_sms);
  a.timeout_ns = at.timeout_ns;
  cudaError_t err = LaunchCombine(a, stream);
  if (err != cudaSuccess) return CudaError(op, "combine launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// The benchmark's device clock: %globaltimer once the stream reaches the call
// (its operand only orders it after the work that produced the operand).
ffi::Error ClockImpl(cudaStream_t stream, int32_t device, ffi::AnyBuffer,
                     ffi::Result<U64x0> ns) {
  JAX_EP_RETURN_IF_FFI_ERROR(UseDevice("jax_ep_clock", device));
  cudaError_t err = LaunchClock(ns->typed_data(), stream);
  if (err != cudaSuccess) return CudaError("jax_ep_clock", "launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

// Exported handler symbols (wrapped into capsules by cuda_bindings.cc).
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLayout, jax_ep::LayoutImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<jax_ep::I32x2>()   // topk_idx
        .Ret<jax_ep::I32x1>()   // num_tokens_per_rank
        .Ret<jax_ep::I32x1>()   // num_tokens_per_expert
        .Ret<jax_ep::PredX2>()  // is_token_in_rank
        .Attrs<jax_ep::LayoutAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpDispatch, jax_ep::DispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()             // x
        .Arg<jax_ep::I32x2>()   // topk_idx
        .Arg<jax_ep::F32x2>()   // topk_weights, or [0, K]
        .Arg<jax_ep::PredX2>()  // is_token_in_rank, or [0, R]
        .Arg<jax_ep::I32x1>()   // num_tokens_per_rank, or [0]
        .Arg<jax_ep::I32x0>()    // rank
        .Ret<ffi::AnyBuffer>()             // recv_x
        .Ret<jax_ep::I32x2>()   // recv_topk_idx
        .Ret<jax_ep::F32x2>()   // recv_topk_weights
        .Ret<jax_ep::I32x1>()   // num_recv_tokens_per_expert
        .Ret<jax_ep::I32x2>()   // send_pos
        .Ret<jax_ep::I32x1>()   // recv_src_idx
        .Ret<jax_ep::I32x1>()   // recv_src_rank
        .Ret<jax_ep::I32x0>()    // num_recv_tokens
        .Attrs<jax_ep::IntranodeAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCachedDispatch, jax_ep::CachedDispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()            // x
        .Arg<jax_ep::F32x2>()  // weights, or [0, K]
        .Arg<jax_ep::I32x2>()  // send_pos
        .Arg<jax_ep::I32x1>()  // recv_src_idx
        .Arg<jax_ep::I32x1>()  // recv_src_rank
        .Arg<jax_ep::I32x0>()   // num_recv_tokens
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<ffi::AnyBuffer>()            // recv_x
        .Ret<jax_ep::F32x2>()  // recv_weights
        .Attrs<jax_ep::IntranodeAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCombine, jax_ep::CombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()            // y
        .Arg<jax_ep::F32x2>()  // weights, or [0, K]
        .Arg<jax_ep::I32x2>()  // send_pos
        .Arg<jax_ep::I32x1>()  // recv_src_idx
        .Arg<jax_ep::I32x1>()  // recv_src_rank
        .Arg<jax_ep::I32x0>()   // num_recv_tokens
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<ffi::AnyBuffer>()            // combined_x
        .Ret<jax_ep::F32x2>()  // combined_weights
        .Attrs<jax_ep::IntranodeAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpClock, jax_ep::ClockImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()             // any operand, for ordering
        .Ret<jax_ep::U64x0>(),   // ns
    {ffi::Traits::kCmdBufferCompatible});
