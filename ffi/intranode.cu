// Intranode dispatch / cached dispatch / combine over a peer-mapped buffer.
//
// Unlike DeepEP's ring-buffer channels, each op here writes straight into
// fixed slots of the receiver's buffer (rows addressed by send_pos), fenced by
// whole-group barriers; see docs/design.md. Ideas borrowed from DeepEP
// (csrc/kernels/intranode.cu): exchanging per-rank counts through the peers'
// buffers and deriving the receive offsets from the rank prefix sums; one warp
// per token row with wide vector copies; fp32 accumulation in combine; a
// timeout-and-trap barrier.
#include <algorithm>

#include <cuda_bf16.h>

#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace {

// Data-movement blocks: 16 warps, one block per SM (grid = num_sms), so the
// register cap is 128 (minBlocks=1 keeps ptxas from squeezing to 64 + spills).
constexpr int kThreads = 512;
constexpr int kWarpsPerBlock = kThreads / 32;
constexpr int kCopyUnroll = 4;      // 16-byte loads in flight per lane
constexpr int kReduceUnroll = 2;    // per source rank, in the combine reduce
constexpr int kScanThreads = 1024;  // notify + send_pos scan (one block)
constexpr int kBarrierThreads = 32;
constexpr int64_t kMaxSmemBytes = 48 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ PeerBases ToPeers(const GroupView& g) {
  PeerBases p;
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) p.ptr[d] = g.peers[d];
  return p;
}

// Reads the rank operand and checks it against the registry; a mismatch would
// make every peer address wrong, so it traps like a barrier timeout does.
__device__ __forceinline__ int CheckedRank(const GroupView& g,
                                           const int32_t* rank_ptr, OpId op) {
  const int rank = __ldg(rank_ptr);
  if (rank != g.registered_rank) {
    if (threadIdx.x == 0) {
      printf("jax_ep: %s got rank operand %d but buffer is registered as rank %d\n",
             OpName(op), rank, g.registered_rank);
    }
    __trap();
  }
  return rank;
}

__device__ __forceinline__ int64_t GlobalWarp() {
  return static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + WarpId();
}
__device__ __forceinline__ int64_t NumWarps() {
  return static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
}

// Copies one row of `n16` 16-byte vectors with the whole warp, keeping
// kCopyUnroll loads in flight per lane. `kSrcIsOperand` picks the
// non-coherent load for XLA operands.
template <bool kSrcIsOperand>
__device__ __forceinline__ void WarpCopyRow(int4* __restrict__ dst,
                                            const int4* __restrict__ src,
                                            int64_t n16, int lane) {
  for (int64_t c = lane; c < n16; c += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t j = c + u * 32;
      if (j < n16) v[u] = kSrcIsOperand ? LoadNc16(src + j) : Load16(src + j);
    }
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t j = c + u * 32;
      if (j < n16) Store16(dst + j, v[u]);
    }
  }
}

__device__ __forceinline__ void WarpZeroRow(int4* __restrict__ dst, int64_t n16,
                                            int lane) {
  const int4 z = make_int4(0, 0, 0, 0);
  for (int64_t j = lane; j < n16; j += 32) Store16(dst + j, z);
}

// Reads one row from an XLA operand once and writes it to every destination
// row dst_row[d] (d with pos[d] >= 0) of the peers' recv_x regions.
__device__ __forceinline__ void WarpScatterRow(const PeerBases& peers,
                                               int64_t region_offset,
                                               const int (&pos)[kMaxRanks],
                                               const int4* __restrict__ src,
                                               int64_t n16, int lane) {
  for (int64_t c = lane; c < n16; c += 32 * kCopyUnroll) {
    int4 v[kCopyUnroll];
#pragma unroll
    for (int u = 0; u < kCopyUnroll; ++u) {
      const int64_t j = c + u * 32;
      if (j < n16) v[u] = LoadNc16(src + j);
    }
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (pos[d] < 0) continue;
      int4* dst = reinterpret_cast<int4*>(peers.ptr[d] + kDataOffset +
                                          region_offset) +
                  static_cast<int64_t>(pos[d]) * n16;
#pragma unroll
      for (int u = 0; u < kCopyUnroll; ++u) {
        const int64_t j = c + u * 32;
        if (j < n16) Store16(dst + j, v[u]);
      }
    }
  }
}

// Every lane learns every destination row of token i (lane d holds
// send_pos[i, d]); positions outside [0, M) are treated as "not sent".
__device__ __forceinline__ bool GatherPositions(const int32_t* send_pos,
                                                int64_t i, int num_ranks,
                                                int64_t num_recv_rows, int lane,
                                                int (&pos)[kMaxRanks]) {
  int mine = -1;
  if (lane < num_ranks) {
    mine = __ldg(send_pos + i * num_ranks + lane);
    if (mine < 0 || mine >= num_recv_rows) mine = -1;
  }
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) pos[d] = __shfl_sync(kFullMask, mine, d);
  return __ballot_sync(kFullMask, mine >= 0) != 0;
}

__device__ __forceinline__ int64_t ValidRows(const int32_t* num_recv_tokens,
                                             int64_t num_recv_rows) {
  const int64_t n = *num_recv_tokens;
  return n < 0 ? 0 : (n < num_recv_rows ? n : num_recv_rows);
}

// ---------------------------------------------------------------------------
// One rank (R = 1): the only "peer" is this GPU, so the ops skip the buffer
// and copy operands straight into the outputs: one read and one write per row
// instead of two of each. Rows are placed by send_pos exactly as the
// multi-rank path places them, so the results are identical.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    DispatchLocalKernel(const int4* __restrict__ x, const int32_t* __restrict__ topk_idx,
                        const float* __restrict__ topk_weights,
                        const int32_t* __restrict__ send_pos,
                        const int32_t* num_recv_tokens, int64_t num_tokens,
                        int64_t num_recv_rows, int64_t n16, int num_topk,
                        int num_experts, bool use_smem, int4* __restrict__ recv_x,
                        int32_t* __restrict__ recv_topk_idx,
                        float* __restrict__ recv_topk_weights,
                        int32_t* __restrict__ expert_counts,
                        int32_t* __restrict__ recv_src_idx,
                        int32_t* __restrict__ recv_src_rank) {
  extern __shared__ int s_hist[];  // [num_experts] when use_smem
  const int lane = LaneId();
  if (use_smem) {
    for (int e = threadIdx.x; e < num_experts; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
  }
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    if (p < 0 || p >= num_recv_rows) continue;  // warp-uniform
    WarpCopyRow<true>(recv_x + p * n16, x + i * n16, n16, lane);
    if (lane < num_topk) {
      const int e = __ldg(topk_idx + i * num_topk + lane);
      const bool ok = e >= 0 && e < num_experts;
      recv_topk_idx[p * num_topk + lane] = ok ? e : -1;
      recv_topk_weights[p * num_topk + lane] =
          ok ? __ldg(topk_weights + i * num_topk + lane) : 0.f;
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
    CachedLocalKernel(const int4* __restrict__ x, const float* __restrict__ weights,
                      const int32_t* __restrict__ send_pos,
                      const int32_t* num_recv_tokens, int64_t num_tokens,
                      int64_t num_recv_rows, int64_t n16, int num_topk, bool has_weights,
                      int4* __restrict__ recv_x, float* __restrict__ recv_weights) {
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    if (p < 0 || p >= num_recv_rows) continue;
    WarpCopyRow<true>(recv_x + p * n16, x + i * n16, n16, lane);
    if (lane < num_topk) {
      recv_weights[p * num_topk + lane] =
          has_weights ? __ldg(weights + i * num_topk + lane) : 0.f;
    }
  }
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  for (int64_t r = valid_rows + GlobalWarp(); r < num_recv_rows; r += NumWarps()) {
    WarpZeroRow(recv_x + r * n16, n16, lane);
    if (lane < num_topk) recv_weights[r * num_topk + lane] = 0.f;
  }
}

// combine with one rank: token i's only copy is row send_pos[i]; the float32
// sum of one value cast back is the value itself, so copy the bits.
__global__ void __launch_bounds__(kThreads, 1)
    CombineLocalKernel(const int4* __restrict__ y, const float* __restrict__ weights,
                       const int32_t* __restrict__ send_pos, int64_t num_tokens,
                       int64_t num_recv_rows, int64_t n16, int num_topk,
                       bool has_weights, int4* __restrict__ out,
                       float* __restrict__ out_weights) {
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    const int64_t p = __ldg(send_pos + i);
    const bool sent = p >= 0 && p < num_recv_rows;
    if (sent) {
      WarpCopyRow<true>(out + i * n16, y + p * n16, n16, lane);
    } else {
      WarpZeroRow(out + i * n16, n16, lane);
    }
    if (lane < num_topk) {
      out_weights[i * num_topk + lane] =
          (sent && has_weights) ? __ldg(weights + p * num_topk + lane) : 0.f;
    }
  }
}

// ---------------------------------------------------------------------------
// Barrier-only kernel (one block).
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kBarrierThreads)
    BarrierKernel(GroupView g, const int32_t* rank_ptr, int64_t timeout_ns,
                  OpId op) {
  const int rank = CheckedRank(g, rank_ptr, op);
  CrossRankBarrier(ToPeers(g), g.num_ranks, rank, timeout_ns, op, g.fault_record);
}

// ---------------------------------------------------------------------------
// Dispatch step 1 (one block): barrier -> write our counts row into every
// peer's header -> barrier -> send_pos scan + num_recv_tokens.
// The scan runs in tiles of kScanThreads tokens; the R per-rank prefix sums
// are packed four 16-bit fields to a 64-bit word so one shuffle scan covers
// four ranks (a tile holds at most 1024 tokens, so no field overflows).
// ---------------------------------------------------------------------------
__device__ __forceinline__ int Field16(uint64_t lo, uint64_t hi, int d) {
  const uint64_t w = d < 4 ? lo : hi;
  return static_cast<int>((w >> (16 * (d & 3))) & 0xffff);
}

__global__ void __launch_bounds__(kScanThreads)
    DispatchNotifyScanKernel(GroupView g, const int32_t* num_tokens_per_rank,
                             const bool* __restrict__ in_rank,
                             const int32_t* rank_ptr, int64_t num_tokens,
                             int64_t num_recv_rows, int32_t* send_pos,
                             int32_t* num_recv_tokens, int64_t timeout_ns,
                             int32_t* expert_counts, int experts_per_rank) {
  const int R = g.num_ranks;
  const int rank = CheckedRank(g, rank_ptr, OpId::kDispatch);
  const PeerBases peers = ToPeers(g);
  const int t = threadIdx.x;
  const int lane = LaneId();
  const int warp = WarpId();

  for (int e = t; e < experts_per_rank; e += blockDim.x) expert_counts[e] = 0;
  // Nobody may overwrite a header/data region a peer still reads. With one
  // rank there is no peer: stream order already protects our own header.
  if (R > 1) CrossRankBarrier(peers, R, rank, timeout_ns, OpId::kDispatch, g.fault_record);
  if (t < R) {
    int* dst = HeaderInt(PeerAt(peers, t), kCountsOffset) + rank * kMaxRanks;
    for (int j = 0; j < R; ++j) dst[j] = __ldg(num_tokens_per_rank + j);
  }
  if (R > 1) {
    CrossRankBarrier(peers, R, rank, timeout_ns, OpId::kDispatch, g.fault_record);
  } else {
    __syncthreads();  // our own counts row, written above, is read below
  }

  __shared__ int s_offset[kMaxRanks];  // rows before our block on rank d
  __shared__ int s_carry[kMaxRanks];   // our tokens to rank d in earlier tiles
  __shared__ uint64_t s_warp_lo[32], s_warp_hi[32];
  __shared__ uint64_t s_tile_lo, s_tile_hi;
  const int* counts = HeaderInt(PeerAt(peers, rank), kCountsOffset);
  if (t < R) {
    int off = 0;
    for (int s = 0; s < rank; ++s) off += LoadVolatile(counts + s * kMaxRanks + t);
    s_offset[t] = off;
    s_carry[t] = 0;
  }
  if (t == 0) {
    int total = 0;
    for (int s = 0; s < R; ++s) total += LoadVolatile(counts + s * kMaxRanks + rank);
    *num_recv_tokens = total;
  }
  __syncthreads();

  for (int64_t base = 0; base < num_tokens; base += kScanThreads) {
    const int64_t i = base + t;
    const bool valid = i < num_tokens;
    uint64_t lo = 0, hi = 0;
    if (valid) {
      for (int d = 0; d < R; ++d) {
        const uint64_t f = in_rank[i * R + d] ? 1u : 0u;
        if (d < 4) lo |= f << (16 * d);
        else hi |= f << (16 * (d - 4));
      }
    }
    uint64_t inc_lo = lo, inc_hi = hi;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const uint64_t a = __shfl_up_sync(kFullMask, inc_lo, o);
      const uint64_t b = __shfl_up_sync(kFullMask, inc_hi, o);
      if (lane >= o) {
        inc_lo += a;
        inc_hi += b;
      }
    }
    if (lane == 31) {
      s_warp_lo[warp] = inc_lo;
      s_warp_hi[warp] = inc_hi;
    }
    __syncthreads();
    if (warp == 0) {
      const uint64_t own_lo = s_warp_lo[lane], own_hi = s_warp_hi[lane];
      uint64_t a_lo = own_lo, a_hi = own_hi;
#pragma unroll
      for (int o = 1; o < 32; o <<= 1) {
        const uint64_t a = __shfl_up_sync(kFullMask, a_lo, o);
        const uint64_t b = __shfl_up_sync(kFullMask, a_hi, o);
        if (lane >= o) {
          a_lo += a;
          a_hi += b;
        }
      }
      s_warp_lo[lane] = a_lo - own_lo;  // exclusive prefix of warp totals
      s_warp_hi[lane] = a_hi - own_hi;
      if (lane == 31) {
        s_tile_lo = a_lo;
        s_tile_hi = a_hi;
      }
    }
    __syncthreads();
    if (valid) {
      const uint64_t ex_lo = inc_lo - lo + s_warp_lo[warp];
      const uint64_t ex_hi = inc_hi - hi + s_warp_hi[warp];
      for (int d = 0; d < R; ++d) {
        int p = -1;
        if (Field16(lo, hi, d) != 0) {
          const int64_t row = static_cast<int64_t>(s_offset[d]) + s_carry[d] +
                              Field16(ex_lo, ex_hi, d);
          p = row < num_recv_rows ? static_cast<int>(row) : -1;  // dropped
        }
        send_pos[i * R + d] = p;
      }
    }
    __syncthreads();
    if (t < R) s_carry[t] += Field16(s_tile_lo, s_tile_hi, t);
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------
// Dispatch step 2: warp per token; read x[i] once, write it (plus top-k ids,
// weights, source index/rank) to row send_pos[i, d] of every destination d.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    DispatchSendKernel(GroupView g, DispatchLayout lay, const int4* __restrict__ x,
                       const int32_t* __restrict__ topk_idx,
                       const float* __restrict__ topk_weights,
                       const int32_t* send_pos, const int32_t* rank_ptr,
                       int64_t num_tokens, int64_t num_recv_rows, int64_t n16,
                       int num_topk) {
  const int R = g.num_ranks;
  const int rank = ReadRank(rank_ptr, R);
  if (rank < 0) return;
  const PeerBases peers = ToPeers(g);
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    int pos[kMaxRanks];
    if (!GatherPositions(send_pos, i, R, num_recv_rows, lane, pos)) continue;
    WarpScatterRow(peers, lay.recv_x, pos, x + i * n16, n16, lane);
    int idx = 0;
    float w = 0.f;
    if (lane < num_topk) {
      idx = __ldg(topk_idx + i * num_topk + lane);
      w = __ldg(topk_weights + i * num_topk + lane);
    }
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (pos[d] < 0) continue;
      char* region = peers.ptr[d] + kDataOffset;
      const int64_t row = pos[d];
      if (lane < num_topk) {
        reinterpret_cast<int32_t*>(region + lay.recv_topk_idx)[row * num_topk + lane] = idx;
        reinterpret_cast<float*>(region + lay.recv_topk_w)[row * num_topk + lane] = w;
      }
      if (lane == 0) {
        reinterpret_cast<int32_t*>(region + lay.recv_src_idx)[row] = static_cast<int32_t>(i);
        reinterpret_cast<int32_t*>(region + lay.recv_src_rank)[row] = rank;
      }
    }
  }
}

// ---------------------------------------------------------------------------
// Dispatch step 4 (after a barrier): warp per receive row; copy the row out of
// our buffer, turn global expert ids into local ones (-1 if the expert is not
// ours), mask weights, count (row, k) slots per local expert, and pad rows
// >= min(num_recv_tokens, M) with zeros / -1.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    DispatchCopyOutKernel(GroupView g, DispatchLayout lay, const int32_t* rank_ptr,
                          const int32_t* num_recv_tokens, int64_t num_recv_rows,
                          int64_t n16, int num_topk, int experts_per_rank,
                          bool use_smem, int4* __restrict__ recv_x,
                          int32_t* __restrict__ recv_topk_idx,
                          float* __restrict__ recv_topk_weights,
                          int32_t* __restrict__ expert_counts,
                          int32_t* __restrict__ recv_src_idx,
                          int32_t* __restrict__ recv_src_rank) {
  extern __shared__ int s_hist[];  // [experts_per_rank] when use_smem
  const int R = g.num_ranks;
  const int rank = ReadRank(rank_ptr, R);
  if (rank < 0) return;
  const int lane = LaneId();
  if (use_smem) {
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) s_hist[e] = 0;
    __syncthreads();
  }
  const char* region = PeerAt(ToPeers(g), rank) + kDataOffset;
  const int4* buf_x = reinterpret_cast<const int4*>(region + lay.recv_x);
  const int32_t* buf_idx = reinterpret_cast<const int32_t*>(region + lay.recv_topk_idx);
  const float* buf_w = reinterpret_cast<const float*>(region + lay.recv_topk_w);
  const int32_t* buf_src_idx = reinterpret_cast<const int32_t*>(region + lay.recv_src_idx);
  const int32_t* buf_src_rank = reinterpret_cast<const int32_t*>(region + lay.recv_src_rank);
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  const int first_expert = rank * experts_per_rank;

  for (int64_t r = GlobalWarp(); r < num_recv_rows; r += NumWarps()) {
    const bool valid = r < valid_rows;
    if (valid) {
      WarpCopyRow<false>(recv_x + r * n16, buf_x + r * n16, n16, lane);
    } else {
      WarpZeroRow(recv_x + r * n16, n16, lane);
    }
    if (lane < num_topk) {
      int out_idx = -1;
      float out_w = 0.f;
      if (valid) {
        const int e = buf_idx[r * num_topk + lane] - first_expert;
        if (e >= 0 && e < experts_per_rank) {
          out_idx = e;
          out_w = buf_w[r * num_topk + lane];
          atomicAdd(use_smem ? s_hist + e : expert_counts + e, 1);
        }
      }
      recv_topk_idx[r * num_topk + lane] = out_idx;
      recv_topk_weights[r * num_topk + lane] = out_w;
    }
    if (lane == 0) {
      recv_src_idx[r] = valid ? buf_src_idx[r] : -1;
      recv_src_rank[r] = valid ? buf_src_rank[r] : -1;
    }
  }
  if (use_smem) {
    __syncthreads();
    for (int e = threadIdx.x; e < experts_per_rank; e += blockDim.x) {
      if (s_hist[e] != 0) atomicAdd(expert_counts + e, s_hist[e]);
    }
  }
}

// ---------------------------------------------------------------------------
// Cached dispatch: same row traffic as dispatch, routed by a saved send_pos.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    CachedSendKernel(GroupView g, DispatchLayout lay, const int4* __restrict__ x,
                     const float* __restrict__ weights, const int32_t* send_pos,
                     const int32_t* rank_ptr, int64_t num_tokens,
                     int64_t num_recv_rows, int64_t n16, int num_topk,
                     bool has_weights) {
  const int R = g.num_ranks;
  if (ReadRank(rank_ptr, R) < 0) return;
  const PeerBases peers = ToPeers(g);
  const int lane = LaneId();
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    int pos[kMaxRanks];
    if (!GatherPositions(send_pos, i, R, num_recv_rows, lane, pos)) continue;
    WarpScatterRow(peers, lay.recv_x, pos, x + i * n16, n16, lane);
    if (!has_weights || lane >= num_topk) continue;
    const float w = __ldg(weights + i * num_topk + lane);
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (pos[d] < 0) continue;
      reinterpret_cast<float*>(peers.ptr[d] + kDataOffset + lay.recv_topk_w)
          [static_cast<int64_t>(pos[d]) * num_topk + lane] = w;
    }
  }
}

__global__ void __launch_bounds__(kThreads, 1)
    CachedCopyOutKernel(GroupView g, DispatchLayout lay, const int32_t* rank_ptr,
                        const int32_t* num_recv_tokens, int64_t num_recv_rows,
                        int64_t n16, int num_topk, bool has_weights,
                        int4* __restrict__ recv_x, float* __restrict__ recv_weights) {
  const int R = g.num_ranks;
  const int rank = ReadRank(rank_ptr, R);
  if (rank < 0) return;
  const int lane = LaneId();
  const char* region = PeerAt(ToPeers(g), rank) + kDataOffset;
  const int4* buf_x = reinterpret_cast<const int4*>(region + lay.recv_x);
  const float* buf_w = reinterpret_cast<const float*>(region + lay.recv_topk_w);
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  for (int64_t r = GlobalWarp(); r < num_recv_rows; r += NumWarps()) {
    const bool valid = r < valid_rows;
    if (valid) {
      WarpCopyRow<false>(recv_x + r * n16, buf_x + r * n16, n16, lane);
    } else {
      WarpZeroRow(recv_x + r * n16, n16, lane);
    }
    if (lane < num_topk) {
      recv_weights[r * num_topk + lane] =
          (valid && has_weights) ? buf_w[r * num_topk + lane] : 0.f;
    }
  }
}

// ---------------------------------------------------------------------------
// Combine step 2: warp per valid receive row r; push y[r] (and its weights)
// into slot (rank, src_idx[r]) of rank src_rank[r].
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    CombinePushKernel(GroupView g, CombineLayout lay, const int4* __restrict__ y,
                      const float* __restrict__ weights,
                      const int32_t* __restrict__ recv_src_idx,
                      const int32_t* __restrict__ recv_src_rank,
                      const int32_t* num_recv_tokens, const int32_t* rank_ptr,
                      int64_t num_tokens, int64_t num_recv_rows, int64_t n16,
                      int num_topk, bool has_weights) {
  const int R = g.num_ranks;
  const int rank = ReadRank(rank_ptr, R);
  if (rank < 0) return;
  const int lane = LaneId();
  const int64_t valid_rows = ValidRows(num_recv_tokens, num_recv_rows);
  for (int64_t r = GlobalWarp(); r < valid_rows; r += NumWarps()) {
    const int s = __ldg(recv_src_rank + r);
    const int i = __ldg(recv_src_idx + r);
    if (s < 0 || s >= R || i < 0 || i >= num_tokens) continue;  // bad handle
    const int64_t slot = static_cast<int64_t>(rank) * num_tokens + i;
    char* region = PeerAt(ToPeers(g), s) + kDataOffset;
    WarpCopyRow<true>(reinterpret_cast<int4*>(region + lay.slots) + slot * n16,
                      y + r * n16, n16, lane);
    if (has_weights && lane < num_topk) {
      reinterpret_cast<float*>(region + lay.weights)[slot * num_topk + lane] =
          __ldg(weights + r * num_topk + lane);
    }
  }
}

// Element traits for the reduce: unpack a 16-byte vector to floats and back.
template <typename T>
struct VecTraits;

template <>
struct VecTraits<float> {
  static constexpr int kElems = 4;
  __device__ __forceinline__ static void Add(const int4& v, float* acc) {
    acc[0] += __int_as_float(v.x);
    acc[1] += __int_as_float(v.y);
    acc[2] += __int_as_float(v.z);
    acc[3] += __int_as_float(v.w);
  }
  __device__ __forceinline__ static int4 Pack(const float* acc) {
    return make_int4(__float_as_int(acc[0]), __float_as_int(acc[1]),
                     __float_as_int(acc[2]), __float_as_int(acc[3]));
  }
};

template <>
struct VecTraits<__nv_bfloat16> {
  static constexpr int kElems = 8;
  __device__ __forceinline__ static void AddWord(uint32_t w, float* acc) {
    // bf16 -> f32 is exact: the bf16 bits are the top half of the f32.
    acc[0] += __uint_as_float(w << 16);
    acc[1] += __uint_as_float(w & 0xffff0000u);
  }
  __device__ __forceinline__ static void Add(const int4& v, float* acc) {
    AddWord(static_cast<uint32_t>(v.x), acc + 0);
    AddWord(static_cast<uint32_t>(v.y), acc + 2);
    AddWord(static_cast<uint32_t>(v.z), acc + 4);
    AddWord(static_cast<uint32_t>(v.w), acc + 6);
  }
  __device__ __forceinline__ static int PackWord(float a, float b) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<const int*>(&h);
  }
  __device__ __forceinline__ static int4 Pack(const float* acc) {
    return make_int4(PackWord(acc[0], acc[1]), PackWord(acc[2], acc[3]),
                     PackWord(acc[4], acc[5]), PackWord(acc[6], acc[7]));
  }
};

// ---------------------------------------------------------------------------
// Combine step 4 (after a barrier): warp per token i; sum the slots (d, i) of
// every d with send_pos[i, d] >= 0 in fp32 and cast to T. Loads for all
// sources of a chunk are issued before any is consumed.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    CombineReduceKernel(GroupView g, CombineLayout lay, const int32_t* send_pos,
                        const int32_t* rank_ptr, int64_t num_tokens,
                        int64_t num_recv_rows, int64_t n16, int num_topk,
                        bool has_weights, int4* __restrict__ out,
                        float* __restrict__ out_weights) {
  using Traits = VecTraits<T>;
  const int R = g.num_ranks;
  const int rank = ReadRank(rank_ptr, R);
  if (rank < 0) return;
  const int lane = LaneId();
  const char* region = PeerAt(ToPeers(g), rank) + kDataOffset;
  const int4* slots = reinterpret_cast<const int4*>(region + lay.slots);
  const float* slot_w = reinterpret_cast<const float*>(region + lay.weights);
  for (int64_t i = GlobalWarp(); i < num_tokens; i += NumWarps()) {
    int pos[kMaxRanks];
    GatherPositions(send_pos, i, R, num_recv_rows, lane, pos);
    for (int64_t c = lane; c < n16; c += 32 * kReduceUnroll) {
      int4 v[kMaxRanks][kReduceUnroll];
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        const int4* src = slots + (static_cast<int64_t>(d) * num_tokens + i) * n16;
#pragma unroll
        for (int u = 0; u < kReduceUnroll; ++u) {
          const int64_t j = c + u * 32;
          v[d][u] = (pos[d] >= 0 && j < n16) ? Load16(src + j) : make_int4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int u = 0; u < kReduceUnroll; ++u) {
        const int64_t j = c + u * 32;
        if (j >= n16) continue;
        float acc[Traits::kElems];
#pragma unroll
        for (int e = 0; e < Traits::kElems; ++e) acc[e] = 0.f;
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
          if (pos[d] >= 0) Traits::Add(v[d][u], acc);
        }
        Store16(out + i * n16 + j, Traits::Pack(acc));
      }
    }
    if (lane < num_topk) {
      float w = 0.f;
      if (has_weights) {
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
          if (pos[d] >= 0) {
            w += slot_w[(static_cast<int64_t>(d) * num_tokens + i) * num_topk + lane];
          }
        }
      }
      out_weights[i * num_topk + lane] = w;
    }
  }
}

int GridFor(int num_sms) { return std::max(1, num_sms); }

// Blocks for kernels that only touch local memory and never wait on a peer:
// one per SM of the current device, so they can use the whole HBM bandwidth
// (the num_sms bound exists for kernels that talk to peers).
int LocalGrid() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int sms = 0;
    if (cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        sms < 1) {
      (void)cudaGetLastError();
      return 132;
    }
    cached[dev] = sms;
  }
  return cached[dev];
}

// Blocks for kernels that write peers: bounded by num_sms, except with one
// rank, where the "peer" is this GPU and nothing can wait on us.
int PeerGrid(int num_sms, int num_ranks) {
  return num_ranks == 1 ? LocalGrid() : GridFor(num_sms);
}

}  // namespace

// ---------------------------------------------------------------------------
// Host launchers.
// ---------------------------------------------------------------------------
cudaError_t PreloadLayoutKernels();  // layout.cu

cudaError_t PreloadKernels() {
  cudaFuncAttributes attr;
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, BarrierKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchNotifyScanKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchSendKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchCopyOutKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CachedSendKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CachedCopyOutKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CombinePushKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchLocalKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CachedLocalKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CombineLocalKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(
      cudaFuncGetAttributes(&attr, CombineReduceKernel<__nv_bfloat16>));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CombineReduceKernel<float>));
  return PreloadLayoutKernels();
}

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream) {
  const GroupView& g = a.group;
  const int experts_per_rank = a.num_experts / g.num_ranks;
  const DispatchLayout lay =
      MakeDispatchLayout(a.num_recv_rows, a.row_bytes / a.elt_bytes, a.num_topk,
                         a.elt_bytes);
  const int64_t n16 = a.row_bytes / 16;
  const int grid = PeerGrid(a.num_sms, g.num_ranks);
  const int local_grid = LocalGrid();

  // The scan kernel also zeroes the per-expert counts that the copy kernel
  // then accumulates with atomics (one launch fewer than a memset).
  DispatchNotifyScanKernel<<<1, kScanThreads, 0, stream>>>(
      g, a.num_tokens_per_rank, a.is_token_in_rank, a.rank, a.num_tokens,
      a.num_recv_rows, a.send_pos, a.num_recv_tokens, a.timeout_ns,
      a.num_recv_tokens_per_expert, experts_per_rank);
  JAX_EP_LAUNCH_CHECK();

  const int64_t smem = sizeof(int) * static_cast<int64_t>(experts_per_rank);
  const bool use_smem = smem <= kMaxSmemBytes;
  if (g.num_ranks == 1) {
    DispatchLocalKernel<<<local_grid, kThreads, use_smem ? static_cast<size_t>(smem) : 0,
                          stream>>>(
        static_cast<const int4*>(a.x), a.topk_idx, a.topk_weights, a.send_pos,
        a.num_recv_tokens, a.num_tokens, a.num_recv_rows, n16, a.num_topk,
        experts_per_rank, use_smem, static_cast<int4*>(a.recv_x), a.recv_topk_idx,
        a.recv_topk_weights, a.num_recv_tokens_per_expert, a.recv_src_idx,
        a.recv_src_rank);
    JAX_EP_LAUNCH_CHECK();
    return cudaSuccess;
  }

  DispatchSendKernel<<<grid, kThreads, 0, stream>>>(
      g, lay, static_cast<const int4*>(a.x), a.topk_idx, a.topk_weights,
      a.send_pos, a.rank, a.num_tokens, a.num_recv_rows, n16, a.num_topk);
  JAX_EP_LAUNCH_CHECK();

  BarrierKernel<<<1, kBarrierThreads, 0, stream>>>(g, a.rank, a.timeout_ns,
                                                   OpId::kDispatch);
  JAX_EP_LAUNCH_CHECK();

  DispatchCopyOutKernel<<<local_grid, kThreads, use_smem ? static_cast<size_t>(smem) : 0,
                          stream>>>(
      g, lay, a.rank, a.num_recv_tokens, a.num_recv_rows, n16, a.num_topk,
      experts_per_rank, use_smem, static_cast<int4*>(a.recv_x), a.recv_topk_idx,
      a.recv_topk_weights, a.num_recv_tokens_per_expert, a.recv_src_idx,
      a.recv_src_rank);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t LaunchCachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream) {
  const GroupView& g = a.group;
  const DispatchLayout lay =
      MakeDispatchLayout(a.num_recv_rows, a.row_bytes / a.elt_bytes, a.num_topk,
                         a.elt_bytes);
  const int64_t n16 = a.row_bytes / 16;
  const int grid = PeerGrid(a.num_sms, g.num_ranks);
  const int local_grid = LocalGrid();

  if (g.num_ranks == 1) {
    CachedLocalKernel<<<local_grid, kThreads, 0, stream>>>(
        static_cast<const int4*>(a.x), a.weights, a.send_pos, a.num_recv_tokens,
        a.num_tokens, a.num_recv_rows, n16, a.num_topk, a.has_weights,
        static_cast<int4*>(a.recv_x), a.recv_weights);
    JAX_EP_LAUNCH_CHECK();
    return cudaSuccess;
  }
  BarrierKernel<<<1, kBarrierThreads, 0, stream>>>(g, a.rank, a.timeout_ns,
                                                   OpId::kCachedDispatch);
  JAX_EP_LAUNCH_CHECK();
  CachedSendKernel<<<grid, kThreads, 0, stream>>>(
      g, lay, static_cast<const int4*>(a.x), a.weights, a.send_pos, a.rank,
      a.num_tokens, a.num_recv_rows, n16, a.num_topk, a.has_weights);
  JAX_EP_LAUNCH_CHECK();
  BarrierKernel<<<1, kBarrierThreads, 0, stream>>>(g, a.rank, a.timeout_ns,
                                                   OpId::kCachedDispatch);
  JAX_EP_LAUNCH_CHECK();
  CachedCopyOutKernel<<<local_grid, kThreads, 0, stream>>>(
      g, lay, a.rank, a.num_recv_tokens, a.num_recv_rows, n16, a.num_topk,
      a.has_weights, static_cast<int4*>(a.recv_x), a.recv_weights);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  const GroupView& g = a.group;
  const CombineLayout lay =
      MakeCombineLayout(g.num_ranks, a.num_tokens, a.row_bytes / a.elt_bytes,
                        a.num_topk, a.elt_bytes);
  const int64_t n16 = a.row_bytes / 16;
  const int grid = PeerGrid(a.num_sms, g.num_ranks);
  const int local_grid = LocalGrid();

  if (g.num_ranks == 1) {
    CombineLocalKernel<<<local_grid, kThreads, 0, stream>>>(
        static_cast<const int4*>(a.y), a.weights, a.send_pos, a.num_tokens,
        a.num_recv_rows, n16, a.num_topk, a.has_weights,
        static_cast<int4*>(a.combined_x), a.combined_weights);
    JAX_EP_LAUNCH_CHECK();
    return cudaSuccess;
  }
  BarrierKernel<<<1, kBarrierThreads, 0, stream>>>(g, a.rank, a.timeout_ns,
                                                   OpId::kCombine);
  JAX_EP_LAUNCH_CHECK();
  CombinePushKernel<<<grid, kThreads, 0, stream>>>(
      g, lay, static_cast<const int4*>(a.y), a.weights, a.recv_src_idx,
      a.recv_src_rank, a.num_recv_tokens, a.rank, a.num_tokens, a.num_recv_rows,
      n16, a.num_topk, a.has_weights);
  JAX_EP_LAUNCH_CHECK();
  BarrierKernel<<<1, kBarrierThreads, 0, stream>>>(g, a.rank, a.timeout_ns,
                                                   OpId::kCombine);
  JAX_EP_LAUNCH_CHECK();
  if (a.dtype == CombineDtype::kBF16) {
    CombineReduceKernel<__nv_bfloat16><<<local_grid, kThreads, 0, stream>>>(
        g, lay, a.send_pos, a.rank, a.num_tokens, a.num_recv_rows, n16,
        a.num_topk, a.has_weights, static_cast<int4*>(a.combined_x),
        a.combined_weights);
  } else {
    CombineReduceKernel<float><<<local_grid, kThreads, 0, stream>>>(
        g, lay, a.send_pos, a.rank, a.num_tokens, a.num_recv_rows, n16,
        a.num_topk, a.has_weights, static_cast<int4*>(a.combined_x),
        a.combined_weights);
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace jax_ep
