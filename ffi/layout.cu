// jax_ep_layout: per-rank / per-expert counts and the token->rank mask.
// Idea from DeepEP's layout.cu: per-block shared-memory histograms, flushed
// to global memory with one atomic per bin. Here one thread owns one (token,
// slot) pair for the expert histogram and one (token, rank) pair for the mask
// and rank histogram, so the bool output is written coalesced.
#include <algorithm>

#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace {

constexpr int kLayoutThreads = 256;
constexpr int kLayoutMaxBlocks = 264;
constexpr int64_t kMaxSmemBytes = 48 * 1024;

// Shared-memory histogram when it fits, else straight global atomics.
__global__ void __launch_bounds__(kLayoutThreads)
    LayoutKernel(const int32_t* __restrict__ topk_idx, int64_t num_tokens,
                 int num_topk, int num_experts, int num_ranks,
                 int32_t* __restrict__ tokens_per_rank,
                 int32_t* __restrict__ tokens_per_expert,
                 bool* __restrict__ in_rank, bool use_smem) {
  extern __shared__ int s_hist[];  // [num_experts] then [num_ranks]
  int* s_expert = s_hist;
  int* s_rank = s_hist + num_experts;
  if (use_smem) {
    for (int j = threadIdx.x; j < num_experts + num_ranks; j += blockDim.x) {
      s_hist[j] = 0;
    }
    __syncthreads();
  }
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int experts_per_rank = num_experts / num_ranks;

  // Expert histogram over (token, k) slots.
  const int64_t num_slots = num_tokens * num_topk;
  for (int64_t s = tid; s < num_slots; s += stride) {
    const int e = __ldg(topk_idx + s);
    if (e >= 0 && e < num_experts) {
      atomicAdd(use_smem ? s_expert + e : tokens_per_expert + e, 1);
    }
  }
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
    if (hit) atomicAdd(use_smem ? s_rank + d : tokens_per_rank + d, 1);
  }
  if (use_smem) {
    __syncthreads();
    for (int j = threadIdx.x; j < num_experts; j += blockDim.x) {
      if (s_expert[j] != 0) atomicAdd(tokens_per_expert + j, s_expert[j]);
    }
    for (int j = threadIdx.x; j < num_ranks; j += blockDim.x) {
      if (s_rank[j] != 0) atomicAdd(tokens_per_rank + j, s_rank[j]);
    }
  }
}

}  // namespace

cudaError_t PreloadLayoutKernels() {
  cudaFuncAttributes attr;
  return cudaFuncGetAttributes(&attr, LayoutKernel);
}

cudaError_t LaunchLayout(const int32_t* topk_idx, int64_t num_tokens,
                         int num_topk, int num_experts, int num_ranks,
                         int32_t* num_tokens_per_rank,
                         int32_t* num_tokens_per_expert, bool* is_token_in_rank,
                         cudaStream_t stream) {
  // Counters accumulate with atomics, so they start from zero.
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
      num_tokens_per_rank, 0, sizeof(int32_t) * num_ranks, stream));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaMemsetAsync(
      num_tokens_per_expert, 0, sizeof(int32_t) * num_experts, stream));
  const int64_t work = num_tokens * std::max(num_topk, num_ranks);
  if (work == 0) return cudaSuccess;
  const int64_t blocks = std::min<int64_t>(
      kLayoutMaxBlocks, (work + kLayoutThreads - 1) / kLayoutThreads);
  const int64_t smem = sizeof(int) * (static_cast<int64_t>(num_experts) + num_ranks);
  const bool use_smem = smem <= kMaxSmemBytes;
  LayoutKernel<<<static_cast<int>(blocks), kLayoutThreads,
                 use_smem ? static_cast<size_t>(smem) : 0, stream>>>(
      topk_idx, num_tokens, num_topk, num_experts, num_ranks,
      num_tokens_per_rank, num_tokens_per_expert, is_token_in_rank, use_smem);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace jax_ep
