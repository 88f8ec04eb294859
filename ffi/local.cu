// One rank (R = 1): every token stays home, so the ops skip the communication
// buffer and copy operands straight into their outputs with every SM (one read
// and one write per row). Rows are placed by send_pos exactly as the
// multi-rank path places them, so the results are identical.
#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace local {
namespace {

// One block per SM, 16 warps; minBlocks=1 keeps ptxas from squeezing to 64
// registers and spilling.
constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kCopyUnroll = 4;      // 16-byte loads in flight per lane
constexpr int kScanThreads = 1024;  // send_pos scan (one block)
constexpr int64_t kMaxHistSmemBytes = 48 * 1024;

__device__ __forceinline__ int64_t GlobalWarp() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + WarpId();
}
__device__ __forceinline__ int64_t NumWarps() {
  return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
}

// Copies one row of `n16` 16-byte vectors with the whole warp, keeping
// kCopyUnroll loads in flight per lane.
__device__ __forceinline__ void WarpCopyRow(int4* __restrict__ dst, const int4* __restrict__ src,
                                            int64_t n16, int lane) {
  for (int64_t c = lane; c < n16; c += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t j = c + u * 32;
      if (j < n16) v[u] = LoadNc16(src + j);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t j = c + u * 32;
      if (j < n16) Store16(dst + j, v[u]);
    }
  }
}

__device__ __forceinline__ void WarpZeroRow(int4* __restrict__ dst, int64_t n16, int lane) {
  const int4 z = make_int4(0, 0, 0, 0);
  for (int64_t j = lane; j < n16; j += 32) Store16(dst + j, z);
}

__device__ __forceinline__ int64_t ValidRows(const int32_t* num_recv_tokens, int64_t num_recv_rows) {
  const int64_t n = *num_recv_tokens;
  return n < 0 ? 0 : (n < num_recv_rows ? n : num_recv_rows);
}

// send_pos[i] = number of earlier tokens with an expert (capped at M), from
// topk_idx itself; a layout the caller passed must agree with it.
__global__ void __launch_bounds__(kScanThreads)
    ScanKernel(GroupView g, const int32_t* rank_ptr, const int32_t* __restrict__ topk_idx,
               const bool* __restrict__ given_in_rank, const int32_t* given_per_rank,
               int64_t num_tokens, int num_topk, int num_experts, int64_t num_recv_rows,
               int32_t* send_pos, int32_t* num_recv_tokens, int32_t* expert_counts) {
  CheckedEntry(g, rank_ptr, kOpDispatch);
  __shared__ int s_warp[kScanThreads / 32];
  __shared__ int s_bad;
  const int t = threadIdx.x, lane = LaneId(), warp = WarpId();
  for (int e = t; e < num_experts; e += blockDim.x) expert_counts[e] = 0;
  if (t == 0) s_bad = 0;
  int carry = 0;
  __syncthreads();
  for (int64_t base = 0; base < num_tokens; base += kScanThreads) {
    const int64_t i = base + t;
    bool hit = false;
    if (i < num_tokens) {
      for (int k = 0; k < num_topk; ++k) {
        const int e = __ldg(topk_idx + i * num_topk + k);
        hit |= e >= 0 && e < num_experts;
      }
      if (given_in_rank != nullptr && given_in_rank[i] != hit) s_bad = 1;
    }
    const unsigned ballot = __ballot_sync(kFullMask, hit);
    if (lane == 0) s_warp[warp] = __popc(ballot);
    __syncthreads();
    int before = carry, total = carry;
    for (int w = 0; w < kScanThreads / 32; ++w) {
      before += w < warp ? s_warp[w] : 0;
      total += s_warp[w];
    }
    if (i < num_tokens) {
      const int64_t pos = before + __popc(ballot & ((1u << lane) - 1));
      send_pos[i] = (hit && pos < num_recv_rows) ? static_cast<int32_t>(pos) : -1;
    }
    carry = total;
    __syncthreads();  // s_warp is rewritten by the next tile
  }
  if (t == 0) {
    *num_recv_tokens = carry;
    if (given_per_rank != nullptr && given_per_rank[0] != carry) s_bad = 1;
  }
  __syncthreads();
  if (t == 0 && s_bad) Fail(g, kFaultLayoutMismatch, kOpDispatch, g.rank, g.rank, kOpNone, 0);
}

__global__ void __launch_bounds__(kThreads, 1)
    DispatchKernel(const int4* __restrict__ x, const int32_t* __restrict__ topk_idx,
                   const float* __restrict__ topk_weights, const int32_t* __restrict__ send_pos,
                   const int32_t* num_recv_tokens, int64_t num_tokens, int64_t num_recv_rows,
                   int64_t n16, int num_topk, int num_experts, bool use_smem,
                   int4* __restrict__ recv_x, int32_t* __restrict__ recv_topk_idx,
                   float* __restrict__ recv_topk_weights, int32_t* __restrict__ expert_counts,
                   int32_t* __restrict__ recv_src_idx, int32_t* __restrict__ recv_src_rank) {
  extern __shared__ int s_hist[];  // [num_experts] when use_smem
  const int lane = LaneId();
  if (use_smem) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
  }
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    if (p < 0 || p >= num_recv_rows) continue;  // warp-uniform
    WarpCopyRow(recv_x + p * n16, x + i * n16, n16, lane);
    if (lane < num_topk) {
      const int e = __ldg(topk_idx + i * num_topk + lane);
      const bool ok = e >= 0 && e < num_experts;
      recv_topk_idx[p * num_topk + lane] = ok ? e : -1;
      recv_topk_weights[p * num_topk + lane] =
          (ok && topk_weights != nullptr) ? __ldg(topk_weights + i * num_topk + lane) : 0.f;
      if (ok) atomicAdd(use_smem ? s_hist + e : expert_counts + e, 1);
    }
    if (lane == 0) {
      recv_src_idx[p] = static_cast<int32_t>(i);
      recv_src_rank[p] = 0;
    }
  }
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  for (int64_t r = valid_rows + GlobalWarp(); r < num_recv_rows; r += NumWarps()) {
    WarpZeroRow(recv_x + r * n16, n16, lane);
    if (lane < num_topk) {
      recv_topk_idx[r * num_topk + lane] = -1;
      recv_topk_weights[r * num_topk + lane] = 0.f;
    }
    if (lane == 0) {
      recv_src_idx[r] = -1;
      recv_src_rank[r] = -1;
    }
  }
  if (use_smem) {
    __syncthreads();
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) {
      if (s_hist[e] != 0) atomicAdd(expert_counts + e, s_hist[e]);
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    CachedDispatchKernel(const int4* __restrict__ x, const float* __restrict__ weights,
                         const int32_t* __restrict__ send_pos, const int32_t* num_recv_tokens,
                         int64_t num_tokens, int64_t num_recv_rows, int64_t n16, int num_topk,
                         int4* __restrict__ recv_x, float* __restrict__ recv_weights) {
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    if (p < 0 || p >= num_recv_rows) continue;
    WarpCopyRow(recv_x + p * n16, x + i * n16, n16, lane);
    if (lane < num_topk) {
      recv_weights[p * num_topk + lane] =
          weights != nullptr ? __ldg(weights + i * num_topk + lane) : 0.f;
    }
  }
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  for (int64_t r = valid_rows + GlobalWarp(); r < num_recv_rows; r += NumWarps()) {
    WarpZeroRow(recv_x + r * n16, n16, lane);
    if (lane < num_topk) recv_weights[r * num_topk + lane] = 0.f;
  }
}

// Token i's only copy is row send_pos[i]; the float32 sum of one value cast
// back is the value itself, so copy the bits.
__global__ void __launch_bounds__(kThreads, 1)
    CombineKernel(const int4* __restrict__ y, const float* __restrict__ weights,
                  const int32_t* __restrict__ send_pos, int64_t num_tokens,
                  int64_t num_recv_rows, int64_t n16, int num_topk, int4* __restrict__ out,
                  float* __restrict__ out_weights) {
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    const bool sent = p >= 0 && p < num_recv_rows;
    if (sent) {
      WarpCopyRow(out + i * n16, y + p * n16, n16, lane);
    } else {
      WarpZeroRow(out + i * n16, n16, lane);
    }
    if (lane < num_topk) {
      out_weights[i * num_topk + lane] =
          (sent && weights != nullptr) ? __ldg(weights + p * num_topk + lane) : 0.f;
    }
  }
}

}  // namespace

cudaError_t Preload() {
  cudaFuncAttributes attr;
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, ScanKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CachedDispatchKernel));
  return cudaFuncGetAttributes(&attr, CombineKernel);
}

cudaError_t Dispatch(const DispatchArgs& a, cudaStream_t stream) {
  const int64_t n16 = a.row_bytes / 16;
  ScanKernel<<<1, kScanThreads, 0, stream>>>(
      a.group, a.rank, a.topk_idx, a.is_token_in_rank, a.num_tokens_per_rank, a.num_tokens,
      a.num_topk, a.num_experts, a.num_recv_rows, a.send_pos, a.num_recv_tokens,
      a.num_recv_tokens_per_expert);
  JAX_EP_LAUNCH_CHECK();
  const int64_t smem = sizeof(int) * static_cast<int64_t>(a.num_experts);
  const bool use_smem = smem <= kMaxHistSmemBytes;
  DispatchKernel<<<DeviceSmCount(), kThreads, use_smem ? static_cast<size_t>(smem) : 0, stream>>>(
      static_cast<const int4*>(a.x), a.topk_idx, a.topk_weights, a.send_pos, a.num_recv_tokens,
      a.num_tokens, a.num_recv_rows, n16, a.num_topk, a.num_experts, use_smem,
      static_cast<int4*>(a.recv_x), a.recv_topk_idx, a.recv_topk_weights,
      a.num_recv_tokens_per_expert, a.recv_src_idx, a.recv_src_rank);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t CachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream) {
  CachedDispatchKernel<<<DeviceSmCount(), kThreads, 0, stream>>>(
      static_cast<const int4*>(a.x), a.weights, a.send_pos, a.num_recv_tokens, a.num_tokens,
      a.num_recv_rows, a.row_bytes / 16, a.num_topk, static_cast<int4*>(a.recv_x),
      a.recv_weights);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t Combine(const CombineArgs& a, cudaStream_t stream) {
  CombineKernel<<<DeviceSmCount(), kThreads, 0, stream>>>(
      static_cast<const int4*>(a.y), a.weights, a.send_pos, a.num_tokens, a.num_recv_rows,
      a.row_bytes / 16, a.num_topk, static_cast<int4*>(a.combined_x), a.combined_weights);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace local
}  // namespace jax_ep
