// Helpers every jax_ep FFI handler uses: errors, shape checks, the group
// lookup, the stream's device, output poisoning. Handlers stay thin: decode
// (typed operands and one attribute struct per op family), check the
// relations between operands, launch.
#pragma once

#include <cstdint>
#include <cstdlib>
#include <initializer_list>
#include <string>

#include <cuda_runtime_api.h>

#include "xla/ffi/api/ffi.h"

#include "buffer_layout.h"
#include "kernels.h"
#include "runtime.h"

namespace jax_ep {

namespace ffi = xla::ffi;

#define JAX_EP_RETURN_IF_FFI_ERROR(expr)        \
  do {                                          \
    ffi::Error jax_ep_e_ = (expr);              \
    if (jax_ep_e_.failure()) return jax_ep_e_;  \
  } while (0)

inline ffi::Error Invalid(const char* op, const std::string& msg) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, std::string(op) + ": " + msg);
}

inline ffi::Error CudaError(const char* op, const char* what, cudaError_t err) {
  return ffi::Error(ffi::ErrorCode::kInternal, std::string(op) + ": " + what + " failed: " +
                                                   cudaGetErrorName(err) + " (" +
                                                   cudaGetErrorString(err) + ")");
}

// Typed operands (also keep commas out of the binding macros).
using I32x0 = ffi::BufferR0<ffi::S32>;
using I32x1 = ffi::Buffer<ffi::S32, 1>;
using I32x2 = ffi::Buffer<ffi::S32, 2>;
using F32x2 = ffi::Buffer<ffi::F32, 2>;
using PredX2 = ffi::Buffer<ffi::PRED, 2>;
using U32x0 = ffi::BufferR0<ffi::U32>;
using U64x0 = ffi::BufferR0<ffi::U64>;

inline int64_t EltBytes(RowType t) { return t == RowType::kBF16 ? 2 : 4; }

inline ffi::Error CheckTimeout(const char* op, int64_t timeout_ns) {
  if (timeout_ns <= 0) {
    return Invalid(op, "timeout_ns must be positive, got " + std::to_string(timeout_ns));
  }
  return ffi::Error::Success();
}

inline std::string ShapeString(ffi::AnyBuffer::Dimensions dims) {
  std::string s = "[";
  for (size_t i = 0; i < dims.size(); ++i) s += (i ? "," : "") + std::to_string(dims[i]);
  return s + "]";
}

// `name` must have exactly `shape` (dtype and rank are checked by the binding).
template <typename Buf>
ffi::Error ExpectShape(const char* op, const char* name, const Buf& b,
                       std::initializer_list<int64_t> shape) {
  auto dims = b.dimensions();
  bool ok = dims.size() == shape.size();
  size_t k = 0;
  for (int64_t want : shape) {
    if (!ok) break;
    ok = dims[k++] == want;
  }
  if (ok) return ffi::Error::Success();
  std::string want = "[";
  k = 0;
  for (int64_t w : shape) want += (k++ ? "," : "") + std::to_string(w);
  return Invalid(op, std::string(name) + " must have shape " + want + "], got " +
                         ShapeString(dims));
}

// The one dtype dispatch for token rows: bfloat16 or float32, whole 16-byte
// vectors per row, 16-byte aligned.
inline ffi::Error RowInfo(const char* op, const char* name, const ffi::AnyBuffer& b,
                          RowType* type, int64_t* row_bytes) {
  if (b.dimensions().size() != 2) {
    return Invalid(op, std::string(name) + " must have rank 2, got shape " +
                           ShapeString(b.dimensions()));
  }
  const int64_t hidden = b.dimensions()[1];
  int64_t elt = 0;
  switch (b.element_type()) {
    case ffi::DataType::BF16: *type = RowType::kBF16; elt = 2; break;
    case ffi::DataType::F32: *type = RowType::kF32; elt = 4; break;
    default: return Invalid(op, std::string(name) + " must be bfloat16 or float32");
  }
  *row_bytes = hidden * elt;
  if (*row_bytes % 16 != 0) {
    return Invalid(op, "hidden * element bytes must be a multiple of 16, got " +
                           std::to_string(hidden) + " * " + std::to_string(elt));
  }
  if (b.element_count() != 0 && reinterpret_cast<uintptr_t>(b.untyped_data()) % 16 != 0) {
    return Invalid(op, std::string(name) + " is not 16-byte aligned");
  }
  return ffi::Error::Success();
}

inline ffi::Error CheckSizes(const char* op, int64_t R, int64_t K, int64_t N, int64_t M,
                             int64_t num_sms) {
  if (R < 1 || R > kMaxRanks) {
    return Invalid(op, "num_ranks must be in [1, " + std::to_string(kMaxRanks) + "], got " +
                           std::to_string(R));
  }
  if (K < 1 || K > kMaxTopK) {
    return Invalid(op, "num_topk must be in [1, " + std::to_string(kMaxTopK) + "], got " +
                           std::to_string(K));
  }
  if (N > INT32_MAX || M > INT32_MAX || (R - 1) * N > INT32_MAX) {
    return Invalid(op, "num_tokens, num_worst_tokens and (num_ranks - 1) * num_tokens must "
                       "fit in int32");
  }
  if (num_sms < 1 || num_sms > kMaxBlocks) {
    return Invalid(op, "num_sms must be in [1, " + std::to_string(kMaxBlocks) + "], got " +
                           std::to_string(num_sms));
  }
  return ffi::Error::Success();
}

// Our statically linked runtime keeps its own notion of the current device;
// make it XLA's device (the FFI device ordinal is the CUDA ordinal) before
// launching. The stream is not queried: XLA may be capturing it into a CUDA
// graph, where stream queries are refused.
inline ffi::Error UseDevice(const char* op, int32_t device) {
  int cur = -1;
  cudaError_t err = cudaGetDevice(&cur);
  if (err != cudaSuccess) return CudaError(op, "cudaGetDevice", err);
  if (cur != device) {
    err = cudaSetDevice(device);
    if (err != cudaSuccess) return CudaError(op, "cudaSetDevice", err);
  }
  return ffi::Error::Success();
}

// The group of (buffer_id, device): registered, of R ranks, large enough.
inline ffi::Error FindGroup(const char* op, int64_t buffer_id, int32_t device, int64_t R,
                            int64_t needed, GroupView* view) {
  GroupEntry e;
  if (!LookupGroup(buffer_id, device, &e)) {
    return Invalid(op, "unknown buffer_id " + std::to_string(buffer_id) + " on device " +
                           std::to_string(device) +
                           " (the Buffer was destroyed, or register_group was not called here)");
  }
  if (e.num_ranks != R) {
    return Invalid(op, "num_ranks " + std::to_string(R) + " from the operands != registered "
                       "num_ranks " + std::to_string(e.num_ranks));
  }
  if (needed > e.num_bytes) {
    return Invalid(op, "communication buffer too small: needed " + std::to_string(needed) +
                           " bytes, have " + std::to_string(e.num_bytes));
  }
  for (int d = 0; d < kMaxRanks; ++d) view->peers[d] = e.peers[d];
  view->num_ranks = e.num_ranks;
  view->rank = e.rank;
  view->ranks_on_device = e.ranks_on_device;
  view->fault_record = e.fault_record;
  view->alive = e.alive;
  view->buffer_id = e.buffer_id;
  return ffi::Error::Success();
}

// Test aid: with JAX_EP_DEBUG_POISON=1 every output is filled with 0xFF bytes
// before the kernels run, so a row they fail to write cannot pass for a zero
// left by an earlier allocation.
inline bool PoisonOutputs() {
  static const bool on = [] {
    const char* v = std::getenv("JAX_EP_DEBUG_POISON");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

inline ffi::Error Poison(const char* op, cudaStream_t stream,
                         std::initializer_list<std::pair<void*, size_t>> outputs) {
  if (!PoisonOutputs()) return ffi::Error::Success();
  for (const auto& [ptr, bytes] : outputs) {
    cudaError_t err = cudaMemsetAsync(ptr, 0xFF, bytes, stream);
    if (err != cudaSuccess) return CudaError(op, "poison memset", err);
  }
  return ffi::Error::Success();
}

template <typename Buf>
std::pair<void*, size_t> Bytes(Buf& b) {
  return {b.untyped_data(), b.size_bytes()};
}

}  // namespace jax_ep
