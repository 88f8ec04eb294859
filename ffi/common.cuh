// Device helpers shared by the jax_ep kernels: error macros, vector and bulk
// (TMA) copies, cross-rank signals with timeouts, and fault reporting. CUDA
// sources only.
#pragma once

#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include "buffer_layout.h"
#include "kernels.h"

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

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ int WarpId() { return threadIdx.x >> 5; }
__device__ __forceinline__ int LaneId() { return threadIdx.x & 31; }

// peers[i] with a run-time i, written as an unrolled select so the array stays
// in param space instead of being copied to the local stack.
__device__ __forceinline__ char* PeerAt(const GroupView& g, int i) {
  char* out = nullptr;
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) out = (d == i) ? g.peers[d] : out;
  return out;
}

template <typename T>
__device__ __forceinline__ T* At(char* base, int64_t byte_offset) {
  return reinterpret_cast<T*>(base + byte_offset);
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

// Loads of rows that peers write during the kernel (after an acquire of their
// flags): cached in L2 only, so no L1 line from before the write can be read.
__device__ __forceinline__ int4 LoadCg16(const int4* p) {
  int4 v;
  asm volatile("ld.global.cg.v4.s32 {%0,%1,%2,%3}, [%4];"
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

__device__ __forceinline__ int4 LoadShared16(const void* p) {
  return *reinterpret_cast<const int4*>(p);
}

__device__ __forceinline__ uint32_t LoadAcquireGpuU32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreReleaseGpuU32(uint32_t* p, uint32_t v) {
  asm volatile("st.release.gpu.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ uint32_t LoadAcquireSysU32(const uint32_t* p) {
  uint32_t v;
  asm volatile("ld.acquire.sys.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ uint64_t LoadAcquireSysU64(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}

__device__ __forceinline__ void StoreReleaseSysU32(uint32_t* p, uint32_t v) {
  asm volatile("st.release.sys.global.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}

__device__ __forceinline__ void StoreRelaxedSysU64(uint64_t* p, uint64_t v) {
  asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ void FenceAcqRelSys() {
  asm volatile("fence.acq_rel.sys;" ::: "memory");
}

__device__ __forceinline__ void StoreReleaseSysU64(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// ---------------------------------------------------------------------------
// Bulk copies through the Tensor Memory Accelerator (Hopper's cp.async.bulk,
// plain sm_90): one thread moves a whole row between global and shared memory
// while the SM's warps do other work. Rows are pushed to peers with bulk
// stores because an SM keeps far more bytes in flight that way than with
// per-lane vector stores (NVIDIA's Hybrid-EP and DeepEP's newer kernels use
// TMA for NVLink traffic for the same reason). Sizes and addresses must be
// multiples of 16 bytes.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// One arrival per phase (the issuing lane), plus the expected bytes.
__device__ __forceinline__ void MbarInit(uint64_t* bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(SmemAddr(bar)) : "memory");
}

// Makes initialised barriers visible to the async proxy (the TMA unit).
__device__ __forceinline__ void FenceMbarInit() {
  asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
}

__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(SmemAddr(bar)),
               "r"(bytes)
               : "memory");
}

__device__ __forceinline__ bool MbarTryWait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n .reg .pred p;\n mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
      " selp.u32 %0, 1, 0, p;\n}"
      : "=r"(done)
      : "r"(SmemAddr(bar)), "r"(parity)
      : "memory");
  return done != 0;
}

// Global -> shared; completes `bytes` of the barrier's expected transaction.
__device__ __forceinline__ void BulkLoad(void* smem_dst, const void* gmem_src, uint32_t bytes,
                                         uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::
          "r"(SmemAddr(smem_dst)),
      "l"(gmem_src), "r"(bytes), "r"(SmemAddr(bar))
      : "memory");
}

// Shared -> global (local or a peer's memory); tracked by bulk groups.
__device__ __forceinline__ void BulkStore(void* gmem_dst, const void* smem_src, uint32_t bytes) {
  asm volatile("cp.async.bulk.global.shared::cta.bulk_group [%0], [%1], %2;" ::"l"(gmem_dst),
               "r"(SmemAddr(smem_src)), "r"(bytes)
               : "memory");
}

// Asks the L2 to fetch `bytes` (a multiple of 16, 16-aligned) at `src`: no
// result, no register held, nothing to wait for; a later load finds them nearer.
__device__ __forceinline__ void PrefetchL2(const void* src, uint32_t bytes) {
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(src), "r"(bytes) : "memory");
}

__device__ __forceinline__ void BulkCommit() {
  asm volatile("cp.async.bulk.commit_group;" ::: "memory");
}

// At most N of this thread's newest bulk groups still reading shared memory.
template <int N>
__device__ __forceinline__ void BulkWaitRead() {
  asm volatile("cp.async.bulk.wait_group.read %0;" ::"n"(N) : "memory");
}

// At most N of this thread's newest bulk groups not yet complete (written).
template <int N>
__device__ __forceinline__ void BulkWait() {
  asm volatile("cp.async.bulk.wait_group %0;" ::"n"(N) : "memory");
}

// Barrier `id` (1..15; 0 is __syncthreads') over `threads` threads of the block:
// a group of warps that works on one task synchronizes without the others.
__device__ __forceinline__ void GroupBarrier(int id, int threads) {
  asm volatile("bar.sync %0, %1;" ::"r"(id), "r"(threads) : "memory");
}
// Arrive at barrier `id` without waiting: the memory accesses before it are
// visible to the threads that then complete the barrier with GroupBarrier
// (`threads` counts both sides).
__device__ __forceinline__ void GroupArrive(int id, int threads) {
  asm volatile("bar.arrive %0, %1;" ::"r"(id), "r"(threads) : "memory");
}

// Copies per expert: counts the valid ids (in [0, num_experts)) of slots
// tid, tid + stride, ... below num_slots of topk_idx into `hist` (shared or
// global memory), atomically. The layout kernel and the low-latency
// dispatch's per-expert counts both use it.
__device__ __forceinline__ void CountExpertSlots(const int32_t* __restrict__ topk_idx,
                                                 int64_t num_slots, int num_experts, int* hist,
                                                 int64_t tid, int64_t stride) {
  for (int64_t s = tid; s < num_slots; s += stride) {
    const int e = __ldg(topk_idx + s);
    if (e >= 0 && e < num_experts) atomicAdd(hist + e, 1);
  }
}

// Generic-proxy shared-memory writes -> later bulk stores that read them.
__device__ __forceinline__ void FenceProxyAsyncShared() {
  asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
}

// Orders global accesses of the generic proxy (flags, plain stores) against
// those of the bulk copies, in either direction.
__device__ __forceinline__ void FenceProxyAsyncGlobal() {
  asm volatile("fence.proxy.async.global;" ::: "memory");
}

__device__ __forceinline__ uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

// Phase timestamps, for finding where a kernel's time goes (a profiler sees
// only the whole kernel). Built in with the CMake option JAX_EP_PHASE_TRACE
// (pip install -C cmake.define.JAX_EP_PHASE_TRACE=ON ...); otherwise empty.
// One thread of every block (`tracer`, thread 0 unless a kernel traces
// another warp role) notes %globaltimer at each Mark and, for one op in 64,
// prints the time since its block started per phase, and the block's start
// (tools/trace_summary.py sums the lines up).
struct PhaseTrace {
#ifdef JAX_EP_PHASE_TRACE
  static constexpr int kMarks = 12;
  int tracer;
  // Not zero-filled: only the tracer writes (and Print reads) the first n;
  // zero-filling cost every thread of the block local-memory stores.
  uint64_t start = GlobalTimerNs(), at[kMarks];
  const char* name[kMarks];
  int n = 0;
  __device__ explicit PhaseTrace(int tracer_thread = 0) : tracer(tracer_thread) {}
  __device__ void Mark(const char* phase) {
    if (static_cast<int>(threadIdx.x) == tracer && n < kMarks) {
      at[n] = GlobalTimerNs() - start;
      name[n++] = phase;
    }
  }
  __device__ void Print(const char* op, int rank, uint32_t seq) const {
    // Every block of one op in 64 (tools/trace_summary.py gives the spread).
    if (static_cast<int>(threadIdx.x) != tracer || (seq & 63) != 5) return;
    // The line is built here and printed as one %s: the host formats a
    // printf argument by argument, and two GPUs' lines (one process) came out
    // cut into each other between arguments.
    char line[kLineBytes];
    int len = 0;
    Put(line, &len, "jax_ep phase trace: ");
    Put(line, &len, op);
    Put(line, &len, " rank ");
    PutU(line, &len, static_cast<uint64_t>(rank));
    Put(line, &len, " block ");
    PutU(line, &len, blockIdx.x);
    Put(line, &len, " seq ");
    PutU(line, &len, seq);
    Put(line, &len, " start ");
    PutU(line, &len, start % 1000000000ull);
    Put(line, &len, " ns");
    for (int j = 0; j < n; ++j) {
      Put(line, &len, " | ");
      Put(line, &len, name[j]);
      Put(line, &len, " ");
      PutU(line, &len, at[j]);
    }
    line[len] = '\0';
    printf("%s\n", line);
  }
  static constexpr int kLineBytes = 512;
  __device__ static void Put(char* line, int* len, const char* s) {
    while (*s != '\0' && *len < kLineBytes - 1) line[(*len)++] = *s++;
  }
  __device__ static void PutU(char* line, int* len, uint64_t v) {
    char digits[20];
    int k = 0;
    do {
      digits[k++] = static_cast<char>('0' + v % 10);
      v /= 10;
    } while (v != 0);
    while (k > 0 && *len < kLineBytes - 1) line[(*len)++] = digits[--k];
  }
#else
  __device__ explicit PhaseTrace(int = 0) {}
  __device__ __forceinline__ void Mark(const char*) {}
  __device__ __forceinline__ void Print(const char*, int, uint32_t) const {}
#endif
};

// ---------------------------------------------------------------------------
// Faults. A kernel that cannot go on (a peer that never answers, ranks that
// disagree on the op, a stale layout, ...) writes what happened into the
// process's host-mapped fault record (runtime.h: {state, kind, op, rank, peer,
// other_op, seq}), prints it, and traps; the trap kills the CUDA context, so
// the Python side reads the record to name the op and ranks.
// ---------------------------------------------------------------------------
__device__ __forceinline__ void RecordFault(int* record, int kind, int op, int rank, int peer,
                                            int other_op, uint32_t seq) {
  if (record == nullptr) return;
  // The rank's own slot (runtime.h); in it the first writer wins; state 2 = complete.
  record += kFaultSlotInts * (static_cast<unsigned>(rank) % kMaxRanks);
  if (atomicCAS_system(record, 0, 1) == 0) {
    volatile int* r = record;
    r[1] = kind;
    r[2] = op;
    r[3] = rank;
    r[4] = peer;
    r[5] = other_op;
    r[6] = static_cast<int>(seq);
    __threadfence_system();
    atomicExch_system(record, 2);
  }
}

static __device__ __noinline__ void Fail(const GroupView& g, int kind, int op, int rank, int peer,
                                  int other_op, uint32_t seq) {
  RecordFault(g.fault_record, kind, op, rank, peer, other_op, seq);
  switch (kind) {
    case kFaultTimeout:
      printf("jax_ep: %s timed out on rank %d waiting for rank %d\n", OpName(op), rank, peer);
      break;
    case kFaultOpMismatch:
      printf("jax_ep: %s on rank %d met %s from rank %d\n", OpName(op), rank, OpName(other_op),
             peer);
      break;
    case kFaultShapeMismatch:
      printf("jax_ep: %s on rank %d met %s with different shapes from rank %d\n", OpName(op),
             rank, OpName(other_op), peer);
      break;
    case kFaultLayoutMismatch:
      printf("jax_ep: %s on rank %d: the layout does not match topk_idx (a stale layout?)\n",
             OpName(op), rank);
      break;
    case kFaultPeerAborted:
      printf("jax_ep: %s on rank %d: rank %d gave up on the op\n", OpName(op), rank, peer);
      break;
    case kFaultBadRank:
      printf("jax_ep: %s got rank operand %d but the buffer is registered as rank %d\n",
             OpName(op), peer, rank);
      break;
    case kFaultDestroyed:
      printf("jax_ep: %s used a Buffer after destroy()\n", OpName(op));
      break;
    case kFaultHandleMismatch:
      printf("jax_ep: %s on rank %d: a row from rank %d does not match the handle\n",
             OpName(op), rank, peer);
      break;
    case kFaultReceivePending:
      printf("jax_ep: %s on rank %d: the %s sent before it was not received yet (call its "
             "recv_fn first)\n", OpName(op), rank, OpName(other_op));
      break;
    case kFaultNothingToReceive:
      printf("jax_ep: %s on rank %d: nothing to receive (its send must be the last jax_ep op "
             "on this Buffer before it)\n", OpName(op), rank);
      break;
    default:
      printf("jax_ep: %s failed on rank %d\n", OpName(op), rank);
  }
  __trap();
}

// Spin-wait bookkeeping: reads the clock only every 256 polls.
struct Deadline {
  uint64_t start = 0;
  int64_t timeout_ns;
  uint32_t polls = 0;
  __device__ explicit Deadline(int64_t t) : timeout_ns(t) {}
  __device__ __forceinline__ bool Expired() {
    if ((++polls & 255u) != 0) return false;
    const uint64_t now = GlobalTimerNs();
    if (start == 0) start = now;
    return timeout_ns > 0 && now - start > static_cast<uint64_t>(timeout_ns);
  }
};

// What every peer kernel reads at entry. Each of these loads misses the
// caches; they go out in two batches (the Buffer's own memory is read only once
// the liveness word says it is still allocated) instead of one after another
// behind each check.
struct Entry {
  int rank;              // the rank operand (== the registered rank)
  char* own;             // this rank's buffer
  uint32_t last_seq;     // sequence number of the last op started on the buffer
  uint32_t pending_seq;  // a low-latency receive still to run: {seq, op}, else {0, 0}
  int pending_op;
  uint32_t ticket;       // LoadEntry's `ticket` operand, 0 without one
};

// The Buffer is alive and the rank operand is the rank it was registered with
// (else every address is wrong); then the own header. `ticket`: a low-latency
// send's ticket, loaded in the first batch too.
__device__ __forceinline__ Entry LoadEntry(const GroupView& g, const int32_t* rank_ptr, int op,
                                           const uint32_t* ticket = nullptr) {
  const uint32_t alive = *reinterpret_cast<const volatile uint32_t*>(g.alive);
  const int rank = __ldg(rank_ptr);
  Entry e;
  e.ticket = ticket != nullptr ? *reinterpret_cast<const volatile uint32_t*>(ticket) : 0u;
  if (alive != g.buffer_id) Fail(g, kFaultDestroyed, op, g.rank, g.rank, kOpNone, 0);
  if (rank != g.rank) Fail(g, kFaultBadRank, op, g.rank, rank, kOpNone, 0);
  e.rank = rank;
  e.own = PeerAt(g, g.rank);
  const volatile uint32_t* header = At<volatile uint32_t>(e.own, 0);
  e.last_seq = header[kSeqOffset / 4];
  e.pending_seq = header[kPendingReceiveOffset / 4];
  e.pending_op = static_cast<int>(header[kPendingReceiveOffset / 4 + 1]);
  return e;
}

// LoadEntry, and for every op but a low-latency receive, no low-latency
// receive may be pending on this Buffer: the op would overwrite the rows still
// in flight. The peers are told at once (an abort hello for the op's sequence
// number) instead of timing out.
__device__ __forceinline__ Entry CheckedEntry(const GroupView& g, const int32_t* rank_ptr,
                                              int op) {
  const Entry e = LoadEntry(g, rank_ptr, op);
  if (e.pending_seq != 0) {
    const uint32_t seq = e.last_seq + 1;
    const int t = static_cast<int>(threadIdx.x);
    if (blockIdx.x == 0 && t < g.num_ranks && t != e.rank) {
      StoreReleaseSysU64(At<uint64_t>(PeerAt(g, t), kHelloOffset) + (seq & 1) * kMaxRanks + e.rank,
                         PackHello(seq, kOpAbort, 0));
    }
    Fail(g, kFaultReceivePending, op, e.rank, e.rank, e.pending_op, e.pending_seq);
  }
  return e;
}

// ---------------------------------------------------------------------------
// Cross-rank ordering (see intranode.cu's header): hellos, flags, op ends.
// ---------------------------------------------------------------------------
__device__ __forceinline__ uint64_t FlagValue(uint32_t seq, int64_t low) {
  return (static_cast<uint64_t>(seq) << 32) | static_cast<uint32_t>(low);
}

// Marks this rank's `count` flags as not this op's (the previous sequence
// number) before the op's hellos let peers write them. Where the flags sit
// depends on the op's shapes, and an earlier op of other shapes may have left
// row bytes there that read as this op's sequence number: the two-axis local
// hop's int32 gathers (small integers) did, and a cached dispatch took a
// gather's bytes for a row's flag. Block 0 does it; the caller's barrier
// orders it before the hello stores, whose release covers it.
__device__ __forceinline__ void ResetFlags(uint64_t* flags, int64_t count, uint32_t seq) {
  const uint64_t stale = FlagValue(seq - 1u, 0);
  for (int64_t j = threadIdx.x; j < count; j += blockDim.x) flags[j] = stale;
}

// Waits for rank `src`'s hello for this op in our header; a hello for the same
// sequence number but another op, other shapes or an abort is fatal.
static __device__ void WaitHello(const GroupView& g, char* own, int par, int src, uint64_t want,
                                 int op, int me, uint32_t seq, int64_t timeout_ns) {
  const uint64_t* slot = At<uint64_t>(own, kHelloOffset) + par * kMaxRanks + src;
  Deadline dl(timeout_ns);
  while (true) {
    const uint64_t v = LoadAcquireSysU64(slot);
    if (v == want) return;
    if (HelloSeq(v) == seq) {
      const int other = HelloOp(v);
      const int kind = other == kOpAbort ? kFaultPeerAborted
                       : other != op     ? kFaultOpMismatch
                                         : kFaultShapeMismatch;
      Fail(g, kind, op, me, src, other, seq);
    }
    if (dl.Expired()) Fail(g, kFaultTimeout, op, me, src, kOpNone, seq);
  }
}

// Every peer writes this rank's hello slot for the op (block 0, warp 0); with
// `self`, this rank's own slot too (for blocks that wait on their own block 0).
static __device__ void SendHellos(const GroupView& g, int par, int me, uint64_t hello, int lane,
                                  bool self = false) {
  if (lane < g.num_ranks && (self || lane != me)) {
    StoreReleaseSysU64(At<uint64_t>(PeerAt(g, lane), kHelloOffset) + par * kMaxRanks + me, hello);
  }
}

// The last block to finish advances the rank's sequence number. `pending`: a
// low-latency op's {seq, op} to mark its receive as pending, {0, 0} to clear
// it (a receive), nullptr to leave it.
static __device__ void FinishOp(char* own, uint32_t seq, const uint32_t* pending = nullptr) {
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    uint32_t* ticket = At<uint32_t>(own, kDoneTicketOffset);
    if (atomicAdd(ticket, 1u) == gridDim.x - 1) {
      *ticket = 0;
      if (pending != nullptr) {
        volatile uint32_t* p = At<volatile uint32_t>(own, kPendingReceiveOffset);
        p[0] = pending[0];
        p[1] = pending[1];
      }
      *At<volatile uint32_t>(own, kSeqOffset) = seq;
    }
  }
}

// 28-bit digest of an op's shapes, carried by its hello: ranks that run the
// same op on different shapes stop instead of exchanging wrong rows.
inline uint32_t ShapeHash(std::initializer_list<int64_t> dims) {
  uint64_t h = 1469598103934665603ull;
  for (int64_t d : dims) {
    h ^= static_cast<uint64_t>(d);
    h *= 1099511628211ull;
  }
  return static_cast<uint32_t>(h ^ (h >> 32)) & 0x0fffffffu;
}

// A warp copies one row of n16 16-byte vectors, kUnroll loads per lane in
// flight. `kPeerWritten`: the source was written by peers during the op (L2
// loads), else it is an XLA operand.
template <int kUnroll, bool kPeerWritten>
__device__ __forceinline__ void WarpCopyRow(int4* dst, const int4* src, int64_t n16, int lane) {
  for (int64_t base = 0; base < n16; base += 32 * kUnroll) {
    int4 v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + lane + 32 * u;
      if (j < n16) v[u] = kPeerWritten ? LoadCg16(src + j) : LoadNc16(src + j);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t j = base + lane + 32 * u;
      if (j < n16) Store16(dst + j, v[u]);
    }
  }
}

// Element traits for reductions: unpack a 16-byte vector to floats and back.
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
  __device__ __forceinline__ static void ToFloats(const int4& v, float* out) {
    out[0] = __int_as_float(v.x);
    out[1] = __int_as_float(v.y);
    out[2] = __int_as_float(v.z);
    out[3] = __int_as_float(v.w);
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
  __device__ __forceinline__ static void ToFloats(const int4& v, float* out) {
    const uint32_t w[4] = {static_cast<uint32_t>(v.x), static_cast<uint32_t>(v.y),
                           static_cast<uint32_t>(v.z), static_cast<uint32_t>(v.w)};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = __uint_as_float(w[j] << 16);
      out[2 * j + 1] = __uint_as_float(w[j] & 0xffff0000u);
    }
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

}  // namespace jax_ep
