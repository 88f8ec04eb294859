// Device helpers shared by the jax_ep kernels: error macros, 16-byte vector
// copies, and the cross-rank barrier. CUDA sources only.
#pragma once

#include <cstdint>
#include <cstdio>

#include <cuda_runtime.h>

#include "buffer_layout.h"

// Host side: return the cudaError_t of a failing call from the enclosing
// function (which must itself return cudaError_t).
#define JAX_EP_CUDA_RETURN_IF_ERROR(expr)      \
  do {                                         \
    cudaError_t jax_ep_err_ = (expr);          \
    if (jax_ep_err_ != cudaSuccess) {          \
      return jax_ep_err_;                      \
    }                                          \
  } while (0)

// After a <<<>>> launch: surface launch-configuration errors immediately.
#define JAX_EP_LAUNCH_CHECK() JAX_EP_CUDA_RETURN_IF_ERROR(cudaGetLastError())

namespace jax_ep {

// Which op a barrier belongs to (for the timeout message).
enum class OpId : int { kDispatch = 0, kCachedDispatch = 1, kCombine = 2 };

__device__ __forceinline__ const char* OpName(OpId op) {
  switch (op) {
    case OpId::kDispatch:
      return "dispatch";
    case OpId::kCachedDispatch:
      return "cached_dispatch";
    default:
      return "combine";
  }
}

// Base pointers of every rank's buffer, in rank order (self included), as
// seen from this GPU. Passed by value so kernels index it in param space.
struct PeerBases {
  char* ptr[kMaxRanks];
};

// ptr[i] with a run-time i, written as an unrolled select so the array stays
// in registers / param space instead of being copied to the local stack.
__device__ __forceinline__ char* PeerAt(const PeerBases& p, int i) {
  char* out = nullptr;
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) out = (d == i) ? p.ptr[d] : out;
  return out;
}

// ---------------------------------------------------------------------------
// Memory access helpers (own PTX; the "non-coherent, no L1 allocate" load for
// read-only operands is an idea from DeepEP's ld_nc_global).
// ---------------------------------------------------------------------------

// Read-only operand loads: XLA inputs never change during a kernel, so the
// asm is not volatile and the compiler may batch several loads in flight.
__device__ __forceinline__ int4 LoadNc16(const int4* p) {
  int4 v;
  asm("ld.global.nc.L1::no_allocate.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Loads from the communication buffer (written by peers before the last
// barrier, in an earlier kernel): plain global loads, no non-coherent path;
// the data is stable for the whole kernel, so again not volatile.
__device__ __forceinline__ int4 Load16(const int4* p) {
  int4 v;
  asm("ld.global.v4.s32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// Stores that are not re-read by this SM: skip L1.
__device__ __forceinline__ void Store16(int4* p, const int4& v) {
  asm volatile("st.global.L1::no_allocate.v4.s32 [%0], {%1,%2,%3,%4};" ::"l"(p),
               "r"(v.x), "r"(v.y), "r"(v.z), "r"(v.w)
               : "memory");
}

__device__ __forceinline__ int LoadVolatile(const int* p) {
  int v;
  asm volatile("ld.volatile.global.s32 %0, [%1];" : "=r"(v) : "l"(p));
  return v;
}

__device__ __forceinline__ int LoadAcquireSys(const int* p) {
  int v;
  asm volatile("ld.acquire.sys.global.s32 %0, [%1];"
               : "=r"(v)
               : "l"(p)
               : "memory");
  return v;
}

__device__ __forceinline__ void AtomicAddReleaseSys(int* p, int v) {
  asm volatile("red.release.sys.global.add.s32 [%0], %1;" ::"l"(p), "r"(v)
               : "memory");
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __forceinline__ int* HeaderInt(char* base, int64_t byte_offset) {
  return reinterpret_cast<int*>(base + byte_offset);
}

// ---------------------------------------------------------------------------
// Cross-rank barrier. Must be called by every thread of exactly one block
// with blockDim.x >= num_ranks. Pattern (signal slot per source rank bumped
// with a system-scope atomic, spin with a timeout that traps) follows
// DeepEP's intranode barrier_block; the epoch counter lets the signals grow
// monotonically so they never need resetting.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void RecordTimeout(int* record, OpId op, int rank,
                                              int peer) {
  if (record == nullptr) return;
  // First writer wins; state 2 = complete, read by the host after the trap.
  if (atomicCAS_system(record, 0, 1) == 0) {
    volatile int* r = record;
    r[1] = static_cast<int>(op);
    r[2] = rank;
    r[3] = peer;
    __threadfence_system();
    atomicExch_system(record, 2);
  }
}

__device__ __forceinline__ void CrossRankBarrier(const PeerBases& peers,
                                                 int num_ranks, int rank,
                                                 int64_t timeout_ns, OpId op,
                                                 int* fault_record) {
  char* self = PeerAt(peers, rank);
  int* signal = HeaderInt(self, kBarrierSignalOffset);
  int* epoch = HeaderInt(self, kBarrierEpochOffset);
  const int t = threadIdx.x;
  // Everything this block (and earlier kernels on the stream) wrote must be
  // visible to the peers before they see our signal.
  __syncthreads();
  if (t < num_ranks) {
    __threadfence_system();
    AtomicAddReleaseSys(HeaderInt(PeerAt(peers, t), kBarrierSignalOffset) + rank,
                        1);
    const int target = LoadVolatile(epoch) + 1;
    const uint64_t start = GlobalTimerNs();
    // Wrap-safe comparison: signals only ever grow.
    while (LoadAcquireSys(signal + t) - target < 0) {
      if (timeout_ns > 0 &&
          GlobalTimerNs() - start > static_cast<uint64_t>(timeout_ns)) {
        RecordTimeout(fault_record, op, rank, t);
        printf("jax_ep: %s timed out on rank %d waiting for rank %d\n",
               OpName(op), rank, t);
        __trap();
      }
    }
  }
  __syncthreads();
  if (t == 0) {
    // Only this rank touches its epoch; stream order serialises updates.
    *reinterpret_cast<volatile int*>(epoch) = LoadVolatile(epoch) + 1;
  }
  __syncthreads();
}

// Read the device-side rank operand; returns -1 when it is out of range so
// callers can bail out instead of indexing peers out of bounds.
__device__ __forceinline__ int ReadRank(const int* rank_ptr, int num_ranks) {
  const int r = __ldg(rank_ptr);
  return (r >= 0 && r < num_ranks) ? r : -1;
}

__device__ __forceinline__ int WarpId() { return threadIdx.x >> 5; }
__device__ __forceinline__ int LaneId() { return threadIdx.x & 31; }

}  // namespace jax_ep
