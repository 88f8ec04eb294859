// XLA FFI handlers of jax_ep: decode, validate, launch. No host sync, no
// allocation; everything is enqueued on XLA's stream. The device-side rank
// and num_recv_tokens operands are read by the kernels, never by the host.
#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

#include "buffer_layout.h"
#include "kernels.h"
#include "runtime.h"

namespace ffi = xla::ffi;

namespace jax_ep {
namespace {

#define JAX_EP_RETURN_IF_FFI_ERROR(expr)   \
  do {                                     \
    ffi::Error jax_ep_e_ = (expr);         \
    if (jax_ep_e_.failure()) return jax_ep_e_; \
  } while (0)

ffi::Error Invalid(const char* op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument,
                    std::string(op) + ": " + msg);
}

ffi::Error CudaError(const char* op, const char* what, cudaError_t err) {
  return ffi::Error(ffi::ErrorCode::kInternal,
                    std::string(op) + ": " + what + " failed: " +
                        cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                        ")");
}

const char* DtypeName(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::PRED: return "bool";
    case ffi::DataType::S32: return "int32";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::BF16: return "bfloat16";
    default: return "unsupported dtype";
  }
}

std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) {
    if (i) s += ",";
    s += std::to_string(dims[i]);
  }
  return s + "]";
}

// Checks dtype and exact shape of one operand/result.
ffi::Error Expect(const char* op, const char* name, const ffi::AnyBuffer& b,
                  ffi::DataType dtype, std::initializer_list<int64_t> shape) {
  if (b.element_type() != dtype) {
    return Invalid(op, std::string(name) + " must be " + DtypeName(dtype) +
                           ", got " + DtypeName(b.element_type()));
  }
  auto dims = b.dimensions();
  bool ok = dims.size() == shape.size();
  size_t k = 0;
  for (int64_t want : shape) {
    if (!ok) break;
    ok = dims[k++] == want;
  }
  if (!ok) {
    std::string want = "[";
    k = 0;
    for (int64_t w : shape) want += (k++ ? "," : "") + std::to_string(w);
    return Invalid(op, std::string(name) + " must have shape " + want + "]" +
                           ", got " + ShapeString(dims));
  }
  return ffi::Error::Success();
}

ffi::Error ExpectRank(const char* op, const char* name, const ffi::AnyBuffer& b,
                      size_t rank) {
  if (b.dimensions().size() != rank) {
    return Invalid(op, std::string(name) + " must have rank " +
                           std::to_string(rank) + ", got shape " +
                           ShapeString(b.dimensions()));
  }
  return ffi::Error::Success();
}

// Row dtype of x / y: bf16 or f32, and the row must be whole 16-byte vectors.
ffi::Error RowDtype(const char* op, const char* name, const ffi::AnyBuffer& b,
                    int64_t hidden, int64_t* elt_bytes) {
  const ffi::DataType t = b.element_type();
  if (t != ffi::DataType::BF16 && t != ffi::DataType::F32) {
    return Invalid(op, std::string(name) + " must be bfloat16 or float32, got " +
                           DtypeName(t));
  }
  *elt_bytes = t == ffi::DataType::BF16 ? 2 : 4;
  if ((hidden * *elt_bytes) % 16 != 0) {
    return Invalid(op, "hidden * element bytes must be a multiple of 16, got " +
                           std::to_string(hidden) + " * " +
                           std::to_string(*elt_bytes));
  }
  return ffi::Error::Success();
}

ffi::Error Aligned16(const char* op, const char* name, const ffi::AnyBuffer& b) {
  if (b.element_count() != 0 &&
      reinterpret_cast<uintptr_t>(b.untyped_data()) % 16 != 0) {
    return Invalid(op, std::string(name) + " is not 16-byte aligned");
  }
  return ffi::Error::Success();
}

ffi::Error CheckCommon(const char* op, int64_t R, int64_t K, int64_t N,
                       int64_t M, int64_t num_sms) {
  if (R < 1 || R > kMaxRanks) {
    return Invalid(op, "num_ranks must be in [1, 8], got " + std::to_string(R));
  }
  if (K < 1 || K > kMaxTopK) {
    return Invalid(op, "num_topk must be in [1, 32], got " + std::to_string(K));
  }
  if (N > INT32_MAX || M > INT32_MAX) {
    return Invalid(op, "num_tokens and num_worst_tokens must fit in int32");
  }
  if (num_sms < 1 || num_sms > 65535) {
    return Invalid(op, "num_sms must be in [1, 65535], got " +
                           std::to_string(num_sms));
  }
  return ffi::Error::Success();
}

// Finds the group of (buffer_id, device) and checks it can hold this call.
ffi::Error FindGroup(const char* op, int64_t buffer_id, int32_t device,
                     int64_t R, int64_t needed, GroupView* view) {
  GroupEntry e;
  if (!LookupGroup(buffer_id, device, &e)) {
    return Invalid(op, "unknown buffer_id " + std::to_string(buffer_id) +
                           " on device " + std::to_string(device) +
                           " (register_group was not called here)");
  }
  if (e.num_ranks != R) {
    return Invalid(op, "num_ranks " + std::to_string(R) +
                           " from the operands != registered num_ranks " +
                           std::to_string(e.num_ranks));
  }
  if (needed > e.num_bytes) {
    return Invalid(op, "communication buffer too small: needed " +
                           std::to_string(needed) + " bytes, have " +
                           std::to_string(e.num_bytes));
  }
  for (int d = 0; d < kMaxRanks; ++d) view->peers[d] = e.peers[d];
  view->num_ranks = e.num_ranks;
  view->registered_rank = e.rank;
  view->fault_record = e.fault_record;
  return ffi::Error::Success();
}

// Our statically linked runtime keeps its own notion of the current device;
// make it match the device that owns XLA's stream before launching.
ffi::Error UseStreamDevice(const char* op, cudaStream_t stream) {
  int dev = -1, cur = -1;
  cudaError_t err = cudaStreamGetDevice(stream, &dev);
  if (err != cudaSuccess) return CudaError(op, "cudaStreamGetDevice", err);
  err = cudaGetDevice(&cur);
  if (err != cudaSuccess) return CudaError(op, "cudaGetDevice", err);
  if (cur != dev) {
    err = cudaSetDevice(dev);
    if (err != cudaSuccess) return CudaError(op, "cudaSetDevice", err);
  }
  return ffi::Error::Success();
}

// Test aid: with JAX_EP_DEBUG_POISON=1 every output is filled with 0xFF bytes
// before the kernels run, so a row they fail to write cannot pass for a zero
// left by an earlier allocation.
bool PoisonOutputs() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_EP_DEBUG_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

ffi::Error Poison(const char* op, cudaStream_t stream,
                  std::initializer_list<ffi::AnyBuffer*> outputs) {
  if (!PoisonOutputs()) return ffi::Error::Success();
  for (ffi::AnyBuffer* b : outputs) {
    cudaError_t err = cudaMemsetAsync(b->untyped_data(), 0xFF, b->size_bytes(), stream);
    if (err != cudaSuccess) return CudaError(op, "poison memset", err);
  }
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error LayoutImpl(cudaStream_t stream, ffi::AnyBuffer topk_idx,
                      ffi::Result<ffi::AnyBuffer> num_tokens_per_rank,
                      ffi::Result<ffi::AnyBuffer> num_tokens_per_expert,
                      ffi::Result<ffi::AnyBuffer> is_token_in_rank,
                      int64_t num_experts, int64_t num_ranks) {
  const char* op = "jax_ep_layout";
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "topk_idx", topk_idx, 2));
  const int64_t N = topk_idx.dimensions()[0], K = topk_idx.dimensions()[1];
  const int64_t E = num_experts, R = num_ranks;
  if (R < 1 || E < 1 || E % R != 0 || E > INT32_MAX) {
    return Invalid(op, "num_experts (" + std::to_string(E) +
                           ") must be a positive multiple of num_ranks (" +
                           std::to_string(R) + ")");
  }
  if (N * (K > R ? K : R) > (int64_t{1} << 40)) {
    return Invalid(op, "problem too large");
  }
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "topk_idx", topk_idx, ffi::DataType::S32, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_tokens_per_rank", *num_tokens_per_rank,
                                    ffi::DataType::S32, {R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_tokens_per_expert", *num_tokens_per_expert,
                                    ffi::DataType::S32, {E}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "is_token_in_rank", *is_token_in_rank,
                                    ffi::DataType::PRED, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(UseStreamDevice(op, stream));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {&*num_tokens_per_rank, &*num_tokens_per_expert, &*is_token_in_rank}));
  cudaError_t err = LaunchLayout(
      static_cast<const int32_t*>(topk_idx.untyped_data()), N,
      static_cast<int>(K), static_cast<int>(E), static_cast<int>(R),
      static_cast<int32_t*>(num_tokens_per_rank->untyped_data()),
      static_cast<int32_t*>(num_tokens_per_expert->untyped_data()),
      static_cast<bool*>(is_token_in_rank->untyped_data()), stream);
  if (err != cudaSuccess) return CudaError(op, "layout launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error DispatchImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer x,
    ffi::AnyBuffer topk_idx, ffi::AnyBuffer topk_weights,
    ffi::AnyBuffer is_token_in_rank, ffi::AnyBuffer num_tokens_per_rank,
    ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> recv_x,
    ffi::Result<ffi::AnyBuffer> recv_topk_idx,
    ffi::Result<ffi::AnyBuffer> recv_topk_weights,
    ffi::Result<ffi::AnyBuffer> num_recv_tokens_per_expert,
    ffi::Result<ffi::AnyBuffer> send_pos, ffi::Result<ffi::AnyBuffer> recv_src_idx,
    ffi::Result<ffi::AnyBuffer> recv_src_rank,
    ffi::Result<ffi::AnyBuffer> num_recv_tokens, int64_t buffer_id,
    int64_t num_experts, int64_t num_sms, int64_t timeout_ns) {
  const char* op = "jax_ep_dispatch";
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "x", x, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "topk_idx", topk_idx, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "is_token_in_rank", is_token_in_rank, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "recv_x", *recv_x, 2));
  const int64_t N = x.dimensions()[0], H = x.dimensions()[1];
  const int64_t K = topk_idx.dimensions()[1];
  const int64_t R = is_token_in_rank.dimensions()[1];
  const int64_t M = recv_x->dimensions()[0];
  int64_t elt = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowDtype(op, "x", x, H, &elt));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckCommon(op, R, K, N, M, num_sms));
  const int64_t E = num_experts;
  if (E < 1 || E % R != 0 || E > INT32_MAX) {
    return Invalid(op, "num_experts (" + std::to_string(E) +
                           ") must be a positive multiple of num_ranks (" +
                           std::to_string(R) + ")");
  }
  const int64_t E_local = E / R;
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "topk_idx", topk_idx, ffi::DataType::S32, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "topk_weights", topk_weights, ffi::DataType::F32, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "is_token_in_rank", is_token_in_rank,
                                    ffi::DataType::PRED, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_tokens_per_rank", num_tokens_per_rank,
                                    ffi::DataType::S32, {R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "rank", rank, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_x", *recv_x, x.element_type(), {M, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_topk_idx", *recv_topk_idx, ffi::DataType::S32, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_topk_weights", *recv_topk_weights,
                                    ffi::DataType::F32, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_recv_tokens_per_expert", *num_recv_tokens_per_expert,
                                    ffi::DataType::S32, {E_local}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "send_pos", *send_pos, ffi::DataType::S32, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_src_idx", *recv_src_idx, ffi::DataType::S32, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_src_rank", *recv_src_rank, ffi::DataType::S32, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_recv_tokens", *num_recv_tokens, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "x", x));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "recv_x", *recv_x));

  DispatchArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, elt), &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseStreamDevice(op, stream));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {&*recv_x, &*recv_topk_idx, &*recv_topk_weights,
      &*num_recv_tokens_per_expert, &*send_pos, &*recv_src_idx, &*recv_src_rank, &*num_recv_tokens}));
  a.x = x.untyped_data();
  a.topk_idx = static_cast<const int32_t*>(topk_idx.untyped_data());
  a.topk_weights = static_cast<const float*>(topk_weights.untyped_data());
  a.is_token_in_rank = static_cast<const bool*>(is_token_in_rank.untyped_data());
  a.num_tokens_per_rank = static_cast<const int32_t*>(num_tokens_per_rank.untyped_data());
  a.rank = static_cast<const int32_t*>(rank.untyped_data());
  a.recv_x = recv_x->untyped_data();
  a.recv_topk_idx = static_cast<int32_t*>(recv_topk_idx->untyped_data());
  a.recv_topk_weights = static_cast<float*>(recv_topk_weights->untyped_data());
  a.num_recv_tokens_per_expert = static_cast<int32_t*>(num_recv_tokens_per_expert->untyped_data());
  a.send_pos = static_cast<int32_t*>(send_pos->untyped_data());
  a.recv_src_idx = static_cast<int32_t*>(recv_src_idx->untyped_data());
  a.recv_src_rank = static_cast<int32_t*>(recv_src_rank->untyped_data());
  a.num_recv_tokens = static_cast<int32_t*>(num_recv_tokens->untyped_data());
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = H * elt;
  a.elt_bytes = elt;
  a.num_topk = static_cast<int>(K);
  a.num_experts = static_cast<int>(E);
  a.num_sms = static_cast<int>(num_sms);
  a.timeout_ns = timeout_ns;
  cudaError_t err = LaunchDispatch(a, stream);
  if (err != cudaSuccess) return CudaError(op, "dispatch launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error CachedDispatchImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer x, ffi::AnyBuffer weights,
    ffi::AnyBuffer send_pos, ffi::AnyBuffer num_recv_tokens, ffi::AnyBuffer rank,
    ffi::Result<ffi::AnyBuffer> recv_x, ffi::Result<ffi::AnyBuffer> recv_weights,
    int64_t buffer_id, int64_t num_sms, int64_t timeout_ns, int64_t has_weights) {
  const char* op = "jax_ep_cached_dispatch";
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "x", x, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "weights", weights, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "send_pos", send_pos, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "recv_x", *recv_x, 2));
  const int64_t N = x.dimensions()[0], H = x.dimensions()[1];
  const int64_t K = weights.dimensions()[1];
  const int64_t R = send_pos.dimensions()[1];
  const int64_t M = recv_x->dimensions()[0];
  int64_t elt = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowDtype(op, "x", x, H, &elt));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckCommon(op, R, K, N, M, num_sms));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "weights", weights, ffi::DataType::F32, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "send_pos", send_pos, ffi::DataType::S32, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_recv_tokens", num_recv_tokens, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "rank", rank, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_x", *recv_x, x.element_type(), {M, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_weights", *recv_weights, ffi::DataType::F32, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "x", x));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "recv_x", *recv_x));

  CachedDispatchArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, elt), &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseStreamDevice(op, stream));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {&*recv_x, &*recv_weights}));
  a.x = x.untyped_data();
  a.weights = static_cast<const float*>(weights.untyped_data());
  a.send_pos = static_cast<const int32_t*>(send_pos.untyped_data());
  a.num_recv_tokens = static_cast<const int32_t*>(num_recv_tokens.untyped_data());
  a.rank = static_cast<const int32_t*>(rank.untyped_data());
  a.recv_x = recv_x->untyped_data();
  a.recv_weights = static_cast<float*>(recv_weights->untyped_data());
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = H * elt;
  a.elt_bytes = elt;
  a.num_topk = static_cast<int>(K);
  a.has_weights = has_weights != 0;
  a.num_sms = static_cast<int>(num_sms);
  a.timeout_ns = timeout_ns;
  cudaError_t err = LaunchCachedDispatch(a, stream);
  if (err != cudaSuccess) return CudaError(op, "cached dispatch launch", err);
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------
ffi::Error CombineImpl(
    cudaStream_t stream, int32_t device, ffi::AnyBuffer y, ffi::AnyBuffer weights,
    ffi::AnyBuffer send_pos, ffi::AnyBuffer recv_src_idx,
    ffi::AnyBuffer recv_src_rank, ffi::AnyBuffer num_recv_tokens,
    ffi::AnyBuffer rank, ffi::Result<ffi::AnyBuffer> combined_x,
    ffi::Result<ffi::AnyBuffer> combined_weights, int64_t buffer_id,
    int64_t num_sms, int64_t timeout_ns, int64_t has_weights) {
  const char* op = "jax_ep_combine";
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "y", y, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "weights", weights, 2));
  JAX_EP_RETURN_IF_FFI_ERROR(ExpectRank(op, "send_pos", send_pos, 2));
  const int64_t M = y.dimensions()[0], H = y.dimensions()[1];
  const int64_t K = weights.dimensions()[1];
  const int64_t N = send_pos.dimensions()[0], R = send_pos.dimensions()[1];
  int64_t elt = 0;
  JAX_EP_RETURN_IF_FFI_ERROR(RowDtype(op, "y", y, H, &elt));
  JAX_EP_RETURN_IF_FFI_ERROR(CheckCommon(op, R, K, N, M, num_sms));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "weights", weights, ffi::DataType::F32, {M, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "send_pos", send_pos, ffi::DataType::S32, {N, R}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_src_idx", recv_src_idx, ffi::DataType::S32, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "recv_src_rank", recv_src_rank, ffi::DataType::S32, {M}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "num_recv_tokens", num_recv_tokens, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "rank", rank, ffi::DataType::S32, {}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "combined_x", *combined_x, y.element_type(), {N, H}));
  JAX_EP_RETURN_IF_FFI_ERROR(Expect(op, "combined_weights", *combined_weights,
                                    ffi::DataType::F32, {N, K}));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "y", y));
  JAX_EP_RETURN_IF_FFI_ERROR(Aligned16(op, "combined_x", *combined_x));

  CombineArgs a{};
  JAX_EP_RETURN_IF_FFI_ERROR(FindGroup(op, buffer_id, device, R,
                                       BufferBytesNeeded(R, N, M, H, K, elt), &a.group));
  JAX_EP_RETURN_IF_FFI_ERROR(UseStreamDevice(op, stream));
  JAX_EP_RETURN_IF_FFI_ERROR(Poison(op, stream, {&*combined_x, &*combined_weights}));
  a.y = y.untyped_data();
  a.weights = static_cast<const float*>(weights.untyped_data());
  a.send_pos = static_cast<const int32_t*>(send_pos.untyped_data());
  a.recv_src_idx = static_cast<const int32_t*>(recv_src_idx.untyped_data());
  a.recv_src_rank = static_cast<const int32_t*>(recv_src_rank.untyped_data());
  a.num_recv_tokens = static_cast<const int32_t*>(num_recv_tokens.untyped_data());
  a.rank = static_cast<const int32_t*>(rank.untyped_data());
  a.combined_x = combined_x->untyped_data();
  a.combined_weights = static_cast<float*>(combined_weights->untyped_data());
  a.dtype = elt == 2 ? CombineDtype::kBF16 : CombineDtype::kF32;
  a.num_tokens = N;
  a.num_recv_rows = M;
  a.row_bytes = H * elt;
  a.elt_bytes = elt;
  a.num_topk = static_cast<int>(K);
  a.has_weights = has_weights != 0;
  a.num_sms = static_cast<int>(num_sms);
  a.timeout_ns = timeout_ns;
  cudaError_t err = LaunchCombine(a, stream);
  if (err != cudaSuccess) return CudaError(op, "combine launch", err);
  return ffi::Error::Success();
}

}  // namespace
}  // namespace jax_ep

// Exported handler symbols (wrapped into capsules by cuda_bindings.cc).
// Not kCmdBufferCompatible: the barriers must not be frozen into CUDA graphs.
XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpLayout, jax_ep::LayoutImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Arg<ffi::AnyBuffer>()   // topk_idx
        .Ret<ffi::AnyBuffer>()   // num_tokens_per_rank
        .Ret<ffi::AnyBuffer>()   // num_tokens_per_expert
        .Ret<ffi::AnyBuffer>()   // is_token_in_rank
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("num_ranks"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpDispatch, jax_ep::DispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()   // x
        .Arg<ffi::AnyBuffer>()   // topk_idx
        .Arg<ffi::AnyBuffer>()   // topk_weights
        .Arg<ffi::AnyBuffer>()   // is_token_in_rank
        .Arg<ffi::AnyBuffer>()   // num_tokens_per_rank
        .Arg<ffi::AnyBuffer>()   // rank
        .Ret<ffi::AnyBuffer>()   // recv_x
        .Ret<ffi::AnyBuffer>()   // recv_topk_idx
        .Ret<ffi::AnyBuffer>()   // recv_topk_weights
        .Ret<ffi::AnyBuffer>()   // num_recv_tokens_per_expert
        .Ret<ffi::AnyBuffer>()   // send_pos
        .Ret<ffi::AnyBuffer>()   // recv_src_idx
        .Ret<ffi::AnyBuffer>()   // recv_src_rank
        .Ret<ffi::AnyBuffer>()   // num_recv_tokens
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_experts")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("timeout_ns"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCachedDispatch, jax_ep::CachedDispatchImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()   // x
        .Arg<ffi::AnyBuffer>()   // weights
        .Arg<ffi::AnyBuffer>()   // send_pos
        .Arg<ffi::AnyBuffer>()   // num_recv_tokens
        .Arg<ffi::AnyBuffer>()   // rank
        .Ret<ffi::AnyBuffer>()   // recv_x
        .Ret<ffi::AnyBuffer>()   // recv_weights
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("timeout_ns")
        .Attr<int64_t>("has_weights"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(
    JaxEpCombine, jax_ep::CombineImpl,
    ffi::Ffi::Bind()
        .Ctx<ffi::PlatformStream<cudaStream_t>>()
        .Ctx<ffi::DeviceOrdinal>()
        .Arg<ffi::AnyBuffer>()   // y
        .Arg<ffi::AnyBuffer>()   // weights
        .Arg<ffi::AnyBuffer>()   // send_pos
        .Arg<ffi::AnyBuffer>()   // recv_src_idx
        .Arg<ffi::AnyBuffer>()   // recv_src_rank
        .Arg<ffi::AnyBuffer>()   // num_recv_tokens
        .Arg<ffi::AnyBuffer>()   // rank
        .Ret<ffi::AnyBuffer>()   // combined_x
        .Ret<ffi::AnyBuffer>()   // combined_weights
        .Attr<int64_t>("buffer_id")
        .Attr<int64_t>("num_sms")
        .Attr<int64_t>("timeout_ns")
        .Attr<int64_t>("has_weights"));
