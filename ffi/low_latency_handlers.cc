// XLA FFI handlers of the low-latency ops (low_latency.cu): decode, check,
// launch, like handlers.cc. A plain op is one custom call and one kernel
// (both phases). The split form
// (return_recv_hook) is two custom calls: the send's ticket (its sequence
// number, written by the kernel) is the receive's operand, so XLA keeps the
// pair in order and may place other work in between. Stateless between
// calls, hence command-buffer compatible.
#include <cstdint>
#include <string>

#include "ffi_helpers.h"

namespace jax_ep {

// Attributes of the low-latency ops (one struct for the family; mirrored by
// jax_ep/backends/cuda.py CudaLowLatency._attrs).
struct LowLatencyAttrs {
  int64_t buffer_id;
  int64_t num_ranks;
  int64_t num_experts;
  int64_t num_max_tokens;  // T
  int64_t num_topk;
  int64_t timeout_ns;
  bool has_weights;   // else the weights operand is [0, K]
  bool quantize_fp8;  // dispatch: x is bfloat16, quantized to FP8 rows while it is sent
};

}  // namespace jax_ep

XLA_FFI_REGISTER_STRUCT_ATTR_DECODING(jax_ep::LowLatencyAttrs,
                                      ::xla::ffi::StructMember<int64_t>("buffer_id"),
                                      ::xla::ffi::StructMember<int64_t>("num_ranks"),
                                      ::xla::ffi::StructMember<int64_t>("num_experts"),
                                      ::xla::ffi::StructMember<int64_t>("num_max_tokens"),
                                      ::xla::ffi::StructMember<int64_t>("num_topk"),
                                      ::xla::ffi::StructMember<int64_t>("timeout_ns"),
                                      ::xla::ffi::StructMember<bool>("has_weights"),
                                      ::xla::ffi::StructMember<bool>("quantize_fp8"));

namespace jax_ep {
namespace {

// A packed FP8 row (values, then scales) as it crosses: rounded up to 16 bytes.
// The send (quantizing bfloat16 x) and the receive (its two outputs) must agree.
constexpr int64_t PackedRowBytes(int64_t value_bytes, int64_t scale_bytes) {
  return (value_bytes + scale_bytes + 15) / 16 * 16;
}

// What every low-latency handler checks and looks up: sizes, the timeout, and
// the group with room for rows of `data_row_bytes`.
ffi::Error Decode(const char* op, int32_t device, const LowLatencyAttrs& at,
                  int64_t data_row_bytes, GroupView* g) {
  const int64_t R = at.num_ranks, K = at.num_topk, T = at.num_max_tokens, E = at.num_experts;
  JAX_EP_RETURN_IF_FFI_ERROR(CheckSizes(op, R, K, T, T, 1));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckTimeout(op, at.timeout_ns));
  if (T < 1 || R * T * K > INT32_MAX) {
    return Invalid(op, "num_max_tokens must be positive and num_ranks * num_max_tokens * "
                       "num_topk must fit in int32");
  }
  if (E < 1 || E % R != 0 || E > INT32_MAX) {
    return Invalid(op, "num_experts (" + std::to_string(E) +
                           ") must be a positive multiple of num_ranks (" + std::to_string(R) +
                           ")");
  }
  if (E > kMaxLowLatencyExperts) {
    return Invalid(op, "num_experts (" + std::to_string(E) + ") must be at most " +
                           std::to_string(kMaxLowLatencyExperts) + " on the cuda backend");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, at.buffer_id, device, R,
                                       LowLatencyBytesNeeded(R, T, K, data_row_bytes), g));
  return UseDevice(op, device);
}

// ---------------------------------------------------------------------------
// `weights`: null for the plain dispatch (which has none).
ffi::Error MakeDispatchSend(const char* op, int32_t device, ffi::AnyBuffer x, I32x2 topk_idx,
                            const F32x2* weights, I32x0 rank, U32x0 ticket,
                            const LowLatencyAttrs& at, low_latency::DispatchSendArgs* out) {
  RowType type;
  int64_t x_row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "x", x, &type, &x_row_bytes));
  const int64_t N = x.dimensions()[0], K = at.num_topk, H = x.dimensions()[1];
  // With quantize_fp8 a row crosses as H FP8 bytes and H / 128 float32 scales
  // (jax_ep.fp8.pack_rows' layout), padded to 16 bytes.
  int64_t row_bytes = x_row_bytes;
  if (at.quantize_fp8) {
    if (type != RowType::kBF16 || H % kFp8Block != 0) {
      return Invalid(op, "quantize_fp8 needs bfloat16 x with hidden a multiple of " +
                             std::to_string(kFp8Block) + ", got " + ShapeString(x.dimensions()));
    }
    row_bytes = PackedRowBytes(H, 4 * (H / kFp8Block));
  }
  if (N > at.num_max_tokens) {
    return Invalid(op, "x has " + std::to_string(N) + " tokens, more than num_max_tokens " +
                           std::to_string(at.num_max_tokens));
  }
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "topk_idx", topk_idx, {N, K}));
  const bool weighted = weights != nullptr && at.has_weights;
  if (weights != nullptr) {
    JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "weights", *weights, {weighted ? N : 0, K}));
  }
  low_latency::DispatchSendArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(Decode(op, device, at, row_bytes, &a.group));
  a.x = x.untyped_data();
  a.topk_idx = topk_idx.typed_data();
  a.weights = weighted ? weights->typed_data() : nullptr;
  a.rank = rank.typed_data();
  a.ticket = ticket.typed_data();
  a.num_tokens = N;
  a.num_max_tokens = at.num_max_tokens;
  a.row_bytes = row_bytes;
  a.x_row_bytes = x_row_bytes;
  a.fp8_hidden = at.quantize_fp8 ? H : 0;
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(at.num_experts);
  a.timeout_ns = at.timeout_ns;
  *out = a;
  return ffi::Error::Success();
}

// recv_x (and combine's y) is [E_local * R*T, row]: Python views it as
// [E_local, R*T, row].
ffi::Error CheckExpertRows(const char* op, const char* name, const ffi::AnyBuffer& b,
                           const LowLatencyAttrs& at, RowType* type, int64_t* row_bytes) {
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, name, b, type, row_bytes));
  const int64_t rows = at.num_experts / at.num_ranks * at.num_ranks * at.num_max_tokens;
  if (b.dimensions()[0] != rows) {
    return Invalid(op, std::string(name) + " must have num_experts * num_max_tokens = " +
                           std::to_string(rows) + " rows, got " + ShapeString(b.dimensions()));
  }
  return ffi::Error::Success();
}

// The receive rows: one output of bf16/f32 rows, or (FP8 dispatch, recv_tail
// not [0, 0]) uint8 values [rows, H] and float32 scales [rows, H/128], split
// out of the packed rows that crossed (H + H/32 bytes, padded to 16).
ffi::Error ReceiveRows(const char* op, const ffi::AnyBuffer& recv_x,
                       const ffi::AnyBuffer& recv_tail, const LowLatencyAttrs& at,
                       low_latency::DispatchRecvArgs* a, int64_t* row_bytes) {
  a->recv_x = recv_x.untyped_data();
  if (recv_tail.dimensions().size() == 2 && recv_tail.dimensions()[0] == 0) {
    JAX_EP_RETURN_IF_FFI_ERROR(
        CheckExpertRows(op, "recv_x", recv_x, at, &a->row_type, row_bytes));
    a->head_bytes = *row_bytes;
    a->tail_bytes = 0;
    a->recv_tail = nullptr;
    return ffi::Error::Success();
  }
  const int64_t rows = at.num_experts / at.num_ranks * at.num_ranks * at.num_max_tokens;
  auto h = recv_x.dimensions(), t = recv_tail.dimensions();
  if (recv_x.element_type() != ffi::DataType::U8 ||
      recv_tail.element_type() != ffi::DataType::F32 || h.size() != 2 || t.size() != 2 ||
      h[0] != rows || t[0] != rows || h[1] % 16 != 0) {
    return Invalid(op, "split receive rows must be uint8 [" + std::to_string(rows) +
                           ", H] (H a multiple of 16) and float32 [" + std::to_string(rows) +
                           ", S], got " + ShapeString(h) + " and " + ShapeString(t));
  }
  a->row_type = RowType::kBF16;  // (unused: FP8 rows are never scaled)
  a->head_bytes = h[1];
  a->tail_bytes = 4 * t[1];
  a->recv_tail = recv_tail.untyped_data();
  *row_bytes = PackedRowBytes(a->head_bytes, a->tail_bytes);
  return ffi::Error::Success();
}

ffi::Error MakeDispatchRecv(const char* op, cudaStream_t stream, int32_t device, U32x0 ticket,
                            I32x0 rank, ffi::Result<ffi::AnyBuffer> recv_x,
                            ffi::Result<ffi::AnyBuffer> recv_tail, ffi::Result<I32x1> recv_count,
                            ffi::Result<I32x2> src_slot, ffi::Result<I32x2> recv_slot,
                            const LowLatencyAttrs& at, low_latency::DispatchRecvArgs* out) {
  low_latency::DispatchRecvArgs a{};
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(ReceiveRows(op, *recv_x, *recv_tail, at, &a, &row_bytes));
  const int64_t R = at.num_ranks, El = at.num_experts / R, rows = R * at.num_max_tokens;
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_count", *recv_count, {El}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "src_slot", *src_slot, {El, rows}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_slot", *recv_slot, {rows, at.num_topk}));
  JAX_EP_RETURN_IF_FFI_ERROR(Decode(op, device, at, row_bytes, &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {Bytes(*recv_x), Bytes(*recv_tail),
                                                 Bytes(*recv_count), Bytes(*src_slot),
                                                 Bytes(*recv_slot)}));
  a.ticket = ticket.typed_data();
  a.rank = rank.typed_data();
  a.recv_count = recv_count->typed_data();
  a.src_slot = src_slot->typed_data();
  a.recv_slot = recv_slot->typed_data();
  a.num_max_tokens = at.num_max_tokens;
  a.row_bytes = row_bytes;
  a.num_topk = static_cast<int>(at.num_topk);
  a.num_experts = static_cast<int>(at.num_experts);
  a.timeout_ns = at.timeout_ns;
  *out = a;
  return ffi::Error::Success();
}

ffi::Error MakeCachedDispatchRecv(const char* op, cudaStream_t stream, int32_t device,
                                  U32x0 ticket, I32x2 src_slot, I32x0 rank,
                                  ffi::Result<ffi::AnyBuffer> recv_x, const LowLatencyAttrs& at,
                                  low_latency::DispatchRecvArgs* out) {
  low_latency::DispatchRecvArgs a{};
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(
      CheckExpertRows(op, "recv_x", *recv_x, at, &a.row_type, &row_bytes));
  a.head_bytes = row_bytes;
  const int64_t R = at.num_ranks, El = at.num_experts / R, rows = R * at.num_max_tokens;
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "src_slot", src_slot, {El, rows}));
  JAX_EP_RETURN_IF_FFI_ERROR(Decode(op, device, at, row_bytes, &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {Bytes(*recv_x)}));
  a.ticket = ticket.typed_data();
  a.rank = rank.typed_data();
  a.src_slot_in = src_slot.typed_data();
  a.recv_x = recv_x->untyped_data();
  a.weighted = at.has_weights;
  a.num_max_tokens = at.num_max_tokens;
  a.row_bytes = row_bytes;
  a.num_topk = static_cast<int>(at.num_topk);
  a.num_experts = static_cast<int>(at.num_experts);
  a.timeout_ns = at.timeout_ns;
  *out = a;
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
// y is [E_local * R*T, H]; weights [N, K] are this rank's tokens' (or [0, K]).
ffi::Error MakeCombineSend(const char* op, int32_t device, ffi::AnyBuffer y, F32x2 weights,
                           I32x2 recv_slot, I32x0 rank, U32x0 ticket, const LowLatencyAttrs& at,
                           low_latency::CombineSendArgs* out) {
  low_latency::CombineSendArgs a{};
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(CheckExpertRows(op, "y", y, at, &a.row_type, &row_bytes));
  const int64_t H = y.dimensions()[1], K = at.num_topk, rows = at.num_ranks * at.num_max_tokens;
  const int64_t N = at.has_weights ? weights.dimensions()[0] : 0;
  if (N > at.num_max_tokens) {
    return Invalid(op, "weights has " + std::to_string(N) + " tokens, more than num_max_tokens");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "weights", weights, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectShape(op, "recv_slot", recv_slot, {rows, K}));
  if (H > kMaxLowLatencyHidden) {
    return Invalid(op, "hidden " + std::to_string(H) + " is above the low-latency combine's " +
                           std::to_string(kMaxLowLatencyHidden));
  }
  JAX_EP_RETURN_IF_FFI_ERROR(Decode(op, device, at, 4 * H, &a.group));
  a.y = y.untyped_data();
  a.weights = at.has_weights ? weights.typed_data() : nullptr;
  a.recv_slot = recv_slot.typed_data();
  a.rank = rank.typed_data();
  a.ticket = ticket.typed_data();
  a.num_tokens = N;
  a.num_max_tokens = at.num_max_tokens;
  a.hidden = H;
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(at.num_experts);
  a.timeout_ns = at.timeout_ns;
  *out = a;
  return ffi::Error::Success();
}

ffi::Error MakeCombineRecv(const char* op, cudaStream_t stream, int32_t device, U32x0 ticket,
                           I32x0 rank, ffi::Result<ffi::AnyBuffer> result,
                           const LowLatencyAttrs& at, low_latency::CombineRecvArgs* out) {
  low_latency::CombineRecvArgs a{};
  int64_t row_bytes = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowInfo(op, "out", *result, &a.row_type, &row_bytes));
  const int64_t N = result->dimensions()[0], H = result->dimensions()[1];
  if (N > at.num_max_tokens) {
    return Invalid(op, "out has " + std::to_string(N) + " tokens, more than num_max_tokens");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(Decode(op, device, at, 4 * H, &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {Bytes(*result)}));
  a.ticket = ticket.typed_data();
  a.rank = rank.typed_data();
  a.out = result->untyped_data();
  a.num_tokens = N;
  a.num_max_tokens = at.num_max_tokens;
  a.hidden = H;
  a.num_topk = static_cast<int>(at.num_topk);
  a.timeout_ns = at.timeout_ns;
  *out = a;
  return ffi::Error::Success();
}

ffi::Error Launched(const char* op, cudaError_t err) {
  return err == cudaSuccess ? ffi::Error::Success() : CudaError(op, "launch", err);
}

// The split form's entry points (return_recv_hook): the send's ticket is an
// output, the receive's operand. `after`: any array the send must follow
// (ordering only, never read).
ffi::Error SplitDispatchSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                             I32x2 topk_idx, F32x2 weights, ffi::AnyBuffer after, I32x0 rank,
                             ffi::Result<U32x0> ticket, LowLatencyAttrs at) {
  (void)after;
  const char* op = "jax_ep_ll_dispatch_send";
  low_latency::DispatchSendArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeDispatchSend(op, device, x, topk_idx, &weights, rank, *ticket, at, &a));
  return Launched(op, low_latency::DispatchSend(a, stream));
}

ffi::Error SplitDispatchRecv(cudaStream_t stream, int32_t device, U32x0 ticket, I32x0 rank,
                             ffi::Result<ffi::AnyBuffer> recv_x,
                             ffi::Result<ffi::AnyBuffer> recv_tail,
                             ffi::Result<I32x1> recv_count, ffi::Result<I32x2> src_slot,
                             ffi::Result<I32x2> recv_slot, LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_dispatch_recv";
  low_latency::DispatchRecvArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(MakeDispatchRecv(op, stream, device, ticket, rank, recv_x, recv_tail,
                                              recv_count, src_slot, recv_slot, at, &a));
  return Launched(op, low_latency::DispatchRecv(a, stream));
}

ffi::Error SplitCombineSend(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, F32x2 weights,
                            I32x2 recv_slot, I32x0 rank, ffi::Result<U32x0> ticket,
                            LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_combine_send";
  low_latency::CombineSendArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeCombineSend(op, device, y, weights, recv_slot, rank, *ticket, at, &a));
  return Launched(op, low_latency::CombineSend(a, stream));
}

ffi::Error SplitCombineRecv(cudaStream_t stream, int32_t device, U32x0 ticket, I32x0 rank,
                            ffi::Result<ffi::AnyBuffer> out, LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_combine_recv";
  low_latency::CombineRecvArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(MakeCombineRecv(op, stream, device, ticket, rank, out, at, &a));
  return Launched(op, low_latency::CombineRecv(a, stream));
}

// The plain ops: one custom call and one kernel for send and receive, so that
// XLA (which orders custom calls by data alone) can never put another jax_ep
// op of the Buffer between them. `ticket` is scratch.
ffi::Error FusedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x, I32x2 topk_idx,
                         I32x0 rank, ffi::Result<U32x0> ticket,
                         ffi::Result<ffi::AnyBuffer> recv_x,
                         ffi::Result<ffi::AnyBuffer> recv_tail, ffi::Result<I32x1> recv_count,
                         ffi::Result<I32x2> src_slot, ffi::Result<I32x2> recv_slot,
                         LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_dispatch";
  if (at.has_weights) return Invalid(op, "takes no weights");
  low_latency::DispatchSendArgs s{};
  low_latency::DispatchRecvArgs r{};
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeDispatchSend(op, device, x, topk_idx, nullptr, rank, *ticket, at, &s));
  JAX_EP_RETURN_IF_FFI_ERROR(MakeDispatchRecv(op, stream, device, *ticket, rank, recv_x,
                                              recv_tail, recv_count, src_slot, recv_slot, at, &r));
  if (s.row_bytes != r.row_bytes) {
    return Invalid(op, "x's rows cross as " + std::to_string(s.row_bytes) +
                           " bytes but the receive rows take " + std::to_string(r.row_bytes));
  }
  return Launched(op, low_latency::Dispatch(s, r, stream));
}

ffi::Error FusedCachedDispatch(cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
                               I32x2 topk_idx, F32x2 weights, I32x2 src_slot, I32x0 rank,
                               ffi::Result<U32x0> ticket, ffi::Result<ffi::AnyBuffer> recv_x,
                               LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_cached_dispatch";
  if (at.quantize_fp8) return Invalid(op, "does not quantize");
  low_latency::DispatchSendArgs s{};
  low_latency::DispatchRecvArgs r{};
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeDispatchSend(op, device, x, topk_idx, &weights, rank, *ticket, at, &s));
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeCachedDispatchRecv(op, stream, device, *ticket, src_slot, rank, recv_x, at, &r));
  return Launched(op, low_latency::Dispatch(s, r, stream));
}

ffi::Error FusedCombine(cudaStream_t stream, int32_t device, ffi::AnyBuffer y, F32x2 weights,
                        I32x2 recv_slot, I32x0 rank, ffi::Result<U32x0> ticket,
                        ffi::Result<ffi::AnyBuffer> out, LowLatencyAttrs at) {
  const char* op = "jax_ep_ll_combine";
  low_latency::CombineSendArgs s{};
  low_latency::CombineRecvArgs r{};
  JAX_EP_RETURN_IF_FFI_ERROR(
      MakeCombineSend(op, device, y, weights, recv_slot, rank, *ticket, at, &s));
  JAX_EP_RETURN_IF_FFI_ERROR(MakeCombineRecv(op, stream, device, *ticket, rank, out, at, &r));
  return Launched(op, low_latency::Combine(s, r, stream));
}

}  // namespace
}  // namespace jax_ep

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchSend, jax_ep::SplitDispatchSend,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()  // x
        .Arg<jax_ep::I32x2>()   // topk_idx
        .Arg<jax_ep::F32x2>()   // weights, or [0, K]
        .Arg<ffi::AnyBuffer>()  // after (ordering only)
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<jax_ep::U32x0>()   // ticket
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatchRecv, jax_ep::SplitDispatchRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<jax_ep::U32x0>()   // ticket
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<ffi::AnyBuffer>()  // recv_x
        .Ret<ffi::AnyBuffer>()  // recv_tail (FP8 scales), or [0, 0]
        .Ret<jax_ep::I32x1>()   // recv_count
        .Ret<jax_ep::I32x2>()   // src_slot
        .Ret<jax_ep::I32x2>()   // recv_slot
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineSend, jax_ep::SplitCombineSend,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()  // y
        .Arg<jax_ep::F32x2>()   // weights, or [0, K]
        .Arg<jax_ep::I32x2>()   // recv_slot (the handle's)
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<jax_ep::U32x0>()   // ticket
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombineRecv, jax_ep::SplitCombineRecv,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<jax_ep::U32x0>()   // ticket
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<ffi::AnyBuffer>()  // out
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyDispatch, jax_ep::FusedDispatch,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()  // x
        .Arg<jax_ep::I32x2>()   // topk_idx
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<jax_ep::U32x0>()   // ticket (scratch)
        .Ret<ffi::AnyBuffer>()  // recv_x
        .Ret<ffi::AnyBuffer>()  // recv_tail (FP8 scales), or [0, 0]
        .Ret<jax_ep::I32x1>()   // recv_count
        .Ret<jax_ep::I32x2>()   // src_slot
        .Ret<jax_ep::I32x2>()   // recv_slot
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCachedDispatch, jax_ep::FusedCachedDispatch,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()  // x
        .Arg<jax_ep::I32x2>()   // topk_idx (the dispatch's)
        .Arg<jax_ep::F32x2>()   // weights, or [0, K]
        .Arg<jax_ep::I32x2>()   // src_slot (the handle's)
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<jax_ep::U32x0>()   // ticket (scratch)
        .Ret<ffi::AnyBuffer>()  // recv_x
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLowLatencyCombine, jax_ep::FusedCombine,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()  // y
        .Arg<jax_ep::F32x2>()   // weights, or [0, K]
        .Arg<jax_ep::I32x2>()   // recv_slot (the handle's)
        .Arg<jax_ep::I32x0>()   // rank
        .Ret<jax_ep::U32x0>()   // ticket (scratch)
        .Ret<ffi::AnyBuffer>()  // out
        .Attrs<jax_ep::LowLatencyAttrs>(),
    {ffi::Traits::kCmdBufferCompatible});
