// jax_ep_layout: per-rank / per-expert counts and the token->rank mask, in
// one launch. Idea from DeepEP's layout.cu: per-block shared-memory histograms
// flushed to global memory with one atomic per bin. Here one thread owns one
// (token, slot) pair for the expert histogram and one (token, rank) pair for
// the mask and rank histogram, so the bool output is written coalesced.
//
// The counters must start at zero, but a separate memset would cost a launch:
// block 0 zeroes them and publishes the call's sequence number in the rank's
// buffer header; the other blocks count into shared memory meanwhile and wait
// for it before adding. Small batches (up to LAYOUT_XLA_MAX_SLOTS in
// jax_ep/backends/cuda.py) do not come here: XLA's fusions measured as fast
// or faster there (a one-block variant of this kernel took 4.3 us at 128
// tokens, the same as XLA, and 7.8 us at 1024, where XLA took 6.1).
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace layout {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 264;
constexpr int64_t kMaxHistSmemBytes = 48 * 1024;

// Counts the (token, k) slots and (token, rank) pairs of threads tid, tid +
// stride, ... into the histograms (shared or global) and writes the mask.
__device__ __forceinline__ void CountSlots(const int32_t* __restrict__ topk_idx,
                                           int64_t num_tokens, int num_topk, int num_experts,
                                           int num_ranks, int* expert_hist, int* rank_hist,
                                           bool* __restrict__ in_rank, int64_t tid,
                                           int64_t stride) {
  const int experts_per_rank = num_experts / num_ranks;
  // Expert histogram over (token, k) slots.
  CountExpertSlots(topk_idx, num_tokens * num_topk, num_experts, expert_hist, tid, stride);
  // Token->rank mask and rank histogram over (token, rank) pairs.
  const int64_t num_pairs = num_tokens * num_ranks;
  for (int64_t p = tid; p < num_pairs; p += stride) {
    const int64_t i = p / num_ranks;
    const int d = static_cast<int>(p - i * num_ranks);
    const int lo = d * experts_per_rank;
    const int hi = lo + experts_per_rank;
    bool hit = false;
    for (int k = 0; k < num_topk; ++k) {
      const int e = __ldg(topk_idx + i * num_topk + k);
      hit |= (e >= lo && e < hi);
    }
    in_rank[p] = hit;
    if (hit) atomicAdd(rank_hist + d, 1);
  }
}

__global__ void __launch_bounds__(kThreads)
    LayoutKernel(const int32_t* __restrict__ topk_idx, int64_t num_tokens, int num_topk,
                 int num_experts, int num_ranks, int32_t* __restrict__ tokens_per_rank,
                 int32_t* __restrict__ tokens_per_expert, bool* __restrict__ in_rank,
                 char* header, bool use_smem) {
  extern __shared__ int s_hist[];  // [num_experts] then [num_ranks]
  int* s_expert = s_hist;
  int* s_rank = s_hist + num_experts;
  uint32_t* seq_ptr = At<uint32_t>(header, kLayoutSeqOffset);
  uint32_t* zeroed = At<uint32_t>(header, kLayoutZeroedOffset);
  const uint32_t seq = *reinterpret_cast<volatile uint32_t*>(seq_ptr) + 1;

  if (blockIdx.x == 0) {
    for (int j = threadIdx.x; j < num_experts; j += blockDim.x) tokens_per_expert[j] = 0;
    for (int j = threadIdx.x; j < num_ranks; j += blockDim.x) tokens_per_rank[j] = 0;
    __syncthreads();
    if (threadIdx.x == 0) {
      __threadfence();
      StoreReleaseGpuU32(zeroed, seq);
    }
  }
  auto wait_zeroed = [&] {
    if (threadIdx.x == 0) {
      while (LoadAcquireGpuU32(zeroed) != seq) {
      }
    }
    __syncthreads();
  };
  if (use_smem) {
    for (int j = threadIdx.x; j < num_experts + num_ranks; j += blockDim.x) s_hist[j] = 0;
    __syncthreads();
  } else {
    wait_zeroed();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  CountSlots(topk_idx, num_tokens, num_topk, num_experts, num_ranks,
             use_smem ? s_expert : tokens_per_expert, use_smem ? s_rank : tokens_per_rank,
             in_rank, tid, stride);
  if (use_smem) {
    __syncthreads();
    wait_zeroed();
    for (int j = threadIdx.x; j < num_experts; j += blockDim.x) {
      if (s_expert[j] != 0) atomicAdd(tokens_per_expert + j, s_expert[j]);
    }
    for (int j = threadIdx.x; j < num_ranks; j += blockDim.x) {
      if (s_rank[j] != 0) atomicAdd(tokens_per_rank + j, s_rank[j]);
    }
  }
  // The last block to finish advances the sequence number for the next call.
  __syncthreads();
  if (threadIdx.x == 0) {
    uint32_t* ticket = At<uint32_t>(header, kLayoutTicketOffset);
    if (atomicAdd(ticket, 1u) == gridDim.x - 1) {
      *ticket = 0;
      *seq_ptr = seq;
    }
  }
}

}  // namespace

cudaError_t Preload() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, LayoutKernel);
}

cudaError_t Launch(const Args& a, cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(1, a.num_tokens * std::max(a.num_topk, a.num_ranks));
  const int64_t blocks = std::min<int64_t>(kMaxBlocks, (work + kThreads - 1) / kThreads);
  const int64_t smem = sizeof(int) * (static_cast<int64_t>(a.num_experts) + a.num_ranks);
  const bool use_smem = smem <= kMaxHistSmemBytes;
  LayoutKernel<<<static_cast<int>(blocks), kThreads, use_smem ? static_cast<size_t>(smem) : 0,
                 stream>>>(a.topk_idx, a.num_tokens, a.num_topk, a.num_experts, a.num_ranks,
                           a.num_tokens_per_rank, a.num_tokens_per_expert, a.is_token_in_rank,
                           a.own_buffer, use_smem);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace layout
}  // namespace jax_ep
