// Low-latency dispatch and combine (DeepEP's decode path) over peer-mapped
// buffers: fixed shapes, every op a send phase and a receive phase. The plain
// ops run both in one kernel; the split form (return_recv_hook) launches them
// as two kernels so that other work can run between them. See docs/design.md
// "Low-latency mode" and buffer_layout.h for the regions.
//
// Dispatch. The send phase writes each token's row once into every rank that
// holds any of its experts (a row per (token, rank), not per (token, k): the
// receiver makes the copies, so only distinct rows cross the link), together
// with the token's ids and each copy's place among this rank's copies to its
// expert, at slot (source rank, token) of that rank's buffer, and flags the
// slot; right after the hellos, each rank also gets our per-expert copy counts.
// Tokens a rank does not need still get their ids and flag there, so the
// receiver hears from every slot of every source. The receive phase copies
// each row into recv_x, grouped by expert in (source, token, k) order, as
// soon as its own flag and the counts that place it are in (a copy from
// source s needs the counts of the sources before s for its expert).
//
// Combine. The send phase adds up, on the expert's rank, each token's local
// copies weighted in float32 (the weights are read from the home rank's
// buffer, where it put them before its hello) and writes that one float32
// partial sum into the home rank's buffer, flagged with whether there was any.
// The receive phase adds the partials of every rank in rank order. Float32
// on the wire keeps the whole sum in float32; per-copy bf16 rows (DeepEP's
// choice) would cross the link K/R times over. backends/xla_ll.py moves the
// same rows and partials with all-to-alls and is the oracle.
//
// Ordering. Every op opens with a hello like the intranode ops. In the split
// form the send kernel ends by marking its receive pending (FinishOp); the
// receive kernel finds the sequence number in the send's ticket, checks that
// the send was the Buffer's last op, and clears the mark. Every other op
// refuses to start while a receive is pending (CheckedEntry), so nothing can
// overwrite rows in flight. A plain op (one kernel) marks nothing.
#include <algorithm>
#include <cfloat>

#include <cuda_fp8.h>

#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace low_latency {
namespace {

constexpr int kWarps = 16;
constexpr int kThreads = kWarps * 32;
// The send phases work on a task (a token for one rank) per group of warps, two
// groups per block, each with its own named barrier (1 + group). With a task
// per warp (dispatch) or per block (combine), one task's chain of latencies set
// the phase's time at small batches: the phase trace showed ~8 us for one warp
// to push one 14 KB row, and ~5 us per combine task with two tasks in turn.
constexpr int kGroupWarps = 8;
constexpr int kGroups = kWarps / kGroupWarps;
constexpr int kGroupThreads = kGroupWarps * 32;
// 16-byte loads in flight per lane when a warp copies a row.
constexpr int kCopyUnroll = 16;
// The dispatch send's: a warp's part of a row is an eighth (112 vectors at
// H = 7168 bf16, 3.5 per lane), so 16 only cost registers (the fused kernel
// spilled 36/96 bytes with 16, 32/32 with 4).
constexpr int kSendUnroll = 4;
// The combine's weighted sum: per round of loads, kSumUnroll copies of one
// token at kSumVecs vectors per thread. (8 copies at one vector left a task
// at ~3.5 rounds of HBM latency, 3.3-3.9 us in the trace, with ~4 copies per
// token at R = 2; 4 copies at 2 vectors keep the registers and halve the
// rounds there.)
constexpr int kSumUnroll = 4;
constexpr int kSumVecs = 2;
// The dispatch send numbers a token's copies kPlaceChunk ids at a time (each
// thread compares every earlier id it loads with that many of the token's).
constexpr int kPlaceChunk = 8;

// One block per SM, shared among the ranks on the GPU: every block waits for
// peers, so all ranks' blocks must be resident at once.
int Grid(const GroupView& g) {
  return std::max(1, DeviceSmCount() / std::max(1, g.ranks_on_device));
}

// A warp writes w * row (rounded to the row's type) for a peer-written row.
template <typename T>
__device__ __forceinline__ void WarpScaleRow(int4* dst, const int4* src, float w, int64_t n16,
                                             int lane) {
  using Traits = VecTraits<T>;
  for (int64_t j = lane; j < n16; j += 32) {
    float f[Traits::kElems];
    Traits::ToFloats(LoadCg16(src + j), f);
#pragma unroll
    for (int e = 0; e < Traits::kElems; ++e) f[e] = __fmul_rn(w, f[e]);
    Store16(dst + j, Traits::Pack(f));
  }
}

// max that keeps a NaN, as XLA's max does (fmaxf drops it).
__device__ __forceinline__ float NanMax(float a, float b) { return a != a || a > b ? a : b; }

// A warp quantizes blocks [b0, b0 + nb) of 128 bfloat16 values of row `x` to
// FP8 and writes them into the packed row `dst` (H e4m3fn bytes, then H / 128
// float32 scales), computing exactly what jax_ep.fp8.quantize_fp8 does: s =
// max(amax * f32(1/448), FLT_MIN), q = e4m3fn(clip(x * (1/s), -448, 448)),
// each step rounded to nearest even. Half a warp per block: a lane loads 8
// values (one 16-byte vector), the block's amax is a 16-lane reduction.
// (DeepEP's low-latency dispatch quantizes in its send kernel too; XLA's
// quantize-and-pack before the kernel cost more than the halved bytes saved.)
__device__ __forceinline__ void WarpQuantizeRow(char* dst, const char* x, int64_t H, int64_t b0,
                                                int64_t nb, int lane) {
  using Traits = VecTraits<__nv_bfloat16>;
  const int half = lane >> 4, l16 = lane & 15;
  float* scales = reinterpret_cast<float*>(dst + H);
  for (int64_t p = 0; p < nb; p += 2) {
    const int64_t b = b0 + p + half;
    const bool valid = p + half < nb;
    float f[Traits::kElems];
    Traits::ToFloats(valid ? LoadNc16(reinterpret_cast<const int4*>(x) + b * 16 + l16)
                           : make_int4(0, 0, 0, 0),
                     f);
    float amax = 0.f;
#pragma unroll
    for (int e = 0; e < Traits::kElems; ++e) amax = NanMax(fabsf(f[e]), amax);
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = NanMax(__shfl_xor_sync(kFullMask, amax, o), amax);
    const float scaled = __fmul_rn(amax, static_cast<float>(1.0 / kFp8Max));  // as jnp's f32(1/448)
    const float s = NanMax(scaled, FLT_MIN);
    const float inv = __frcp_rn(s);  // 1 / s, correctly rounded like XLA's division
    uint32_t packed[2];
#pragma unroll
    for (int w = 0; w < 2; ++w) {
      uint32_t word = 0;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        float2 v;
        v.x = __fmul_rn(f[4 * w + 2 * j], inv);
        v.y = __fmul_rn(f[4 * w + 2 * j + 1], inv);
        // clip, keeping a NaN (XLA's clamp does; fminf/fmaxf would not)
        v.x = v.x != v.x ? v.x : fminf(fmaxf(v.x, -kFp8Max), kFp8Max);
        v.y = v.y != v.y ? v.y : fminf(fmaxf(v.y, -kFp8Max), kFp8Max);
        const uint32_t two = __nv_cvt_float2_to_fp8x2(v, __NV_SATFINITE, __NV_E4M3);
        word |= two << (16 * j);  // v.x in the lower byte: value order in memory
      }
      packed[w] = word;
    }
    if (valid) {
      *reinterpret_cast<uint2*>(dst + b * kFp8Block + l16 * 8) = make_uint2(packed[0], packed[1]);
      if (l16 == 0) scales[b] = s;
    }
  }
}

// A receive's entry check: the send whose ticket it holds was this Buffer's
// last op (its receive is pending). Returns the op's sequence number.
__device__ uint32_t CheckedReceive(const GroupView& g, const Entry& e, int op) {
  if (e.ticket == 0 || e.pending_seq != e.ticket || e.pending_op != op) {
    Fail(g, kFaultNothingToReceive, op, e.rank, e.rank, e.pending_op, e.pending_seq);
  }
  return e.ticket;
}

// Spins until `flag` carries `seq`; returns its low word. A timeout names
// rank `peer`.
__device__ uint32_t WaitFlag(const GroupView& g, const uint64_t* flag, uint32_t seq, int op,
                             int me, int peer, int64_t timeout_ns) {
  Deadline dl(timeout_ns);
  while (true) {
    const uint64_t v = LoadAcquireSysU64(flag);
    if (HelloSeq(v) == seq) return static_cast<uint32_t>(v);
    if (dl.Expired()) Fail(g, kFaultTimeout, op, me, peer, kOpNone, seq);
  }
}

// Slot (s, i, k) of a handle's recv_slot: the flat row e * R*T + r of y that
// holds the copy, or -1 (none, or not a row of y: a foreign handle).
__device__ __forceinline__ int32_t CopyRow(const int32_t* recv_slot, int64_t j, int64_t y_rows) {
  const int32_t r = __ldg(recv_slot + j);
  return r >= 0 && r < y_rows ? r : -1;
}

// ---------------------------------------------------------------------------
// Dispatch, send: task (token i, rank d) per group of warps.
// ---------------------------------------------------------------------------
// The sender numbers its own copies, so that a receiver can place a row as
// soon as it lands, knowing only each source's per-expert totals (the
// counts, sent right after the hellos), not every source's ids. (Until 2026-11-26 the
// receiver numbered the copies from every source's ids once all rows were in:
// ~2.6 us, and no copy could start before the last row landed.)
//
// NumberToken: the place of copy (i, k) among this rank's copies to the same
// expert = the slots before (i, k), in (token, k) order, holding the same id.
// The whole group counts them over topk_idx (an operand, readable before the
// hellos), into parts[warp][k], one sum per warp; the group's barrier ends it.
__device__ __forceinline__ void NumberToken(const int32_t* topk_idx, int64_t i, int K, int gw,
                                            int lane, int group, int (*parts)[kMaxTopK]) {
  const int gtid = gw * 32 + lane;
  const int64_t first = i * K;  // token i's first slot
  for (int kc = 0; kc < K; kc += kPlaceChunk) {
    int32_t want[kPlaceChunk];
    int before[kPlaceChunk];
#pragma unroll
    for (int u = 0; u < kPlaceChunk; ++u) {
      want[u] = kc + u < K ? __ldg(topk_idx + first + kc + u) : -1;
      before[u] = 0;
    }
    // Slots before (i, kc + u) for every u of the chunk.
    const int64_t end = first + min(K, kc + kPlaceChunk) - 1;
    for (int64_t q = gtid; q < end; q += kGroupThreads) {
      const int32_t id = __ldg(topk_idx + q);
#pragma unroll
      for (int u = 0; u < kPlaceChunk; ++u) before[u] += id == want[u] && q < first + kc + u;
    }
#pragma unroll
    for (int u = 0; u < kPlaceChunk; ++u) {
      const int sum = __reduce_add_sync(kFullMask, before[u]);
      if (lane == 0 && kc + u < K) parts[gw][kc + u] = sum;
    }
  }
  GroupBarrier(1 + group, kGroupThreads);
}

// kNumbered (the dispatch; not the cached dispatch, whose handle has the
// places): the copies are numbered, and the last block sends each rank the
// counts of our copies to its experts, (seq << 32) | count words in its
// counts region, right after the hellos.
template <bool kNumbered>
__device__ __forceinline__ void DispatchSendPhase(const DispatchSendArgs& a, int me, char* own,
                                                  uint32_t seq, uint32_t shape_hash,
                                                  PhaseTrace& trace) {
  const GroupView& g = a.group;
  const int op = kOpLowLatencyDispatch;
  const int R = g.num_ranks, lane = LaneId(), warp = WarpId();
  const int tid = static_cast<int>(threadIdx.x);
  const int par = seq & 1;
  const uint64_t hello = PackHello(seq, op, shape_hash);
  const int64_t N = a.num_tokens, T = a.num_max_tokens, row_bytes = a.row_bytes;
  const int K = a.num_topk, E = a.num_experts, El = E / R;
  const LowLatencyRegions reg = MakeLowLatencyRegions(R, T, K, row_bytes);
  const char* x = static_cast<const char*>(a.x);
  const int64_t x_row_bytes = a.x_row_bytes, H8 = a.fp8_hidden;
  // Task t = (token t / R, rank t % R) per group, consecutive tasks on different
  // SMs; warp gw of the group moves part gw of the row, warp 0 the ids. A part
  // is a run of units: 16-byte vectors, or with FP8 quantization blocks of 128
  // values (2 * 128 bytes of x each).
  const int group = warp / kGroupWarps, gw = warp % kGroupWarps;
  const int64_t units = H8 > 0 ? H8 / kFp8Block : row_bytes / 16;
  const int64_t unit_bytes = H8 > 0 ? 2 * kFp8Block : 16;
  const int64_t part = (units + kGroupWarps - 1) / kGroupWarps;
  const int64_t u0 = min(units, gw * part), nu = min(units - u0, part);
  const int64_t step = static_cast<int64_t>(gridDim.x) * kGroups;
  const int64_t first_task = group * static_cast<int64_t>(gridDim.x) + blockIdx.x;
  const bool counts_block = kNumbered && blockIdx.x + 1 == gridDim.x;
  __shared__ int place_parts[kGroups][kGroupWarps][kMaxTopK];
  extern __shared__ int per_expert[];  // counts_block: [E], this rank's copies per expert
  // While the hellos cross the link, the L2 fetches the first task's ids and
  // row (operands, readable at once), which the task then loads first thing.
  if (lane == 0 && first_task < T * R && first_task / R < N) {
    const int64_t i = first_task / R;
    if (nu > 0) {
      PrefetchL2(x + i * x_row_bytes + u0 * unit_bytes, static_cast<uint32_t>(nu * unit_bytes));
    }
    if (gw == 0 && K % 4 == 0) PrefetchL2(a.topk_idx + i * K, static_cast<uint32_t>(4 * K));
  }
  if (blockIdx.x == 0) {
    if (tid == 0) *a.ticket = seq;
    ResetFlags(At<uint64_t>(own, reg.flags), R * T, seq);
    if (kNumbered) ResetFlags(At<uint64_t>(own, reg.counts), E, seq);
    __syncthreads();
    if (warp == 0) SendHellos(g, par, me, hello, lane, /*self=*/true);
  }
  // Work that needs no peer, while the hellos cross: the counts, and the
  // first task's places.
  if (counts_block) {
    for (int q = tid; q < E; q += kThreads) per_expert[q] = 0;
    __syncthreads();
    CountExpertSlots(a.topk_idx, N * K, E, per_expert, tid, kThreads);
    __syncthreads();
  }
  if (kNumbered && first_task < T * R && first_task / R < N) {
    NumberToken(a.topk_idx, first_task / R, K, gw, lane, group, place_parts[group]);
  }
  // Our own hello too: the tasks for this rank write our flags, which block 0
  // resets first.
  if (warp == 0 && lane < R) WaitHello(g, own, par, lane, hello, op, me, seq, a.timeout_ns);
  __syncthreads();
  trace.Mark("hello");
  if (counts_block) {
    for (int q = tid; q < E; q += kThreads) {
      StoreRelaxedSysU64(At<uint64_t>(PeerAt(g, q / El), reg.counts) + me * El + q % El,
                         FlagValue(seq, per_expert[q]));
    }
  }

  for (int64_t t = first_task; t < T * R; t += step) {
    const bool traced = t == first_task;  // the tracer's first task, step by step
    const int64_t i = t / R;
    const int d = static_cast<int>(t % R);
    char* dst = PeerAt(g, d);
    const int64_t slot0 = (me * T + i) * K;
    if (kNumbered && t != first_task && i < N) {
      NumberToken(a.topk_idx, i, K, gw, lane, group, place_parts[group]);
    }
    bool routed = false;
    for (int k0 = 0; k0 < K; k0 += 32) {
      const int k = k0 + lane;
      int32_t id = -1;
      if (k < K) {
        if (i < N) id = __ldg(a.topk_idx + i * K + k);
        if (gw == 0) {
          At<int32_t>(dst, reg.ids)[slot0 + k] = id;
          if (kNumbered) {
            int place = 0;
            if (i < N) {
#pragma unroll
              for (int w = 0; w < kGroupWarps; ++w) place += place_parts[group][w][k];
            }
            At<int32_t>(dst, reg.copy_index)[slot0 + k] = place;
          }
          if (a.weights != nullptr) {
            At<float>(dst, reg.weights)[slot0 + k] = i < N ? __ldg(a.weights + i * K + k) : 0.f;
          }
        }
      }
      routed |= __any_sync(kFullMask, id >= 0 && id < E && id / El == d) != 0;
    }
    if (traced) trace.Mark("task ids");
    if (routed && nu > 0) {
      char* row = dst + reg.data + (me * T + i) * row_bytes;
      if (H8 > 0) {
        WarpQuantizeRow(row, x + i * x_row_bytes, H8, u0, nu, lane);
      } else {
        WarpCopyRow<kSendUnroll, false>(reinterpret_cast<int4*>(row) + u0,
                                        reinterpret_cast<const int4*>(x + i * x_row_bytes) + u0,
                                        nu, lane);
      }
    }
    if (traced) trace.Mark("task row");
    // The group's stores, then the flag: one release after the group's barrier
    // (cumulative over the stores it ordered; a system fence in every lane
    // costs far more).
    GroupBarrier(1 + group, kGroupThreads);
    if (traced) trace.Mark("task barrier");
    if (gw == 0 && lane == 0) {
      StoreReleaseSysU64(At<uint64_t>(dst, reg.flags) + me * T + i, FlagValue(seq, i));
    }
    if (traced) trace.Mark("task flag");
  }
  trace.Mark("send");
}

// The split form's send: marks its receive pending.
__global__ void __launch_bounds__(kThreads, 1)
    DispatchSendKernel(const DispatchSendArgs a, const uint32_t shape_hash) {
  const int op = kOpLowLatencyDispatch;
  PhaseTrace trace;
  const Entry entry = CheckedEntry(a.group, a.rank, op);
  trace.Mark("entry");
  const uint32_t seq = entry.last_seq + 1;
  DispatchSendPhase</*kNumbered=*/true>(a, entry.rank, entry.own, seq, shape_hash, trace);
  const uint32_t pending[2] = {seq, static_cast<uint32_t>(op)};
  FinishOp(entry.own, seq, pending);
  trace.Mark("finish");
  trace.Print("ll dispatch send", entry.rank, seq);
}

// ---------------------------------------------------------------------------
// Dispatch, receive: a warp per slot (s, i, k), placed by the counts and the
// sender's numbering. kCached: the routing comes from the handle (src_slot),
// each block moves its local experts' rows, rows past the count are zeros, and
// copies may be scaled by their weights (the transpose of a weighted combine).
// ---------------------------------------------------------------------------
template <bool kCached>
__device__ __forceinline__ void DispatchRecvPhase(const DispatchRecvArgs& a, int me, char* own,
                                                  uint32_t seq, PhaseTrace& trace) {
  const GroupView& g = a.group;
  const int op = kOpLowLatencyDispatch;
  const int R = g.num_ranks, lane = LaneId(), warp = WarpId();
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t T = a.num_max_tokens, rows = R * T, row_bytes = a.row_bytes;
  const int K = a.num_topk, E = a.num_experts, El = E / R;
  const int64_t S = rows * K;  // slots
  const LowLatencyRegions reg = MakeLowLatencyRegions(R, T, K, row_bytes);

  const uint64_t* flags = At<uint64_t>(own, reg.flags);
  const int32_t* ids = At<const int32_t>(own, reg.ids);
  const float* slot_weights = At<const float>(own, reg.weights);
  const char* arrived = own + reg.data;
  char* recv_x = static_cast<char*>(a.recv_x);
  char* recv_tail = static_cast<char*>(a.recv_tail);
  const int64_t head16 = a.head_bytes / 16, tail4 = recv_tail != nullptr ? a.tail_bytes / 4 : 0;
  if constexpr (!kCached) {
    // Placing: copy (s, i, k) of local expert e goes to row first_row[s][e] +
    // its place among source s's copies to e (the sender's numbering), where
    // first_row[s][e] adds up the counts of the sources before s. The count
    // words (E from each source, sent after the hellos) land with the last
    // rows, the link having no priority; so no block waits for all of them
    // before copying: the warp of a copy reads the s words it needs (none for
    // source 0, this rank's own for source 1 on rank 0, ...) and moves the
    // row once they and its flag are in. The totals (recv_count, the handle's
    // src_slot past them) follow, once every count is in.
    const uint64_t* counts = At<const uint64_t>(own, reg.counts);
    const int32_t* copy_index = At<const int32_t>(own, reg.copy_index);
    // A warp per slot, in (token, source, k) order: the senders push tokens
    // in about that order, so the first warps' rows land first.
    const int64_t nwarps = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t w = static_cast<int64_t>(blockIdx.x) * kWarps + warp; w < S; w += nwarps) {
      const int64_t i = w / (R * K);
      const int s = static_cast<int>((w / K) % R), k = static_cast<int>(w % K);
      const int64_t from = s * T + i;  // the row's slot: source s, token i
      const int64_t j = from * K + k;
      WaitFlag(g, flags + from, seq, op, me, s, a.timeout_ns);
      const int32_t id = __ldcg(ids + j);
      int64_t r = -1;
      if (id >= 0 && id < E && id / El == me) {  // the same for every lane
        const int e = id % El;
        // first_row[s][e]: lane s' < s waits for source s''s count of e.
        const int before = lane < s ? static_cast<int>(WaitFlag(g, counts + lane * El + e, seq,
                                                                op, me, lane, a.timeout_ns))
                                    : 0;
        const int64_t p = static_cast<int64_t>(__reduce_add_sync(kFullMask, before)) +
                          __ldcg(copy_index + j);
        if (p >= 0 && p < rows) r = e * rows + p;  // else past R*T copies (an id repeated): dropped
      }
      if (lane == 0) {
        a.recv_slot[j] = static_cast<int32_t>(r);  // -1: another rank's expert, or none
        if (r >= 0) a.src_slot[r] = static_cast<int32_t>(j);
      }
      if (r < 0) continue;
      const char* src_row = arrived + from * row_bytes;
      WarpCopyRow<kCopyUnroll, true>(reinterpret_cast<int4*>(recv_x + r * a.head_bytes),
                                     reinterpret_cast<const int4*>(src_row), head16, lane);
      if (recv_tail != nullptr) {
        float* tail = reinterpret_cast<float*>(recv_tail + r * a.tail_bytes);
        const float* src_tail = reinterpret_cast<const float*>(src_row + a.head_bytes);
        for (int64_t v = lane; v < tail4; v += 32) tail[v] = __ldcg(src_tail + v);
      }
    }
    trace.Mark("copy");
    // Each local expert's total: recv_count, and the rows past it (src_slot -1).
    extern __shared__ int total[];  // [El]
    __syncthreads();  // the send phase's per-expert counts (the last block) used this memory
    for (int e = tid; e < El; e += kThreads) {
      int run = 0;
      for (int src = 0; src < R; ++src) {
        run += static_cast<int>(WaitFlag(g, counts + src * El + e, seq, op, me, src, a.timeout_ns));
      }
      total[e] = run;
    }
    __syncthreads();
    trace.Mark("counts");
    for (int64_t q = static_cast<int64_t>(blockIdx.x) * kThreads + tid; q < El * rows;
         q += static_cast<int64_t>(gridDim.x) * kThreads) {
      if (q % rows >= min(static_cast<int64_t>(total[q / rows]), rows)) a.src_slot[q] = -1;
    }
    if (blockIdx.x == 0) {
      for (int e = tid; e < El; e += kThreads) {
        a.recv_count[e] = static_cast<int32_t>(min(static_cast<int64_t>(total[e]), rows));
      }
    }
  } else {
    // Every slot of every source has arrived.
    for (int64_t f = tid; f < rows; f += kThreads) {
      WaitFlag(g, flags + f, seq, op, me, static_cast<int>(f / T), a.timeout_ns);
    }
    __syncthreads();
    trace.Mark("flags");
    // The handle's rows (src_slot_in), each cut into parts of one round of
    // loads per lane (32 * kCopyUnroll vectors); the block's experts in turn,
    // part j to warp j % kWarps, so every warp has bytes in flight even when
    // there are few rows. Rows past the count are zeros (the transpose of a
    // combine), copies scaled by their weights when asked.
    const int64_t parts = (head16 + 32 * kCopyUnroll - 1) / (32 * kCopyUnroll);
    int e = blockIdx.x;
    int64_t base = 0;  // parts of the experts before e
    for (int64_t j = warp;; j += kWarps) {
      while (e < El && j >= base + rows * parts) {
        base += rows * parts;
        e += gridDim.x;
      }
      if (e >= El) break;
      const int64_t p = (j - base) / parts, part = (j - base) % parts;
      const int32_t slot = a.src_slot_in[e * rows + p];
      const int64_t r = e * rows + p;
      const int64_t v0 = part * 32 * kCopyUnroll;
      const int64_t nv = min(head16 - v0, static_cast<int64_t>(32 * kCopyUnroll));
      int4* dst = reinterpret_cast<int4*>(recv_x + r * a.head_bytes) + v0;
      // The tail (FP8 scales) goes with part 0.
      float* tail = recv_tail != nullptr && part == 0
                        ? reinterpret_cast<float*>(recv_tail + r * a.tail_bytes) : nullptr;
      if (slot < 0 || slot >= S) {  // past the count (or a foreign handle)
        for (int64_t v = lane; v < nv; v += 32) Store16(dst + v, make_int4(0, 0, 0, 0));
        if (tail != nullptr) {
          for (int64_t v = lane; v < tail4; v += 32) tail[v] = 0.f;
        }
        continue;
      }
      const char* src_row = arrived + (slot / K) * row_bytes;
      const int4* src = reinterpret_cast<const int4*>(src_row) + v0;
      if (a.weighted) {
        const float w = __ldcg(slot_weights + slot);
        if (a.row_type == RowType::kBF16) {
          WarpScaleRow<__nv_bfloat16>(dst, src, w, nv, lane);
        } else {
          WarpScaleRow<float>(dst, src, w, nv, lane);
        }
      } else {
        WarpCopyRow<kCopyUnroll, true>(dst, src, nv, lane);
        if (tail != nullptr) {
          const float* src_tail = reinterpret_cast<const float*>(src_row + a.head_bytes);
          for (int64_t v = lane; v < tail4; v += 32) tail[v] = __ldcg(src_tail + v);
        }
      }
    }
    trace.Mark("copy");
  }
  trace.Mark("slots");
}

// The split form's receive: the send before it must be the Buffer's last op.
template <bool kCached>
__global__ void __launch_bounds__(kThreads, 1) DispatchRecvKernel(const DispatchRecvArgs a) {
  const int op = kOpLowLatencyDispatch;
  PhaseTrace trace;
  const Entry entry = LoadEntry(a.group, a.rank, op, a.ticket);
  const uint32_t seq = CheckedReceive(a.group, entry, op);
  trace.Mark("entry");
  DispatchRecvPhase<kCached>(a, entry.rank, entry.own, seq, trace);
  const uint32_t none[2] = {0, 0};
  FinishOp(entry.own, seq, none);
  trace.Mark("finish");
  trace.Print("ll dispatch recv", entry.rank, seq);
}

// The plain op: both phases in one kernel (a block goes on to receive as soon
// as its sends are out; one launch, one entry, one exit per op).
template <bool kCached>
__global__ void __launch_bounds__(kThreads, 1)
    DispatchKernel(const DispatchSendArgs s, const DispatchRecvArgs r, const uint32_t shape_hash) {
  PhaseTrace trace;
  const Entry entry = CheckedEntry(s.group, s.rank, kOpLowLatencyDispatch);
  trace.Mark("entry");
  const uint32_t seq = entry.last_seq + 1;
  DispatchSendPhase<!kCached>(s, entry.rank, entry.own, seq, shape_hash, trace);
  DispatchRecvPhase<kCached>(r, entry.rank, entry.own, seq, trace);
  FinishOp(entry.own, seq);
  trace.Mark("finish");
  trace.Print("ll dispatch", entry.rank, seq);
}

// ---------------------------------------------------------------------------
// Combine, send: task (source rank s, token i) per block. The block sums the
// token's copies into a shared-memory stage and one thread pushes it home
// with a bulk (TMA) store, two stages alternating: the SM keeps a whole
// partial sum in flight to the peer without holding it in registers (plain
// per-lane stores made this kernel slower than XLA's all-to-all).
// ---------------------------------------------------------------------------
template <typename Elt>
__device__ __forceinline__ void CombineSendPhase(const CombineSendArgs& a, int me, char* own,
                                                 uint32_t seq, uint32_t shape_hash,
                                                 PhaseTrace& trace) {
  using Traits = VecTraits<Elt>;
  extern __shared__ __align__(128) char smem[];  // a stage of H floats per group
  const GroupView& g = a.group;
  const int op = kOpLowLatencyCombine;
  const int R = g.num_ranks, lane = LaneId(), warp = WarpId();
  const int tid = static_cast<int>(threadIdx.x);
  const int par = seq & 1;
  const uint64_t hello = PackHello(seq, op, shape_hash);
  const int64_t N = a.num_tokens, T = a.num_max_tokens, rows = R * T, H = a.hidden;
  const int K = a.num_topk, El = a.num_experts / R;
  const int64_t y_rows = El * rows, in_row = H * static_cast<int64_t>(sizeof(Elt));
  const LowLatencyRegions reg = MakeLowLatencyRegions(R, T, K, 4 * H);
  const bool weighted = a.weights != nullptr;
  if (blockIdx.x == 0) {
    // This rank's weights, for the peers to read once they see the hello.
    if (tid == 0) *a.ticket = seq;
    if (weighted) {
      float* w = At<float>(own, reg.weights);
      for (int64_t j = tid; j < N * K; j += kThreads) w[j] = __ldg(a.weights + j);
    }
    ResetFlags(At<uint64_t>(own, reg.flags), R * T, seq);
    __syncthreads();  // then the hellos' release stores cover the weights and the flags
    if (warp == 0) SendHellos(g, par, me, hello, lane, /*self=*/true);
  }
  const char* y = static_cast<const char*>(a.y);
  // Task t = (source rank t / T, token t % T) per group, each group with its
  // own stage and bookkeeping; the group's thread 0 issues its bulk stores.
  const int group = warp / kGroupWarps, gw = warp % kGroupWarps;
  const int64_t first_task = group * static_cast<int64_t>(gridDim.x) + blockIdx.x;
  const int64_t task_step = static_cast<int64_t>(gridDim.x) * kGroups;
  // While the hellos cross the link, the L2 fetches the rows of y the group's
  // first task adds (warp 1 of the group; warp 0 of the block waits).
  if (gw == 1 && first_task < rows && lane < K) {
    const int32_t r = CopyRow(a.recv_slot, first_task * K + lane, y_rows);
    if (r >= 0) PrefetchL2(y + r * in_row, static_cast<uint32_t>(in_row));
  }
  if (warp == 0 && lane < R) WaitHello(g, own, par, lane, hello, op, me, seq, a.timeout_ns);
  __syncthreads();
  trace.Mark("hello");

  const int64_t n16 = in_row / 16;
  const int gtid = tid % kGroupThreads;
  const int bar = 1 + group;
  __shared__ int32_t copy_rows[kGroups][kMaxTopK];
  __shared__ float copy_weights[kGroups][kMaxTopK];
  __shared__ int num_copies[kGroups];
  int32_t* copy_row = copy_rows[group];
  float* copy_weight = copy_weights[group];
  const int64_t part_bytes = 4 * H;
  float* stage = reinterpret_cast<float*>(smem + group * part_bytes);
  for (int64_t t = first_task; t < rows; t += task_step) {
    const bool traced = t == first_task;  // the tracer's first task, step by step
    const int s = static_cast<int>(t / T);
    const int64_t i = t % T;
    char* home = PeerAt(g, s);
    // The group's previous bulk store must have read the stage.
    if (gtid == 0) BulkWaitRead<0>();
    if (gw == 0) {  // this token's copies here, in k order, with their weights
      // The weight (a read across the link from the home rank's buffer, in
      // bounds for every lane < K) is loaded beside the handle's slot, not
      // after it: the two round trips overlap instead of adding up.
      const float* w = At<const float>(home, reg.weights) + i * K;
      const float wk = weighted && lane < K ? __ldcg(w + lane) : 1.f;
      const int32_t r = lane < K ? CopyRow(a.recv_slot, t * K + lane, y_rows) : -1;
      const unsigned have = __ballot_sync(kFullMask, r >= 0);
      if (r >= 0) {
        const int at = __popc(have & ((1u << lane) - 1u));
        copy_row[at] = r;
        copy_weight[at] = wk;
      }
      if (lane == 0) num_copies[group] = __popc(have);
    }
    GroupBarrier(bar, kGroupThreads);
    if (traced) trace.Mark("task copies");
    const int nc = num_copies[group];
    if (nc > 0) {
      for (int64_t v0 = gtid; v0 < n16; v0 += kGroupThreads * kSumVecs) {
        float acc[kSumVecs][Traits::kElems];
#pragma unroll
        for (int q = 0; q < kSumVecs; ++q) {
#pragma unroll
          for (int e = 0; e < Traits::kElems; ++e) acc[q][e] = 0.f;
        }
        for (int c0 = 0; c0 < nc; c0 += kSumUnroll) {
          int4 in[kSumVecs][kSumUnroll];
#pragma unroll
          for (int q = 0; q < kSumVecs; ++q) {
            const int64_t v = v0 + q * kGroupThreads;
#pragma unroll
            for (int u = 0; u < kSumUnroll; ++u) {
              if (c0 + u < nc && v < n16) {
                in[q][u] = LoadNc16(reinterpret_cast<const int4*>(y + copy_row[c0 + u] * in_row) + v);
              }
            }
          }
#pragma unroll
          for (int q = 0; q < kSumVecs; ++q) {
#pragma unroll
            for (int u = 0; u < kSumUnroll; ++u) {
              if (c0 + u < nc) {
                float f[Traits::kElems];
                Traits::ToFloats(in[q][u], f);
                const float w = copy_weight[c0 + u];
                // The order and roundings of xla_ll.combine_send: acc + (w * y).
#pragma unroll
                for (int e = 0; e < Traits::kElems; ++e) {
                  acc[q][e] = __fadd_rn(acc[q][e], __fmul_rn(w, f[e]));
                }
              }
            }
          }
        }
#pragma unroll
        for (int q = 0; q < kSumVecs; ++q) {
          const int64_t v = v0 + q * kGroupThreads;
          if (v >= n16) break;
          int4* out = reinterpret_cast<int4*>(stage + v * Traits::kElems);
#pragma unroll
          for (int j = 0; j < Traits::kElems / 4; ++j) out[j] = VecTraits<float>::Pack(acc[q] + 4 * j);
        }
      }
      FenceProxyAsyncShared();  // the stage's writes, then the bulk store that reads them
    }
    GroupBarrier(bar, kGroupThreads);
    if (traced) trace.Mark("task sum");
    // No copy here: the flag says so, and no partial crosses the link.
    if (gtid == 0 && nc > 0) {
      BulkStore(At<float>(home, reg.data) + (me * T + i) * H, stage,
                static_cast<uint32_t>(part_bytes));
      BulkCommit();
    }
    GroupBarrier(bar, kGroupThreads);  // copy_row and num_copies are rewritten next
  }
  trace.Mark("sums");
  // Once the group's partial sums have landed, its flags: (token, whether any
  // copy was here).
  if (gtid == 0) {
    BulkWait<0>();
    trace.Mark("landed");
    FenceProxyAsyncGlobal();
    FenceAcqRelSys();
    for (int64_t t = first_task; t < rows; t += task_step) {
      bool any = false;
      for (int k = 0; k < K; ++k) any |= CopyRow(a.recv_slot, t * K + k, y_rows) >= 0;
      const int s = static_cast<int>(t / T);
      const int64_t i = t % T;
      const int64_t low = i | (any ? (int64_t{1} << 31) : 0);
      StoreRelaxedSysU64(At<uint64_t>(PeerAt(g, s), reg.flags) + me * T + i, FlagValue(seq, low));
    }
  }
  trace.Mark("flagged");
}

template <typename Elt>
__global__ void __launch_bounds__(kThreads, 1)
    CombineSendKernel(const CombineSendArgs a, const uint32_t shape_hash) {
  const int op = kOpLowLatencyCombine;
  PhaseTrace trace;
  const Entry entry = CheckedEntry(a.group, a.rank, op);
  trace.Mark("entry");
  const uint32_t seq = entry.last_seq + 1;
  CombineSendPhase<Elt>(a, entry.rank, entry.own, seq, shape_hash, trace);
  const uint32_t pending[2] = {seq, static_cast<uint32_t>(op)};
  FinishOp(entry.own, seq, pending);
  trace.Mark("finish");
  trace.Print("ll combine send", entry.rank, seq);
}

// ---------------------------------------------------------------------------
// Combine, receive: token per block; the partials of every rank in rank order.
// ---------------------------------------------------------------------------
template <typename Elt>
__device__ __forceinline__ void CombineRecvPhase(const CombineRecvArgs& a, int me, char* own,
                                                 uint32_t seq, PhaseTrace& trace) {
  using Traits = VecTraits<Elt>;
  const GroupView& g = a.group;
  const int op = kOpLowLatencyCombine;
  const int R = g.num_ranks;
  const int tid = static_cast<int>(threadIdx.x);
  const int64_t N = a.num_tokens, T = a.num_max_tokens, H = a.hidden;
  // The flags and partial sums; K only places regions it does not use.
  const LowLatencyRegions reg = MakeLowLatencyRegions(R, T, a.num_topk, 4 * H);
  const uint64_t* flags = At<uint64_t>(own, reg.flags);
  const float* partials = At<const float>(own, reg.data);
  char* out = static_cast<char*>(a.out);
  const int64_t n16 = H * static_cast<int64_t>(sizeof(Elt)) / 16;  // output vectors per row
  __shared__ int has[kMaxRanks];
  for (int64_t i = blockIdx.x; i < N; i += gridDim.x) {
    if (tid < R) {
      const uint32_t low = WaitFlag(g, flags + tid * T + i, seq, op, me, tid, a.timeout_ns);
      has[tid] = (low >> 31) & 1u;
    }
    __syncthreads();
    for (int64_t v = tid; v < n16; v += kThreads) {
      float acc[Traits::kElems];
#pragma unroll
      for (int e = 0; e < Traits::kElems; ++e) acc[e] = 0.f;
      for (int d = 0; d < R; ++d) {
        if (!has[d]) continue;  // a zero partial: adding it changes nothing
        const int4* p = reinterpret_cast<const int4*>(partials + (d * T + i) * H +
                                                      v * Traits::kElems);
#pragma unroll
        for (int q = 0; q < Traits::kElems / 4; ++q) {
          float f[4];
          VecTraits<float>::ToFloats(LoadCg16(p + q), f);
#pragma unroll
          for (int e = 0; e < 4; ++e) acc[4 * q + e] = __fadd_rn(acc[4 * q + e], f[e]);
        }
      }
      Store16(reinterpret_cast<int4*>(out + i * H * static_cast<int64_t>(sizeof(Elt))) + v,
              Traits::Pack(acc));
    }
    __syncthreads();
  }
  trace.Mark("recv");
}

template <typename Elt>
__global__ void __launch_bounds__(kThreads, 1) CombineRecvKernel(const CombineRecvArgs a) {
  const int op = kOpLowLatencyCombine;
  PhaseTrace trace;
  const Entry entry = LoadEntry(a.group, a.rank, op, a.ticket);
  const uint32_t seq = CheckedReceive(a.group, entry, op);
  trace.Mark("entry");
  CombineRecvPhase<Elt>(a, entry.rank, entry.own, seq, trace);
  const uint32_t none[2] = {0, 0};
  FinishOp(entry.own, seq, none);
  trace.Mark("finish");
  trace.Print("ll combine recv", entry.rank, seq);
}

// The plain op: both phases in one kernel.
template <typename Elt>
__global__ void __launch_bounds__(kThreads, 1)
    CombineKernel(const CombineSendArgs s, const CombineRecvArgs r, const uint32_t shape_hash) {
  PhaseTrace trace;
  const Entry entry = CheckedEntry(s.group, s.rank, kOpLowLatencyCombine);
  trace.Mark("entry");
  const uint32_t seq = entry.last_seq + 1;
  CombineSendPhase<Elt>(s, entry.rank, entry.own, seq, shape_hash, trace);
  CombineRecvPhase<Elt>(r, entry.rank, entry.own, seq, trace);
  FinishOp(entry.own, seq);
  trace.Mark("finish");
  trace.Print("ll combine", entry.rank, seq);
}

}  // namespace

cudaError_t Preload() {
  cudaFuncAttributes attr;
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchRecvKernel<true>));
  // The combine's send may take the whole shared-memory budget for its stages;
  // the dispatch's numbering up to kMaxLowLatencyNumberingSmem (its kernels
  // have static shared memory too, which counts against the same budget).
  const int smem = static_cast<int>(kMaxLowLatencySmem);
  const int numbering = static_cast<int>(kMaxLowLatencyNumberingSmem);
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      DispatchSendKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, numbering));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      DispatchRecvKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, numbering));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      DispatchKernel<false>, cudaFuncAttributeMaxDynamicSharedMemorySize, numbering));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CombineSendKernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CombineSendKernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CombineKernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CombineKernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, DispatchKernel<true>));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, CombineRecvKernel<__nv_bfloat16>));
  return cudaFuncGetAttributes(&attr, CombineRecvKernel<float>);
}

uint32_t DispatchHash(const DispatchSendArgs& a) {
  return ShapeHash({a.num_max_tokens, a.num_topk, a.row_bytes, a.num_experts,
                    a.weights != nullptr});
}

uint32_t CombineHash(const CombineSendArgs& a) {
  return ShapeHash({a.num_max_tokens, a.num_topk, a.hidden, a.num_experts,
                    static_cast<int64_t>(a.row_type), a.weights != nullptr});
}

// The dispatch's shared memory: the send's per-expert counts (the last block,
// E ints), then the receive's per-expert totals (E/R ints, in the same
// memory); errors past the kernels' budget (the handlers' Decode already
// refuses more than kMaxLowLatencyExperts experts, which keeps within it).
cudaError_t NumberingSmem(int64_t E, size_t* smem) {
  *smem = static_cast<size_t>(4 * E);
  return static_cast<int64_t>(*smem) > kMaxLowLatencyNumberingSmem ? cudaErrorInvalidValue
                                                                    : cudaSuccess;
}

// A stage of H floats per task group (the combine's send); errors for a hidden too large.
cudaError_t CombineSmem(const CombineSendArgs& a, size_t* smem) {
  *smem = static_cast<size_t>(8 * a.hidden);
  return static_cast<int64_t>(*smem) > kMaxLowLatencySmem ? cudaErrorInvalidValue
                                                                 : cudaSuccess;
}

cudaError_t DispatchSend(const DispatchSendArgs& a, cudaStream_t stream) {
  size_t smem = 0;
  JAX_EP_CUDA_RETURN_IF_ERROR(NumberingSmem(a.num_experts, &smem));
  DispatchSendKernel<<<Grid(a.group), kThreads, smem, stream>>>(a, DispatchHash(a));
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t Dispatch(const DispatchSendArgs& s, const DispatchRecvArgs& r, cudaStream_t stream) {
  if (r.src_slot_in != nullptr) {
    DispatchKernel<true><<<Grid(s.group), kThreads, 0, stream>>>(s, r, DispatchHash(s));
  } else {
    size_t smem = 0;
    JAX_EP_CUDA_RETURN_IF_ERROR(NumberingSmem(r.num_experts, &smem));
    DispatchKernel<false><<<Grid(s.group), kThreads, smem, stream>>>(s, r, DispatchHash(s));
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t DispatchRecv(const DispatchRecvArgs& a, cudaStream_t stream) {
  if (a.src_slot_in != nullptr) {
    DispatchRecvKernel<true><<<Grid(a.group), kThreads, 0, stream>>>(a);
  } else {
    size_t smem = 0;
    JAX_EP_CUDA_RETURN_IF_ERROR(NumberingSmem(a.num_experts, &smem));
    DispatchRecvKernel<false><<<Grid(a.group), kThreads, smem, stream>>>(a);
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t CombineSend(const CombineSendArgs& a, cudaStream_t stream) {
  size_t smem = 0;
  JAX_EP_CUDA_RETURN_IF_ERROR(CombineSmem(a, &smem));
  if (a.row_type == RowType::kBF16) {
    CombineSendKernel<__nv_bfloat16><<<Grid(a.group), kThreads, smem, stream>>>(a, CombineHash(a));
  } else {
    CombineSendKernel<float><<<Grid(a.group), kThreads, smem, stream>>>(a, CombineHash(a));
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t Combine(const CombineSendArgs& s, const CombineRecvArgs& r, cudaStream_t stream) {
  size_t smem = 0;
  JAX_EP_CUDA_RETURN_IF_ERROR(CombineSmem(s, &smem));
  if (s.row_type == RowType::kBF16) {
    CombineKernel<__nv_bfloat16><<<Grid(s.group), kThreads, smem, stream>>>(s, r, CombineHash(s));
  } else {
    CombineKernel<float><<<Grid(s.group), kThreads, smem, stream>>>(s, r, CombineHash(s));
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t CombineRecv(const CombineRecvArgs& a, cudaStream_t stream) {
  if (a.row_type == RowType::kBF16) {
    CombineRecvKernel<__nv_bfloat16><<<Grid(a.group), kThreads, 0, stream>>>(a);
  } else {
    CombineRecvKernel<float><<<Grid(a.group), kThreads, 0, stream>>>(a);
  }
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace low_latency
}  // namespace jax_ep
