// Host launchers of the jax_ep kernels, one namespace per kernel family
// (layout.cu, local.cu, intranode.cu). Every launcher enqueues its kernels on
// `stream`, never synchronises the host, and returns the first CUDA error
// (launch errors included) or cudaSuccess.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "buffer_layout.h"

namespace jax_ep {

// What the kernels know about a communication group: every rank's buffer base
// in rank order (self included) as mapped on this GPU, and where to report.
struct GroupView {
  char* peers[kMaxRanks];
  int num_ranks;
  int rank;             // the registered rank; kernels check the rank operand against it
  int ranks_on_device;  // group members sharing this GPU (bounds the grid)
  // Host-mapped int32[8] {state, kind, op, rank, peer, other_op, seq, 0}: a
  // kernel that gives up records why here before it traps (runtime.h).
  int* fault_record;
  // Never freed: holds buffer_id while the Buffer lives, so a kernel replayed
  // from a captured graph after destroy() traps instead of using freed memory.
  const uint32_t* alive;
  uint32_t buffer_id;
};

// Forces the modules holding every jax_ep kernel to load on the current device
// and sets their shared-memory limits. With CUDA lazy loading, the first launch
// of a kernel loads it and may wait for the context to go idle, which can never
// happen while one of our kernels spins waiting for a peer whose launch is
// stuck behind that load. RegisterGroup calls this up front.
cudaError_t PreloadKernels();

// jax_ep_layout: purely local; one launch (block 0 zeroes the counters, the
// others wait for it through the header of `own_buffer`). Ids outside
// [0, num_experts) are ignored.
namespace layout {
struct Args {
  const int32_t* topk_idx;          // [N, K]
  int32_t* num_tokens_per_rank;     // [R]
  int32_t* num_tokens_per_expert;   // [E]
  bool* is_token_in_rank;           // [N, R]
  char* own_buffer;                 // this rank's communication buffer (header only)
  int64_t num_tokens;
  int num_topk, num_experts, num_ranks;
};
cudaError_t Launch(const Args& a, cudaStream_t stream);
cudaError_t Preload();
}  // namespace layout

struct DispatchArgs {
  GroupView group;
  // operands
  const void* x;                       // [N, H] (row_bytes per row)
  const int32_t* topk_idx;             // [N, K]
  const float* topk_weights;           // [N, K], or null: weights are not sent
  const bool* is_token_in_rank;        // [N, R] of the caller's layout, or null: none given
  const int32_t* num_tokens_per_rank;  // [R] of the caller's layout, or null
  const int32_t* rank;                 // [] device scalar
  // results
  void* recv_x;                         // [M, H]
  int32_t* recv_topk_idx;               // [M, K]
  float* recv_topk_weights;             // [M, K]
  int32_t* num_recv_tokens_per_expert;  // [E_local]
  int32_t* send_pos;                    // [N, R]
  int32_t* recv_src_idx;                // [M]
  int32_t* recv_src_rank;               // [M]
  int32_t* num_recv_tokens;             // []
  // sizes
  int64_t num_tokens;     // N
  int64_t num_recv_rows;  // M
  int64_t row_bytes;      // H * elt_bytes, multiple of 16
  int num_topk;           // K <= 32
  int num_experts;        // E (E % R == 0)
  int num_sms;
  int64_t timeout_ns;
};

struct CachedDispatchArgs {
  GroupView group;
  const void* x;                   // [N, H]
  const float* weights;            // [N, K], or null
  const int32_t* send_pos;         // [N, R]
  const int32_t* recv_src_idx;     // [M]
  const int32_t* recv_src_rank;    // [M]
  const int32_t* num_recv_tokens;  // []
  const int32_t* rank;             // []
  void* recv_x;                    // [M, H]
  float* recv_weights;             // [M, K]
  int64_t num_tokens;
  int64_t num_recv_rows;
  int64_t row_bytes;
  int num_topk;
  int num_sms;
  int64_t timeout_ns;
};

enum class RowType { kBF16, kF32 };

struct CombineArgs {
  GroupView group;
  const void* y;                   // [M, H]
  const float* weights;            // [M, K], or null
  const int32_t* send_pos;         // [N, R]
  const int32_t* recv_src_idx;     // [M]
  const int32_t* recv_src_rank;    // [M]
  const int32_t* num_recv_tokens;  // []
  const int32_t* rank;             // []
  void* combined_x;                // [N, H]
  float* combined_weights;         // [N, K]
  RowType row_type;
  int64_t num_tokens;
  int64_t num_recv_rows;
  int64_t row_bytes;
  int num_topk;
  int num_sms;
  int64_t timeout_ns;
};

// One rank (R = 1): nothing crosses, the operands are copied straight into the
// outputs with every SM.
namespace local {
cudaError_t Dispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t CachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream);
cudaError_t Combine(const CombineArgs& a, cudaStream_t stream);
cudaError_t Preload();
}  // namespace local

// Several ranks over peer memory (NVLink): one fused kernel per op.
namespace intranode {
cudaError_t Dispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t CachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream);
cudaError_t Combine(const CombineArgs& a, cudaStream_t stream);
cudaError_t Preload();
}  // namespace intranode

// The low-latency ops (DeepEP's decode path): fixed shapes, T =
// num_max_dispatch_tokens_per_rank slots per source rank, every op a send
// kernel and a receive kernel so that other work can run in between
// (return_recv_hook). The grid is one block per SM (shared among the ranks on
// the GPU): decoding leaves the GPU to these ops while they run.
namespace low_latency {
struct DispatchSendArgs {
  GroupView group;
  const void* x;            // [N, x_row_bytes]
  const int32_t* topk_idx;  // [N, K] global expert ids (outside [0, E): none)
  const float* weights;     // [N, K], or null (the cached dispatch of autodiff)
  const int32_t* rank;      // [] device scalar
  uint32_t* ticket;         // [] the op's sequence number, for the receive
  int64_t num_tokens;       // N <= T
  int64_t num_max_tokens;   // T
  int64_t row_bytes;        // a row as it crosses: a multiple of 16
  int64_t x_row_bytes;      // a row of x: row_bytes, or 2 * fp8_hidden
  // > 0: x is bfloat16 [N, fp8_hidden], quantized to FP8 while it is sent (a
  // row crosses as its fp8_hidden e4m3 bytes, then its fp8_hidden / 128
  // float32 scales, as jax_ep.fp8.pack_rows lays them out); 0: rows move as they are.
  int64_t fp8_hidden;
  int num_topk, num_experts;
  int64_t timeout_ns;
};

// Routing from the ids (dispatch) or from a handle (cached dispatch).
struct DispatchRecvArgs {
  GroupView group;
  const uint32_t* ticket;          // the send's
  const int32_t* rank;
  const int32_t* src_slot_in;      // cached: the handle's [E_local, R*T], else null
  // Receive rows [E_local, R*T]: the first head_bytes of each row go to
  // recv_x, the next tail_bytes (a multiple of 4) to recv_tail if not null
  // (FP8 rows: the FP8 values, then their scales, as two outputs).
  void* recv_x;                    // [E_local, R*T, head_bytes]
  void* recv_tail;                 // [E_local, R*T, tail_bytes], or null
  int64_t head_bytes, tail_bytes;  // head_bytes a multiple of 16
  int32_t* recv_count;             // [E_local] (not cached)
  int32_t* src_slot;               // [E_local, R*T] (not cached)
  int32_t* recv_slot;              // [R*T, K] (not cached)
  RowType row_type;                // cached with weights: how to scale a row
  bool weighted;                   // cached: scale copy (s, i, k) by the sender's weight
  int64_t num_max_tokens, row_bytes;
  int num_topk, num_experts;
  int64_t timeout_ns;
};

struct CombineSendArgs {
  GroupView group;
  const void* y;               // [E_local, R*T, H]
  const float* weights;        // [N, K] (this rank's tokens), or null: all ones
  const int32_t* recv_slot;    // the handle's [R*T, K]
  const int32_t* rank;
  uint32_t* ticket;
  RowType row_type;
  int64_t num_tokens, num_max_tokens, hidden;
  int num_topk, num_experts;
  int64_t timeout_ns;
};

struct CombineRecvArgs {
  GroupView group;
  const uint32_t* ticket;
  const int32_t* rank;
  void* out;  // [N, H]
  RowType row_type;
  int64_t num_tokens, num_max_tokens, hidden;
  int num_topk;
  int64_t timeout_ns;
};

// The split form: a send kernel, then (after other work) a receive kernel.
cudaError_t DispatchSend(const DispatchSendArgs& a, cudaStream_t stream);
cudaError_t DispatchRecv(const DispatchRecvArgs& a, cudaStream_t stream);
cudaError_t CombineSend(const CombineSendArgs& a, cudaStream_t stream);
cudaError_t CombineRecv(const CombineRecvArgs& a, cudaStream_t stream);
// The plain ops: both in one kernel (r's ticket is unused; s's is written).
cudaError_t Dispatch(const DispatchSendArgs& s, const DispatchRecvArgs& r, cudaStream_t stream);
cudaError_t Combine(const CombineSendArgs& s, const CombineRecvArgs& r, cudaStream_t stream);
cudaError_t Preload();
}  // namespace low_latency

// The op entry points the handlers call: local with one rank, else intranode.
cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchCachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream);
cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream);

// Multiprocessors of the current device (cached per device).
int DeviceSmCount();

// Writes the device's %globaltimer (ns) into `out` once the stream reaches it:
// the benchmark's device-side clock.
cudaError_t LaunchClock(uint64_t* out, cudaStream_t stream);

}  // namespace jax_ep
