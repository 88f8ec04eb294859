// Host launchers for the jax_ep kernels. Every launcher enqueues its kernels
// on `stream`, never synchronises the host, and returns the first CUDA error
// (launch errors included) or cudaSuccess.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "buffer_layout.h"

namespace jax_ep {

// Communication-group view used by the kernels: every rank's buffer base in
// rank order (self included) as mapped on this GPU.
struct GroupView {
  char* peers[kMaxRanks];
  int num_ranks;
  int registered_rank;  // the barrier checks the device rank operand against it
  // Host-mapped int32[4] {state, op, rank, peer}: a timed-out barrier records
  // itself here before it traps, so the host can name the op and ranks even
  // when the kernel's printf is lost with the CUDA context (runtime.h).
  int* fault_record;
};

// Forces the module holding every jax_ep kernel to load on the current
// device. With CUDA lazy loading, the first launch of a kernel loads it and
// may wait for the context to go idle, which can never happen while one of
// our barrier kernels spins on the same context waiting for a peer whose
// launch is stuck behind that load. RegisterGroup calls this up front.
cudaError_t PreloadKernels();

// jax_ep_layout: purely local. Ids outside [0, num_experts) are ignored.
cudaError_t LaunchLayout(const int32_t* topk_idx, int64_t num_tokens,
                         int num_topk, int num_experts, int num_ranks,
                         int32_t* num_tokens_per_rank,
                         int32_t* num_tokens_per_expert, bool* is_token_in_rank,
                         cudaStream_t stream);

struct DispatchArgs {
  GroupView group;
  // operands
  const void* x;                    // [N, H] (row_bytes per row)
  const int32_t* topk_idx;          // [N, K]
  const float* topk_weights;        // [N, K]
  const bool* is_token_in_rank;     // [N, R]
  const int32_t* num_tokens_per_rank;  // [R]
  const int32_t* rank;              // [] device scalar
  // results
  void* recv_x;                     // [M, H]
  int32_t* recv_topk_idx;           // [M, K]
  float* recv_topk_weights;         // [M, K]
  int32_t* num_recv_tokens_per_expert;  // [E_local]
  int32_t* send_pos;                // [N, R]
  int32_t* recv_src_idx;            // [M]
  int32_t* recv_src_rank;           // [M]
  int32_t* num_recv_tokens;         // []
  // sizes
  int64_t num_tokens;      // N
  int64_t num_recv_rows;   // M
  int64_t row_bytes;       // H * elt_bytes, multiple of 16
  int64_t elt_bytes;
  int num_topk;            // K <= 32
  int num_experts;         // E (E % R == 0)
  int num_sms;
  int64_t timeout_ns;
};
cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream);

struct CachedDispatchArgs {
  GroupView group;
  const void* x;                 // [N, H]
  const float* weights;          // [N, K]
  const int32_t* send_pos;       // [N, R]
  const int32_t* num_recv_tokens;  // []
  const int32_t* rank;           // []
  void* recv_x;                  // [M, H]
  float* recv_weights;           // [M, K]
  int64_t num_tokens;
  int64_t num_recv_rows;
  int64_t row_bytes;
  int64_t elt_bytes;
  int num_topk;
  bool has_weights;
  int num_sms;
  int64_t timeout_ns;
};
cudaError_t LaunchCachedDispatch(const CachedDispatchArgs& a,
                                 cudaStream_t stream);

enum class CombineDtype { kBF16, kF32 };

struct CombineArgs {
  GroupView group;
  const void* y;                   // [M, H]
  const float* weights;            // [M, K]
  const int32_t* send_pos;         // [N, R]
  const int32_t* recv_src_idx;     // [M]
  const int32_t* recv_src_rank;    // [M]
  const int32_t* num_recv_tokens;  // []
  const int32_t* rank;             // []
  void* combined_x;                // [N, H]
  float* combined_weights;         // [N, K]
  CombineDtype dtype;
  int64_t num_tokens;
  int64_t num_recv_rows;
  int64_t row_bytes;
  int64_t elt_bytes;
  int num_topk;
  bool has_weights;
  int num_sms;
  int64_t timeout_ns;
};
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

}  // namespace jax_ep
