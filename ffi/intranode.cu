// Intranode dispatch / cached dispatch / combine over peer-mapped buffers
// (NVLink), one fused kernel per op. See docs/design.md "Intranode v2".
//
// Every block runs warps in three roles at once, so that nothing waits for a
// whole phase to finish:
//   - push warps read each row once (bulk load into shared memory) and bulk-
//     store it into every peer that needs it, then flag the row in that peer's
//     buffer once the store is complete;
//   - local warps copy the rows that stay on this rank straight into the
//     output (no staging);
//   - drain warps (dispatch) copy rows out of this rank's buffer as their
//     flags arrive; reduce warps (combine) sum each token's copies as they
//     arrive.
// Ops are ordered across ranks by per-Buffer sequence numbers: each op opens
// with a 64-bit "hello" (sequence, op, shape hash) written into every peer;
// a rank writes into a peer only after reading that peer's hello for the same
// op, i.e. after the peer has finished everything before it. Row flags carry
// the sequence number too, and block 0 resets the op's flag slots before its
// hello (ResetFlags: another op's rows may lie there), so stale bytes can never
// pass for a flag. Ideas from DeepEP (csrc/kernels/intranode.cu: count exchange
// through peers' buffers, prefix offsets, sender/receiver specialisation) and
// from NVIDIA's Hybrid-EP / DeepEP V2 (TMA for NVLink traffic).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>

#include "common.cuh"
#include "kernels.h"

namespace jax_ep {
namespace intranode {
namespace {

constexpr int kWarps = 10;
constexpr int kThreads = kWarps * 32;
constexpr int kPushWarps = 2;                        // warps 0-1
constexpr int kCopyWarps = 4;                        // per copy role
constexpr int kFirstLocalWarp = kPushWarps;          // warps 2-5: local rows
constexpr int kFirstDrainWarp = kPushWarps + kCopyWarps;  // warps 6-9: arrived rows
// Copy warps move rows with plain 16-byte loads and stores, kCopyUnroll per
// lane in flight: each SM's bulk-copy (TMA) unit is left to the push warps.
// (v2's first copies went through it too: cached dispatch took 243 us, now
// 220 us, and 215 us with the copies turned off, on two H200s.)
constexpr int kCopyUnroll = 16;
static_assert(kFirstDrainWarp + kCopyWarps == kWarps, "warp roles");
// Combine: the push warps, then reduce warps that sum with plain loads,
// kReduceUnroll 16-byte loads per source in flight per lane, so that the sum
// keeps enough bytes in flight to run at HBM speed. (v2's first combine summed
// through bulk loads, one chunk ahead per warp: 7 us per chunk, and it scaled
// with the SM count: the reduce, not the link, set the pace.)
constexpr int kReduceWarps = kWarps - kPushWarps;
constexpr int kReduceUnroll = 8;
// Three or more copies (R >= 3) are added in a balanced tree over the ranks
// (absent ones zero), the order of jax_ep.backends.xla.pairwise_sum: the
// backends then agree bit for bit, and a two-axis Buffer's per-node sums are
// subtrees of it (issue 13). kTreeUnroll loads per rank in flight per lane.
// (One: at two the kernel spilled 48 bytes.)
constexpr int kTreeUnroll = 1;
static_assert(kMaxRanks == 8, "the reduce's tree has 8 leaves");

// ((v0 + v1) + (v2 + v3)) + ((v4 + v5) + (v6 + v7)): pairwise_sum's order,
// the tree over 8 leaves (zero-padded past R) adding what the padded tree
// over R leaves adds.
__device__ __forceinline__ float TreeSum8(const float (&v)[kMaxRanks]) {
  return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7]));
}
constexpr int kPushStages = 4, kPushLookahead = 2;
// Pushed rows are flagged in batches of Plan::flag_batch, leaving the newest
// Plan::flag_keep bulk stores in flight: a flag needs its row's store complete
// plus a system-scope fence, and paying that per row would cap a warp at about
// one row per NVLink round trip. The ring holds the rows not yet flagged.
constexpr int kFlagRing = 16;
constexpr int kHistBins = 256;  // shared-memory expert histogram when E/R fits
// Dynamic shared memory per block: the opt-in maximum less room for the
// kernels' static arrays.
constexpr int64_t kSmemBudget = kMaxSmemBytes - 1024;
// Every kernel's shared-memory stages are the push warps' rings (the other
// roles work from registers), one mbarrier each.
constexpr int kStages = kPushWarps * kPushStages;

// Per-launch shared-memory plan, made on the host (MakePlan).
struct Plan {
  int grid;
  int flag_batch;       // rows flagged together, 1..kFlagRing - flag_keep
  int flag_keep;        // newest stores left in flight when flagging: 0, 1, 2 or 4
  int num_chunks;       // bulk copies per row
  int64_t chunk_bytes;  // bytes per bulk copy (the last chunk of a row may be shorter)
  int64_t stage_bytes;  // stride between stages, >= chunk_bytes
  int64_t bars_offset, flag_ring_offset, hist_offset, smem_bytes;
  bool use_hist;
};

// A pushed row waiting for its flag: the value's low word and the row per rank.
struct FlagEntry {
  int64_t low;  // -1: nothing to flag (not the last chunk of a row)
  int pos[kMaxRanks];
};

// ---------------------------------------------------------------------------
// Small device helpers.
// ---------------------------------------------------------------------------
// Receive rows that hold data: the routed count, capped at the capacity M.
__device__ __forceinline__ int64_t ValidRows(int32_t num_recv_tokens, int64_t M) {
  const int64_t n = num_recv_tokens < 0 ? 0 : num_recv_tokens;
  return n < M ? n : M;
}

__device__ __forceinline__ int PeerIndex(int d, int at) { return d < at ? d : d - 1; }

__device__ __forceinline__ uint32_t ChunkBytes(const Plan& p, int64_t row_bytes, int c) {
  return static_cast<uint32_t>(c + 1 < p.num_chunks ? p.chunk_bytes
                                                    : row_bytes - c * p.chunk_bytes);
}

// Waits until every bulk group but the newest `keep` of this thread completed.
__device__ __forceinline__ void BulkWaitKeep(int keep) {
  switch (keep) {
    case 0: BulkWait<0>(); break;
    case 1: BulkWait<1>(); break;
    case 2: BulkWait<2>(); break;
    default: BulkWait<4>(); break;
  }
}

// How many consecutive items v, v + step, ... (< end) are ready to be read,
// spinning until v is: lane j checks item v + j * step with `is_ready(item)`
// (all lanes call this). One fence then orders the flags read against the bulk
// loads lane 0 issues next, for the whole run.
template <class IsReady, class OnTimeout>
__device__ int WaitReadyRun(int64_t v, int64_t end, int64_t step, IsReady is_ready,
                            OnTimeout on_timeout, int64_t timeout_ns, int lane) {
  Deadline dl(timeout_ns);
  while (true) {
    const int64_t item = v + lane * step;
    const bool ok = item >= end || is_ready(item);
    const unsigned bal = __ballot_sync(kFullMask, ok);
    if (bal & 1u) {
      __syncwarp();
      if (lane == 0) FenceProxyAsyncGlobal();
      __syncwarp();
      return bal == kFullMask ? 32 : __ffs(~bal) - 1;
    }
    if (dl.Expired() && lane == 0) on_timeout();
    __syncwarp();
  }
}

// How far the last WaitReadyRun reached: a warp walking items v, v + step, ...
// waits again only once it passes the end of the run it last saw ready.
struct ReadyRuns {
  int64_t until = 0;
  template <class IsReady, class OnTimeout>
  __device__ __forceinline__ void Wait(int64_t v, int64_t end, int64_t step, IsReady is_ready,
                                       OnTimeout on_timeout, int64_t timeout_ns, int lane) {
    if (v < until) return;
    until = v + step * WaitReadyRun(v, end, step, is_ready, on_timeout, timeout_ns, lane);
  }
};

// Within rows [a, z), whose values `row_token` ascend (tokens, or source ranks),
// the first row whose value is >= t.
__device__ __forceinline__ int64_t FirstRowFrom(const int32_t* row_token, int64_t a, int64_t z,
                                                int64_t t) {
  while (a < z) {
    const int64_t m = (a + z) / 2;
    if (__ldg(row_token + m) < t) a = m + 1; else z = m;
  }
  return a;
}

// This block's share of up to R row ranges, concatenated, so a warp can walk
// them with one index. Set: [lo + b*n/G, lo + (b+1)*n/G) of each range.
// SetByTokens: the rows of tokens [b*N/G, (b+1)*N/G), which is exactly what
// block b of the token's rank pushes (cached dispatch) or sums (combine): a
// share cut by rows puts the rows near a cut in the neighbour block, whose
// pusher sends them last, and a warp that waits for its first token in order
// then idles until the end (the DeepEP-shape combine trace: one block's first
// token at 212 us of 390).
struct Windows {
  int64_t lo[kMaxRanks], len[kMaxRanks];
  int64_t total;
  __device__ void Set(const int64_t (&range_lo)[kMaxRanks], const int64_t (&range_hi)[kMaxRanks],
                      int skip) {
    total = 0;
    const int64_t b = blockIdx.x, G = gridDim.x;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      const int64_t span = range_hi[d] - range_lo[d];
      const int64_t n = (d == skip || span < 0) ? 0 : span;
      lo[d] = range_lo[d] + b * n / G;
      len[d] = range_lo[d] + (b + 1) * n / G - lo[d];
      total += len[d];
    }
  }
  // Rows sorted by token within each range (a handle's receive rows); lane d
  // searches range d; every lane calls it.
  __device__ void SetByTokens(const int32_t* row_token, int64_t N,
                              const int64_t (&range_lo)[kMaxRanks],
                              const int64_t (&range_hi)[kMaxRanks], int skip, int lane) {
    const int64_t b = blockIdx.x, G = gridDim.x;
    int64_t a = 0, z = 0;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (d == lane) {
        a = range_lo[d];
        z = (d == skip || range_hi[d] < a) ? a : range_hi[d];
      }
    }
    const int64_t first = FirstRowFrom(row_token, a, z, b * N / G);
    const int64_t stop = FirstRowFrom(row_token, first, z, (b + 1) * N / G);
    total = 0;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      lo[d] = __shfl_sync(kFullMask, first, d);
      len[d] = __shfl_sync(kFullMask, stop, d) - lo[d];
      total += len[d];
    }
  }
  // Row of item v (< total) and the range (source rank) it belongs to.
  __device__ int64_t Row(int64_t v, int* range) const {
    int64_t row = -1;
    int which = -1;
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
      if (which < 0 && v < len[d]) {
        row = lo[d] + v;
        which = d;
      }
      if (which < 0) v -= len[d];
    }
    *range = which;
    return row;
  }
};

// Block 0 of an op whose peers may push as soon as they see its hello (cached
// dispatch, combine): this op's flag slots are reset (ResetFlags), then the
// hellos go out. The whole block calls it.
__device__ void OpenOp(const GroupView& g, char* own, const IntranodeRegions& reg, int par, int me,
                       uint32_t seq, uint64_t hello, int warp, int lane) {
  ResetFlags(At<uint64_t>(own, reg.flags), reg.num_flags, seq);
  __syncthreads();
  if (warp == 0) SendHellos(g, par, me, hello, lane);
}

// Row ranges of each source rank among the first `valid` receive rows, which
// are sorted by source rank (binary search, one lane per rank).
__device__ void SourceRanges(const int32_t* recv_src_rank, int64_t valid, int R, int lane,
                             int64_t (&lo)[kMaxRanks], int64_t (&hi)[kMaxRanks]) {
  // The first row with source >= lane.
  const int64_t mine = lane <= R ? FirstRowFrom(recv_src_rank, 0, valid, lane) : valid;
#pragma unroll
  for (int d = 0; d < kMaxRanks; ++d) {
    const int64_t start = __shfl_sync(kFullMask, mine, d);
    const int64_t stop = __shfl_sync(kFullMask, mine, d + 1);
    lo[d] = d < R ? start : valid;
    hi[d] = d < R ? stop : valid;
  }
}

// ---------------------------------------------------------------------------
// A warp's ring of shared-memory stages; lane 0 issues the bulk copies, every
// lane tracks the barrier phases.
// ---------------------------------------------------------------------------
struct Ring {
  char* stage0;
  uint64_t* bar0;
  int64_t stage_bytes;
  uint32_t phase;
  __device__ char* Stage(int s) const { return stage0 + s * stage_bytes; }
};

__device__ Ring MakeRing(char* smem, const Plan& p, int first_stage, int first_bar, int num_bars,
                         int lane) {
  Ring r{smem + first_stage * p.stage_bytes, At<uint64_t>(smem, p.bars_offset) + first_bar,
         p.stage_bytes, 0u};
  if (lane == 0) {
    for (int s = 0; s < num_bars; ++s) MbarInit(r.bar0 + s);
    FenceMbarInit();
  }
  __syncwarp();
  return r;
}

__device__ __forceinline__ void RingWait(Ring& r, int s) {
  while (!MbarTryWait(r.bar0 + s, (r.phase >> s) & 1u)) {
  }
  r.phase ^= 1u << s;
}

// Push pipeline: items are (index, chunk); `next(i)` is the first index >= i
// with a destination (or >= end); `dests(i, pos, &low)` gives every lane the
// destination row per rank (-1: none) and the flag's low word; `src_row(i)`,
// `dst_row(d, pos)`, `dst_flag(d, pos)` address rows and flags; `meta(i, d,
// pos, lane)` writes a row's metadata (all lanes). Rows are flagged in
// batches once their bulk stores are complete (see kFlagRing).
template <class Next, class Dests, class SrcRow, class DstRow, class DstFlag, class Meta>
__device__ void PushPipeline(int64_t first, int64_t end, int64_t step, Next next, Dests dests,
                             SrcRow src_row, DstRow dst_row, DstFlag dst_flag, Meta meta,
                             Ring& ring, FlagEntry* ring_flags, const Plan& p, int64_t row_bytes,
                             uint32_t seq, int lane) {
  constexpr int S = kPushStages, L = kPushLookahead;
  int64_t li = next(first), si = li, loaded = 0, stored = 0;
  int lc = 0, sc = 0;
  auto issue_load = [&] {
    const int s = static_cast<int>(loaded % S);
    if (lane == 0) {
      const uint32_t bytes = ChunkBytes(p, row_bytes, lc);
      MbarArriveExpectTx(ring.bar0 + s, bytes);
      BulkLoad(ring.Stage(s), src_row(li) + lc * p.chunk_bytes, bytes, ring.bar0 + s);
    }
    ++loaded;
    if (++lc == p.num_chunks) {
      lc = 0;
      li = next(li + step);
    }
  };
  int64_t flagged = 0;  // items before this one have had their flags written
  // Lane 0, once the stores of items [flagged, upto) are complete: their
  // writes (and every lane's metadata) become visible before the flags.
  auto publish = [&](int64_t upto) {
    FenceProxyAsyncGlobal();
    FenceAcqRelSys();
    for (int64_t q = flagged; q < upto; ++q) {
      const FlagEntry& f = ring_flags[q % kFlagRing];
      if (f.low < 0) continue;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (f.pos[d] >= 0) StoreRelaxedSysU64(dst_flag(d, f.pos[d]), FlagValue(seq, f.low));
      }
    }
  };
  while (loaded < L && li < end) issue_load();
  while (si < end) {
    const int s = static_cast<int>(stored % S);
    RingWait(ring, s);
    int pos[kMaxRanks];
    int64_t low = 0;
    dests(si, pos, &low);
    const bool last_chunk = sc + 1 == p.num_chunks;
    if (lane == 0) {
      const uint32_t bytes = ChunkBytes(p, row_bytes, sc);
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (pos[d] >= 0) BulkStore(dst_row(d, pos[d]) + sc * p.chunk_bytes, ring.Stage(s), bytes);
      }
      BulkCommit();
      FlagEntry& f = ring_flags[stored % kFlagRing];
      f.low = last_chunk ? low : -1;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) f.pos[d] = pos[d];
    }
    if (sc == 0) {
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        if (pos[d] >= 0) meta(si, d, pos[d], lane);
      }
    }
    ++stored;
    __syncwarp();  // every lane's metadata precedes the flags lane 0 may write next
    if (stored - flagged >= p.flag_batch + p.flag_keep) {
      if (lane == 0) {
        BulkWaitKeep(p.flag_keep);
        publish(stored - p.flag_keep);
      }
      flagged = stored - p.flag_keep;
    }
    if (++sc == p.num_chunks) {
      sc = 0;
      si = next(si + step);
    }
    if (li < end) {
      if (lane == 0 && loaded >= S) BulkWaitRead<S - L>();
      issue_load();
    }
  }
  if (lane == 0) {
    BulkWait<0>();
    publish(stored);
  }
  __syncwarp();
}

// Copy role (one destination, no flags): `next(i)` as above, `ready(i)` (all
// lanes, before the row is read) waits until the row may be read,
// `src_row(i)` / `dst_row(i)` address the rows, `meta(i, lane)` handles the
// row's metadata (all lanes). kPeerWritten: the source rows are written by
// peers during the kernel (read through L2 only, see LoadCg16); otherwise
// they are an XLA operand (read-only path).
template <bool kPeerWritten, class Next, class Ready, class SrcRow, class DstRow, class Meta>
__device__ void CopyRows(int64_t first, int64_t end, int64_t step, Next next, Ready ready,
                         SrcRow src_row, DstRow dst_row, Meta meta, int64_t row_bytes, int lane) {
  const int64_t n16 = row_bytes / 16;
  for (int64_t i = next(first); i < end; i = next(i + step)) {
    ready(i);
    const int4* src = reinterpret_cast<const int4*>(src_row(i));
    WarpCopyRow<kCopyUnroll, kPeerWritten>(reinterpret_cast<int4*>(dst_row(i)), src, n16, lane);
    meta(i, lane);
  }
}

// Zero rows [valid, M) of a receive buffer (drain warps of every block).
__device__ void ZeroPadding(int64_t valid, int64_t M, int64_t row_bytes, int K, char* recv_x,
                            int32_t* recv_topk_idx, float* recv_weights, int32_t* recv_src_idx,
                            int32_t* recv_src_rank, int lane) {
  const int64_t gw = static_cast<int64_t>(blockIdx.x) * kCopyWarps + (WarpId() - kFirstDrainWarp);
  const int64_t num = static_cast<int64_t>(gridDim.x) * kCopyWarps;
  const int64_t n16 = row_bytes / 16;
  const int4 z = make_int4(0, 0, 0, 0);
  for (int64_t r = valid + gw; r < M; r += num) {
    int4* row = reinterpret_cast<int4*>(recv_x + r * row_bytes);
    for (int64_t j = lane; j < n16; j += 32) Store16(row + j, z);
    if (lane < K) {
      if (recv_topk_idx != nullptr) recv_topk_idx[r * K + lane] = -1;
      recv_weights[r * K + lane] = 0.f;
    }
    if (lane == 0 && recv_src_idx != nullptr) {
      recv_src_idx[r] = -1;
      recv_src_rank[r] = -1;
    }
  }
}

// Waits (the calling warp) until blocks [0, nb) of this op have published
// their counts in the header (block_flags[bb] == seq).
__device__ __forceinline__ void WaitBlocksPublished(const GroupView& g, const uint32_t* block_flags,
                                                    int nb, uint32_t seq, int me,
                                                    int64_t timeout_ns, int lane) {
  Deadline dl(timeout_ns);
  for (int bb = lane; bb < nb; bb += 32) {
    while (LoadAcquireGpuU32(block_flags + bb) != seq) {
      if (dl.Expired()) Fail(g, kFaultTimeout, kOpDispatch, me, me, kOpNone, seq);
    }
  }
  __syncwarp();
}

// Per-rank sums of the header's block counts over blocks [0, nb), into the
// warp's shared `sum[kMaxRanks]`: the lanes split the (block, rank) words, so
// the loads go out in one round (one lane adding nb counts one after another
// took ~2.8 us in block 23 of 24); shared atomics keep registers free.
__device__ __forceinline__ void SumBlockCounts(const int* block_counts, int nb, int R, int lane,
                                               int* sum) {
  if (lane < kMaxRanks) sum[lane] = 0;
  __syncwarp();
  for (int q = lane; q < nb * R; q += 32) {
    atomicAdd(sum + q % R, block_counts[(q / R) * (kMaxRanks + 1) + q % R]);
  }
  __syncwarp();
}

// ---------------------------------------------------------------------------
// Dispatch.
//   Count  every block: destinations of its tokens (from topk_idx), checked
//          against the caller's layout; per-block counts into the header.
//          Block 0 resets the flag slots, then sends its hellos.
//   Then, by role, at once:
//   push   each peer's hello and the counts of the blocks before this one;
//          each token's index j among this rank's rows to rank d, into
//          send_pos; then the rows, into stage slot (our peer index, j) at d,
//          which needs no peer's counts;
//   counts a drain warp: in block 0, the totals (checked against the layout)
//          to every rank as sequence-tagged words; in every block, every
//          rank's counts, then the receive row ranges;
//   copy   local and drain warps, once the ranges are known: this rank's own
//          rows and the peers' staged rows into their receive rows.
//   End    send_pos from j to the receive row at d (-1 past the capacity).
// So the count exchange (two signal hops) runs beside the push instead of
// before it: on two H100s the 128-token dispatch went from 31 to 26-29 us.
// (v1, and DeepEP, exchange the counts first: their senders write each row
// at its final receive row.)
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    DispatchKernel(const DispatchArgs a, const Plan p, const uint32_t shape_hash) {
  extern __shared__ __align__(128) char smem[];
  const GroupView& g = a.group;
  // Traced roles (JAX_EP_PHASE_TRACE): warp 0 (a push warp) and the first
  // drain warp (block 0's totals, every block's counts, then a drain warp).
  PhaseTrace push_trace(0), drain_trace(kFirstDrainWarp * 32);
  const Entry entry = CheckedEntry(g, a.rank, kOpDispatch);
  push_trace.Mark("entry");
  drain_trace.Mark("entry");
  const int me = g.rank;  // == the rank operand (CheckedEntry): a kernel parameter
  const int R = g.num_ranks, G = gridDim.x, b = blockIdx.x;
  const int t = threadIdx.x, lane = LaneId(), warp = WarpId();
  char* own = entry.own;
  const uint32_t seq = entry.last_seq + 1;
  const int par = seq & 1;
  const uint64_t hello = PackHello(seq, kOpDispatch, shape_hash);
  const int64_t N = a.num_tokens, M = a.num_recv_rows, row_bytes = a.row_bytes;
  const int K = a.num_topk, E = a.num_experts, El = E / R;
  const IntranodeRegions reg = MakeIntranodeRegions(R, N, M, row_bytes, K);
  const int64_t t0 = b * N / G, t1 = (b + 1) * N / G;
  int* block_counts = At<int>(own, kBlockCountsOffset);  // [block][kMaxRanks + 1]
  uint32_t* block_flags = At<uint32_t>(own, kBlockFlagOffset);
  uint64_t* count_words = At<uint64_t>(own, kCountsOffset) + par * kMaxRanks * kMaxRanks;
  int* hist = p.use_hist ? At<int>(smem, p.hist_offset) : nullptr;

  __shared__ int s_count[kMaxRanks + 1];  // this block's tokens per rank, + "layout is stale"
  __shared__ int s_counts[kMaxRanks][kMaxRanks];  // [src][dst] rows, every rank's
  __shared__ int s_pre[kMaxRanks];    // warp 0: this rank's rows to d in the blocks before
  __shared__ int s_total[kMaxRanks];  // block 0's totals
  __shared__ int64_t s_off[kMaxRanks];    // rows at rank d from the ranks before us
  __shared__ int64_t s_lo[kMaxRanks], s_hi[kMaxRanks];  // rows from rank s here
  __shared__ int64_t s_valid;
  // [t1 - t0], read by warp 0 before the push warps' first stage is loaded.
  uint8_t* s_mask = reinterpret_cast<uint8_t*>(smem);

  // Count.
  if (t <= kMaxRanks) s_count[t] = 0;
  if (hist != nullptr) {
    for (int e = t; e < El; e += kThreads) hist[e] = 0;
  }
  __syncthreads();
  for (int64_t i = t0 + t; i < t1; i += kThreads) {
    // The caller's layout row first, so its loads and topk_idx's overlap.
    uint32_t given = 0;
    if (a.is_token_in_rank != nullptr) {
      for (int d = 0; d < R; ++d) given |= static_cast<uint32_t>(a.is_token_in_rank[i * R + d]) << d;
    }
    uint32_t mask = 0;
    for (int k = 0; k < K; ++k) {
      const int e = __ldg(a.topk_idx + i * K + k);
      if (e >= 0 && e < E) mask |= 1u << (e / El);
    }
    s_mask[i - t0] = static_cast<uint8_t>(mask);
    if (a.is_token_in_rank != nullptr && given != mask) s_count[kMaxRanks] = 1;
    for (int d = 0; d < R; ++d) {
      if ((mask >> d) & 1u) atomicAdd(&s_count[d], 1);
    }
  }
  if (b == 0) ResetFlags(At<uint64_t>(own, reg.flags), reg.num_flags, seq);  // before the hellos
  __syncthreads();
  push_trace.Mark("counted");
  if (t == 0) {
    for (int d = 0; d <= kMaxRanks; ++d) block_counts[b * (kMaxRanks + 1) + d] = s_count[d];
    StoreReleaseGpuU32(block_flags + b, seq);
  }
  if (b == 0 && warp == 0) SendHellos(g, par, me, hello, lane);

  const char* x = static_cast<const char*>(a.x);
  char* recv_x = static_cast<char*>(a.recv_x);
  int32_t* send_pos = a.send_pos;  // j until the end (see above), then the receive row
  const int32_t* topk_idx = a.topk_idx;
  const float* topk_w = a.topk_weights;
  auto index_of = [&](int64_t i, int d) { return send_pos[i * R + d]; };
  // Warp 0's send_pos reaches the local warps through barrier kReadyBarrier
  // (warp 0 arrives, the local and drain warps wait), the drain warp's ranges
  // in shared memory through the same barrier.
  constexpr int kPushBarrier = 1, kReadyBarrier = 2;
  constexpr int kReadyThreads = (kWarps - kPushWarps + 1) * 32;
  if (warp < kPushWarps) {
    if (warp == 0) {
      if (lane < R && lane != me) {
        WaitHello(g, own, par, lane, hello, kOpDispatch, me, seq, a.timeout_ns);
      }
      WaitBlocksPublished(g, block_flags, b, seq, me, a.timeout_ns, lane);
      push_trace.Mark("hellos");
      SumBlockCounts(block_counts, b, R, lane, s_pre);
      int base[kMaxRanks];  // this rank's rows to d before the tile: blocks before this one first
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) base[d] = s_pre[d];
      for (int64_t tile = t0; tile < t1; tile += 32) {
        const int64_t i = tile + lane;
        const uint32_t mask = i < t1 ? s_mask[i - t0] : 0u;
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
          if (d >= R) continue;
          const bool hit = (mask >> d) & 1u;
          const unsigned bal = __ballot_sync(kFullMask, hit);
          const int j = base[d] + __popc(bal & ((1u << lane) - 1u));
          if (i < t1) send_pos[i * R + d] = hit ? j : -1;
          base[d] += __popc(bal);
        }
      }
      push_trace.Mark("indexed");
      __syncwarp();
      GroupArrive(kReadyBarrier, kReadyThreads);
    }
    GroupBarrier(kPushBarrier, kPushWarps * 32);
    Ring ring = MakeRing(smem, p, warp * kPushStages, warp * kPushStages, kPushStages, lane);
    FlagEntry* ring_flags = At<FlagEntry>(smem, p.flag_ring_offset) + warp * kFlagRing;
    auto next = [&](int64_t i) {
      for (; i < t1; i += kPushWarps) {
        const int q = (lane < R && lane != me) ? index_of(i, lane) : -1;
        if (__ballot_sync(kFullMask, q >= 0) != 0) break;
      }
      return i;
    };
    // pos[d]: the stage slot at rank d, (our peer index there, j).
    auto dests = [&](int64_t i, int (&pos)[kMaxRanks], int64_t* low) {
      const int j = (lane < R && lane != me) ? index_of(i, lane) : -1;
      const int q = j >= 0 ? static_cast<int>(PeerIndex(me, lane) * N + j) : -1;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) pos[d] = __shfl_sync(kFullMask, q, d);
      *low = i;
    };
    auto src_row = [&](int64_t i) { return x + i * row_bytes; };
    auto dst_row = [&](int d, int pos) { return PeerAt(g, d) + reg.stage_rows + pos * row_bytes; };
    auto dst_flag = [&](int d, int pos) { return At<uint64_t>(PeerAt(g, d), reg.flags) + pos; };
    auto meta = [&](int64_t i, int d, int pos, int l) {
      if (l < K) {
        const int e = __ldg(topk_idx + i * K + l);
        const int local = (e >= 0 && e < E && e / El == d) ? e - d * El : -1;
        int32_t* m = At<int32_t>(PeerAt(g, d), reg.stage_meta) + static_cast<int64_t>(pos) * 2 * K;
        m[l] = local;
        reinterpret_cast<float*>(m)[K + l] =
            (local >= 0 && topk_w != nullptr) ? __ldg(topk_w + i * K + l) : 0.f;
      }
    };
    PushPipeline(t0 + warp, t1, kPushWarps, next, dests, src_row, dst_row, dst_flag, meta, ring,
                 ring_flags, p, row_bytes, seq, lane);
    push_trace.Mark("pushed");
  } else {
    if (warp == kFirstDrainWarp) {
      if (b == 0) {
        // The totals, checked against the layout, to every rank.
        WaitBlocksPublished(g, block_flags, G, seq, me, a.timeout_ns, lane);
        SumBlockCounts(block_counts, G, R, lane, s_total);
        int bad = 0;
        if (lane < R && a.num_tokens_per_rank != nullptr && a.num_tokens_per_rank[lane] != s_total[lane]) {
          bad = 1;
        }
        for (int bb = lane; bb < G; bb += 32) bad |= block_counts[bb * (kMaxRanks + 1) + kMaxRanks];
        if (__any_sync(kFullMask, bad)) {
          // Our fault first (ranks driven by one process share its record,
          // whose first writer names the failure), then the abort, so that
          // the peers stop at once ("rank me gave up") instead of timing out.
          if (lane == 0) {
            RecordFault(g.fault_record, kFaultLayoutMismatch, kOpDispatch, me, me, kOpNone, seq);
            __threadfence_system();
          }
          __syncwarp();
          if (lane < R && lane != me) {
            uint64_t* row = At<uint64_t>(PeerAt(g, lane), kCountsOffset) +
                            (par * kMaxRanks + me) * kMaxRanks;
            for (int d = 0; d < R; ++d) StoreReleaseSysU64(row + d, FlagValue(seq, kCountAbort));
          }
          __syncwarp();
          if (lane == 0) Fail(g, kFaultLayoutMismatch, kOpDispatch, me, me, kOpNone, seq);
          __syncwarp();
        }
        for (int e = lane; e < El; e += 32) a.num_recv_tokens_per_expert[e] = 0;
        __syncwarp();
        if (lane < R) {
          // Our own row's release orders the zeroing above before every
          // block's counting (which starts once it reads that row).
          if (lane == me) __threadfence();
          volatile uint64_t* row = At<volatile uint64_t>(PeerAt(g, lane), kCountsOffset) +
                                   (par * kMaxRanks + me) * kMaxRanks;
#pragma unroll
          for (int d = 0; d < kMaxRanks; ++d) {
            if (d < R) row[d] = FlagValue(seq, static_cast<uint32_t>(s_total[d]));
          }
        }
        drain_trace.Mark("counts sent");
      }
      // Every rank's counts; a peer's hello first, so that a peer running
      // another op is named as such rather than timing out.
      if (lane < R && lane != me) {
        WaitHello(g, own, par, lane, hello, kOpDispatch, me, seq, a.timeout_ns);
      }
      {
        Deadline dl(a.timeout_ns);
        for (int q = lane; q < R * R; q += 32) {  // word (src, dst), one per lane
          const int src = q / R, dst = q % R;
          uint64_t v;
          while (HelloSeq(v = LoadAcquireSysU64(count_words + src * kMaxRanks + dst)) != seq) {
            if (dl.Expired()) Fail(g, kFaultTimeout, kOpDispatch, me, src, kOpNone, seq);
          }
          const uint32_t n = static_cast<uint32_t>(v);
          if (n == kCountAbort) Fail(g, kFaultPeerAborted, kOpDispatch, me, src, kOpAbort, seq);
          s_counts[src][dst] = static_cast<int>(n);
        }
      }
      __syncwarp();
      if (lane < R) {
        int64_t off = 0, lo = 0;
        for (int s = 0; s < me; ++s) off += s_counts[s][lane];
        for (int s = 0; s < lane; ++s) lo += s_counts[s][me];
        s_off[lane] = off;
        s_lo[lane] = lo;
        s_hi[lane] = lo + s_counts[lane][me];
      }
      if (lane == 0) {
        int64_t total = 0;
        for (int s = 0; s < R; ++s) total += s_counts[s][me];
        s_valid = total < M ? total : M;
        if (b == 0) *a.num_recv_tokens = static_cast<int32_t>(total);
      }
      __syncwarp();
      drain_trace.Mark("counts");
    }
    GroupBarrier(kReadyBarrier, kReadyThreads);
    const int64_t valid = s_valid;
    if (warp < kFirstDrainWarp) {
      const int w = warp - kFirstLocalWarp;
      const int64_t off = s_off[me];
      auto row_of = [&](int64_t i) {
        const int j = index_of(i, me);
        return j >= 0 && off + j < M ? off + j : int64_t{-1};
      };
      auto next = [&](int64_t i) {
        while (i < t1 && row_of(i) < 0) i += kCopyWarps;
        return i;
      };
      auto ready = [](int64_t) {};
      auto src_row = [&](int64_t i) { return x + i * row_bytes; };
      auto dst_row = [&](int64_t i) { return recv_x + row_of(i) * row_bytes; };
      auto meta = [&](int64_t i, int l) {
        const int64_t r = row_of(i);
        if (l < K) {
          const int e = __ldg(topk_idx + i * K + l);
          const int local = (e >= 0 && e < E && e / El == me) ? e - me * El : -1;
          a.recv_topk_idx[r * K + l] = local;
          a.recv_topk_weights[r * K + l] =
              (local >= 0 && topk_w != nullptr) ? __ldg(topk_w + i * K + l) : 0.f;
          if (local >= 0) atomicAdd(hist != nullptr ? hist + local : a.num_recv_tokens_per_expert + local, 1);
        }
        if (l == 0) {
          a.recv_src_idx[r] = static_cast<int32_t>(i);
          a.recv_src_rank[r] = me;
        }
      };
      CopyRows<false>(t0 + w, t1, kCopyWarps, next, ready, src_row, dst_row, meta, row_bytes, lane);
    } else {
      const int w = warp - kFirstDrainWarp;
      ZeroPadding(valid, M, row_bytes, K, recv_x, a.recv_topk_idx, a.recv_topk_weights,
                  a.recv_src_idx, a.recv_src_rank, lane);
      drain_trace.Mark("zeroed");
      int64_t lo[kMaxRanks], hi[kMaxRanks];
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        lo[d] = d < R ? (s_lo[d] < valid ? s_lo[d] : valid) : 0;
        hi[d] = d < R ? (s_hi[d] < valid ? s_hi[d] : valid) : 0;
      }
      Windows win;
      win.Set(lo, hi, me);
      const uint64_t* flags = At<uint64_t>(own, reg.flags);
      const int32_t* meta_base = At<int32_t>(own, reg.stage_meta);
      // Item v: receive row r from rank s, staged in slot (s's peer index
      // here, r's index among s's rows).
      auto where = [&](int64_t v, int64_t* slot, int* s) {
        const int64_t r = win.Row(v, s);
        *slot = PeerIndex(*s, me) * N + (r - s_lo[*s]);
        return r;
      };
      auto next = [](int64_t v) { return v; };
      ReadyRuns runs;
      auto ready = [&](int64_t v) {
        auto is_ready = [&](int64_t item) {
          int s;
          int64_t slot;
          where(item, &slot, &s);
          return HelloSeq(LoadAcquireSysU64(flags + slot)) == seq;
        };
        auto timeout = [&] {
          int s;
          int64_t slot;
          where(v, &slot, &s);
          Fail(g, kFaultTimeout, kOpDispatch, me, s, kOpNone, seq);
        };
        runs.Wait(v, win.total, kCopyWarps, is_ready, timeout, a.timeout_ns, lane);
      };
      auto src_row = [&](int64_t v) {
        int s;
        int64_t slot;
        where(v, &slot, &s);
        return own + reg.stage_rows + slot * row_bytes;
      };
      auto dst_row = [&](int64_t v) {
        int s;
        int64_t slot;
        return recv_x + where(v, &slot, &s) * row_bytes;
      };
      auto meta = [&](int64_t v, int l) {
        int s;
        int64_t slot;
        const int64_t r = where(v, &slot, &s);
        const int32_t* m = meta_base + slot * 2 * K;
        if (l < K) {
          const int local = m[l];
          a.recv_topk_idx[r * K + l] = local;
          a.recv_topk_weights[r * K + l] = reinterpret_cast<const float*>(m)[K + l];
          if (local >= 0 && local < El) {
            atomicAdd(hist != nullptr ? hist + local : a.num_recv_tokens_per_expert + local, 1);
          }
        }
        if (l == 0) {
          a.recv_src_idx[r] = static_cast<int32_t>(static_cast<uint32_t>(flags[slot]));
          a.recv_src_rank[r] = s;
        }
      };
      CopyRows<true>(w, win.total, kCopyWarps, next, ready, src_row, dst_row, meta, row_bytes,
                     lane);
      drain_trace.Mark("drained");
    }
  }
  __syncthreads();
  // send_pos: j -> the receive row at rank d, -1 past the capacity.
  for (int64_t q = t0 * R + t; q < t1 * R; q += kThreads) {
    const int32_t j = send_pos[q];
    if (j >= 0) {
      const int64_t pos = s_off[q % R] + j;
      send_pos[q] = pos < M ? static_cast<int32_t>(pos) : -1;
    }
  }
  if (hist != nullptr) {
    for (int e = t; e < El; e += kThreads) {
      if (hist[e] != 0) atomicAdd(a.num_recv_tokens_per_expert + e, hist[e]);
    }
  }
  FinishOp(own, seq);
  push_trace.Mark("finish");
  drain_trace.Mark("finish");
  push_trace.Print("dispatch warp 0", me, seq);
  drain_trace.Print("dispatch drain warp", me, seq);
}

// ---------------------------------------------------------------------------
// Cached dispatch: the routing comes from the handle (send_pos, receive rows
// sorted by source rank); only the hello precedes the rows.
// ---------------------------------------------------------------------------
__global__ void __launch_bounds__(kThreads, 1)
    CachedDispatchKernel(const CachedDispatchArgs a, const Plan p, const uint32_t shape_hash) {
  extern __shared__ __align__(128) char smem[];
  const GroupView& g = a.group;
  PhaseTrace push_trace(0), drain_trace(kFirstDrainWarp * 32);  // JAX_EP_PHASE_TRACE
  const Entry entry = CheckedEntry(g, a.rank, kOpCachedDispatch);
  push_trace.Mark("entry");
  drain_trace.Mark("entry");
  const int me = g.rank;  // == the rank operand (CheckedEntry): a kernel parameter
  const int R = g.num_ranks, G = gridDim.x, b = blockIdx.x;
  const int lane = LaneId(), warp = WarpId();
  char* own = entry.own;
  const uint32_t seq = entry.last_seq + 1;
  const int par = seq & 1;
  const uint64_t hello = PackHello(seq, kOpCachedDispatch, shape_hash);
  const int64_t N = a.num_tokens, M = a.num_recv_rows, row_bytes = a.row_bytes;
  const int K = a.num_topk;
  const IntranodeRegions reg = MakeIntranodeRegions(R, N, M, row_bytes, K);
  const int64_t t0 = b * N / G, t1 = (b + 1) * N / G;
  const int64_t valid = ValidRows(*a.num_recv_tokens, M);
  const char* x = static_cast<const char*>(a.x);
  char* recv_x = static_cast<char*>(a.recv_x);
  const float* weights = a.weights;
  // A position outside [0, M) (a foreign handle) sends nothing.
  auto dest_of = [&](int64_t i, int d) {
    const int q = __ldg(a.send_pos + i * R + d);
    return q < M ? q : -1;
  };
  if (b == 0) OpenOp(g, own, reg, par, me, seq, hello, warp, lane);

  if (warp < kPushWarps) {
    if (lane < R && lane != me) {
      WaitHello(g, own, par, lane, hello, kOpCachedDispatch, me, seq, a.timeout_ns);
    }
    __syncwarp();
    push_trace.Mark("hellos");
    Ring ring = MakeRing(smem, p, warp * kPushStages, warp * kPushStages, kPushStages, lane);
    FlagEntry* ring_flags = At<FlagEntry>(smem, p.flag_ring_offset) + warp * kFlagRing;
    auto next = [&](int64_t i) {
      for (; i < t1; i += kPushWarps) {
        const int q = (lane < R && lane != me) ? dest_of(i, lane) : -1;
        if (__ballot_sync(kFullMask, q >= 0) != 0) break;
      }
      return i;
    };
    auto dests = [&](int64_t i, int (&pos)[kMaxRanks], int64_t* low) {
      const int q = (lane < R && lane != me) ? dest_of(i, lane) : -1;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) pos[d] = __shfl_sync(kFullMask, q, d);
      *low = i;
    };
    auto src_row = [&](int64_t i) { return x + i * row_bytes; };
    auto dst_row = [&](int d, int pos) { return PeerAt(g, d) + reg.stage_rows + pos * row_bytes; };
    auto dst_flag = [&](int d, int pos) { return At<uint64_t>(PeerAt(g, d), reg.flags) + pos; };
    auto meta = [&](int64_t i, int d, int pos, int l) {
      if (weights != nullptr && l < K) {
        float* m = At<float>(PeerAt(g, d), reg.stage_meta) + static_cast<int64_t>(pos) * 2 * K;
        m[K + l] = __ldg(weights + i * K + l);
      }
    };
    PushPipeline(t0 + warp, t1, kPushWarps, next, dests, src_row, dst_row, dst_flag, meta, ring,
                 ring_flags, p, row_bytes, seq, lane);
    push_trace.Mark("pushed");
  } else if (warp < kFirstDrainWarp) {
    const int w = warp - kFirstLocalWarp;
    auto next = [&](int64_t i) {
      while (i < t1 && dest_of(i, me) < 0) i += kCopyWarps;
      return i;
    };
    auto ready = [](int64_t) {};
    auto src_row = [&](int64_t i) { return x + i * row_bytes; };
    auto dst_row = [&](int64_t i) { return recv_x + static_cast<int64_t>(dest_of(i, me)) * row_bytes; };
    auto meta = [&](int64_t i, int l) {
      if (l < K) {
        a.recv_weights[static_cast<int64_t>(dest_of(i, me)) * K + l] =
            weights != nullptr ? __ldg(weights + i * K + l) : 0.f;
      }
    };
    CopyRows<false>(t0 + w, t1, kCopyWarps, next, ready, src_row, dst_row, meta, row_bytes, lane);
  } else {
    const int w = warp - kFirstDrainWarp;
    ZeroPadding(valid, M, row_bytes, K, recv_x, nullptr, a.recv_weights, nullptr, nullptr, lane);
    int64_t lo[kMaxRanks], hi[kMaxRanks];
    SourceRanges(a.recv_src_rank, valid, R, lane, lo, hi);
    Windows win;
    win.SetByTokens(a.recv_src_idx, N, lo, hi, me, lane);
    const uint64_t* flags = At<uint64_t>(own, reg.flags);
    const float* meta_base = At<float>(own, reg.stage_meta);
    auto next = [](int64_t v) { return v; };
    ReadyRuns runs;
    auto ready = [&](int64_t v) {
      auto is_ready = [&](int64_t item) {
        int s;
        const int64_t r = win.Row(item, &s);
        const uint64_t f = LoadAcquireSysU64(flags + r);
        if (HelloSeq(f) != seq) return false;
        if (static_cast<int32_t>(static_cast<uint32_t>(f)) != __ldg(a.recv_src_idx + r)) {
          Fail(g, kFaultHandleMismatch, kOpCachedDispatch, me, s, kOpCachedDispatch, seq);
        }
        return true;
      };
      auto timeout = [&] {
        int s;
        win.Row(v, &s);
        Fail(g, kFaultTimeout, kOpCachedDispatch, me, s, kOpNone, seq);
      };
      runs.Wait(v, win.total, kCopyWarps, is_ready, timeout, a.timeout_ns, lane);
    };
    auto src_row = [&](int64_t v) {
      int s;
      return own + reg.stage_rows + win.Row(v, &s) * row_bytes;
    };
    auto dst_row = [&](int64_t v) {
      int s;
      return recv_x + win.Row(v, &s) * row_bytes;
    };
    auto meta = [&](int64_t v, int l) {
      int s;
      const int64_t r = win.Row(v, &s);
      if (l < K) a.recv_weights[r * K + l] = weights != nullptr ? meta_base[r * 2 * K + K + l] : 0.f;
    };
    CopyRows<true>(w, win.total, kCopyWarps, next, ready, src_row, dst_row, meta, row_bytes,
                   lane);
    drain_trace.Mark("drained");
  }
  FinishOp(own, seq);
  push_trace.Mark("finish");
  drain_trace.Mark("finish");
  push_trace.Print("cached dispatch push warp", me, seq);
  drain_trace.Print("cached dispatch drain warp", me, seq);
}

// Three or more copies (R >= 3): the tree over the ranks, kTreeUnroll loads
// per rank in flight.
template <typename T>
__device__ __forceinline__ void TreeSumRow(int4* dst, const int4* const* by_rank, int me,
                                        int64_t n16, int lane) {
  using Traits = VecTraits<T>;
  for (int64_t base = 0; base < n16; base += 32 * kTreeUnroll) {
    int4 v[kMaxRanks][kTreeUnroll];
#pragma unroll
    for (int d = 0; d < kMaxRanks; ++d) {
#pragma unroll
      for (int u = 0; u < kTreeUnroll; ++u) {
        const int64_t j = base + lane + 32 * u;
        v[d][u] = make_int4(0, 0, 0, 0);
        if (j < n16 && by_rank[d] != nullptr) {
          v[d][u] = d == me ? LoadNc16(by_rank[d] + j) : LoadCg16(by_rank[d] + j);
        }
      }
    }
#pragma unroll
    for (int u = 0; u < kTreeUnroll; ++u) {
      const int64_t j = base + lane + 32 * u;
      if (j >= n16) continue;
      // TreeSum8's order, level by level: pairs of ranks, pairs of pairs.
      float pair[kMaxRanks / 2][Traits::kElems], sum[Traits::kElems];
#pragma unroll
      for (int p = 0; p < kMaxRanks / 2; ++p) {
        float lo[Traits::kElems], hi[Traits::kElems];
        Traits::ToFloats(v[2 * p][u], lo);
        Traits::ToFloats(v[2 * p + 1][u], hi);
#pragma unroll
        for (int e = 0; e < Traits::kElems; ++e) pair[p][e] = lo[e] + hi[e];
      }
#pragma unroll
      for (int e = 0; e < Traits::kElems; ++e) {
        sum[e] = (pair[0][e] + pair[1][e]) + (pair[2][e] + pair[3][e]);
      }
      Store16(dst + j, Traits::Pack(sum));
    }
  }
}

// ---------------------------------------------------------------------------
// Combine: push warps send each received row back to its token's home rank
// (slot (our peer index there, token)); reduce warps sum every local token's
// copies (its own row of y straight from y, the others from our slots) as
// their flags arrive, in float32.
// ---------------------------------------------------------------------------
template <typename T>
__global__ void __launch_bounds__(kThreads, 1)
    CombineKernel(const CombineArgs a, const Plan p, const uint32_t shape_hash) {
  using Traits = VecTraits<T>;
  extern __shared__ __align__(128) char smem[];
  const GroupView& g = a.group;
  // Traced roles (JAX_EP_PHASE_TRACE): a push warp and a reduce warp.
  PhaseTrace push_trace(0), reduce_trace(kPushWarps * 32);
  const Entry entry = CheckedEntry(g, a.rank, kOpCombine);
  push_trace.Mark("entry");
  reduce_trace.Mark("entry");
  const int me = g.rank;  // == the rank operand (CheckedEntry): a kernel parameter
  const int R = g.num_ranks, G = gridDim.x, b = blockIdx.x;
  const int lane = LaneId(), warp = WarpId();
  char* own = entry.own;
  const uint32_t seq = entry.last_seq + 1;
  const int par = seq & 1;
  const uint64_t hello = PackHello(seq, kOpCombine, shape_hash);
  const int64_t N = a.num_tokens, M = a.num_recv_rows, row_bytes = a.row_bytes;
  const int K = a.num_topk;
  const IntranodeRegions reg = MakeIntranodeRegions(R, N, M, row_bytes, K);
  const int64_t valid = ValidRows(*a.num_recv_tokens, M);
  const char* y = static_cast<const char*>(a.y);
  const float* weights = a.weights;
  if (b == 0) OpenOp(g, own, reg, par, me, seq, hello, warp, lane);

  if (warp < kPushWarps) {
    // The window first: its searches read only the handle (operands), so they
    // run while the peers' hellos cross the link instead of after them.
    int64_t lo[kMaxRanks], hi[kMaxRanks];
    SourceRanges(a.recv_src_rank, valid, R, lane, lo, hi);
    Windows win;
    win.SetByTokens(a.recv_src_idx, N, lo, hi, me, lane);
    if (lane < R && lane != me) {
      WaitHello(g, own, par, lane, hello, kOpCombine, me, seq, a.timeout_ns);
    }
    __syncwarp();
    push_trace.Mark("hellos");
    Ring ring = MakeRing(smem, p, warp * kPushStages, warp * kPushStages, kPushStages, lane);
    FlagEntry* ring_flags = At<FlagEntry>(smem, p.flag_ring_offset) + warp * kFlagRing;
    // Item v is receive row win.Row(v); it goes to its source rank, unless the
    // handle is foreign (then it is skipped rather than written out of bounds).
    auto target = [&](int64_t v, int64_t* token) {
      int s;
      const int64_t j = win.Row(v, &s);
      const int src = __ldg(a.recv_src_rank + j);
      const int64_t i = __ldg(a.recv_src_idx + j);
      *token = i;
      return (src == s && src != me && i >= 0 && i < N) ? src : -1;
    };
    auto next = [&](int64_t v) {
      int64_t i;
      while (v < win.total && target(v, &i) < 0) v += kPushWarps;
      return v;
    };
    auto dests = [&](int64_t v, int (&pos)[kMaxRanks], int64_t* low) {
      int64_t i;
      const int s = target(v, &i);
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        pos[d] = d == s ? static_cast<int>(PeerIndex(me, s) * N + i) : -1;
      }
      *low = i;
    };
    auto src_row = [&](int64_t v) {
      int s;
      return y + win.Row(v, &s) * row_bytes;
    };
    auto dst_row = [&](int d, int pos) {
      return PeerAt(g, d) + reg.slots + static_cast<int64_t>(pos) * row_bytes;
    };
    auto dst_flag = [&](int d, int pos) { return At<uint64_t>(PeerAt(g, d), reg.flags) + pos; };
    auto meta = [&](int64_t v, int d, int pos, int l) {
      if (weights != nullptr && l < K) {
        int s;
        const int64_t j = win.Row(v, &s);
        At<float>(PeerAt(g, d), reg.slot_weights)[static_cast<int64_t>(pos) * K + l] =
            __ldg(weights + j * K + l);
      }
    };
    PushPipeline(warp, win.total, kPushWarps, next, dests, src_row, dst_row, dst_flag, meta, ring,
                 ring_flags, p, row_bytes, seq, lane);
    push_trace.Mark("pushed");
  } else {
    const int w = warp - kPushWarps;
    const int64_t t0 = b * N / G, t1 = (b + 1) * N / G;
    const int64_t first = t0 + w;
    const int64_t num_tokens = first < t1 ? (t1 - first + kReduceWarps - 1) / kReduceWarps : 0;
    const uint64_t* flags = At<uint64_t>(own, reg.flags);
    const char* slots = own + reg.slots;
    const float* slot_w = At<float>(own, reg.slot_weights);
    char* out = static_cast<char*>(a.combined_x);
    const int64_t n16 = row_bytes / 16;
    // Token m of this warp (i = first + m * kReduceWarps) can be summed once
    // every peer's copy of it has arrived.
    ReadyRuns runs;
    auto token_ready = [&](int64_t m) {
      const int64_t i = first + m * kReduceWarps;
      for (int d = 0; d < R; ++d) {
        if (d == me) continue;
        const int q = __ldg(a.send_pos + i * R + d);
        if (q < 0 || q >= M) continue;
        const uint64_t f = LoadAcquireSysU64(flags + PeerIndex(d, me) * N + i);
        if (HelloSeq(f) != seq) return false;
        if (static_cast<uint32_t>(f) != static_cast<uint32_t>(i)) {
          Fail(g, kFaultHandleMismatch, kOpCombine, me, d, kOpCombine, seq);
        }
      }
      return true;
    };
    auto wait_token = [&](int64_t m) {
      auto timeout = [&] {
        const int64_t i = first + m * kReduceWarps;
        int late = me;
        for (int d = 0; d < R; ++d) {
          const int q = __ldg(a.send_pos + i * R + d);
          if (d != me && q >= 0 && q < M &&
              HelloSeq(LoadAcquireSysU64(flags + PeerIndex(d, me) * N + i)) != seq) {
            late = d;
          }
        }
        Fail(g, kFaultTimeout, kOpCombine, me, late, kOpNone, seq);
      };
      runs.Wait(m, num_tokens, 1, token_ready, timeout, a.timeout_ns, lane);
    };
    for (int64_t m = 0; m < num_tokens; ++m) {
      wait_token(m);
      if (m == 0) reduce_trace.Mark("first ready");
      const int64_t i = first + m * kReduceWarps;
      // The token's copies by rank (nullptr: none there): our own row of y,
      // peers' slots.
      int q = lane < R ? __ldg(a.send_pos + i * R + lane) : -1;
      if (q >= M) q = -1;
      const int4* by_rank[kMaxRanks];
      int nsrc = 0;
      uint32_t mask = 0;
#pragma unroll
      for (int d = 0; d < kMaxRanks; ++d) {
        const int pos = __shfl_sync(kFullMask, q, d);
        by_rank[d] = nullptr;
        if (pos < 0) continue;
        mask |= 1u << d;
        ++nsrc;
        by_rank[d] = reinterpret_cast<const int4*>(
            d == me ? y + static_cast<int64_t>(pos) * row_bytes
                    : slots + (PeerIndex(d, me) * N + i) * row_bytes);
      }
      int4* dst = reinterpret_cast<int4*>(out + i * row_bytes);
      if (nsrc <= 2) {
        // At most two copies (every token at R = 2): their sum is the tree's
        // (the other leaves are zeros); two sources at a time, 2 x kReduceUnroll
        // loads in flight per lane, sums kept across the sources. (A version
        // that took the two by __ffs of the mask and stored per vector ran the
        // combine at DeepEP's shape in 568 us instead of 397 on two H200s.)
        const int4* src[kMaxRanks];
        int ns = 0, local_k = -1;
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
          if (by_rank[d] == nullptr) continue;
          if (d == me) local_k = ns;
          src[ns++] = by_rank[d];
        }
        for (int64_t base = 0; base < n16; base += 32 * kReduceUnroll) {
          float acc[kReduceUnroll][Traits::kElems];
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u) {
#pragma unroll
            for (int e = 0; e < Traits::kElems; ++e) acc[u][e] = 0.f;
          }
          for (int k = 0; k < ns; k += 2) {
            int4 va[kReduceUnroll], vb[kReduceUnroll];
            const bool two = k + 1 < ns;
            const bool a_local = k == local_k, b_local = k + 1 == local_k;
#pragma unroll
            for (int u = 0; u < kReduceUnroll; ++u) {
              const int64_t v = base + lane + 32 * u;
              if (v < n16) {
                va[u] = a_local ? LoadNc16(src[k] + v) : LoadCg16(src[k] + v);
                if (two) vb[u] = b_local ? LoadNc16(src[k + 1] + v) : LoadCg16(src[k + 1] + v);
              }
            }
#pragma unroll
            for (int u = 0; u < kReduceUnroll; ++u) {
              if (base + lane + 32 * u < n16) {
                Traits::Add(va[u], acc[u]);
                if (two) Traits::Add(vb[u], acc[u]);
              }
            }
          }
#pragma unroll
          for (int u = 0; u < kReduceUnroll; ++u) {
            const int64_t v = base + lane + 32 * u;
            if (v < n16) Store16(dst + v, Traits::Pack(acc[u]));
          }
        }
      } else {
        TreeSumRow<T>(dst, by_rank, me, n16, lane);
      }
      if (lane < K) {
        float w[kMaxRanks];  // lane k: weight k of each rank's copy, in the same tree
#pragma unroll
        for (int d = 0; d < kMaxRanks; ++d) {
          w[d] = 0.f;
          if (weights == nullptr || !((mask >> d) & 1u)) continue;
          if (d == me) {
            const int qm = __ldg(a.send_pos + i * R + d);
            w[d] = __ldg(weights + static_cast<int64_t>(qm) * K + lane);
          } else {
            w[d] = slot_w[(PeerIndex(d, me) * N + i) * K + lane];
          }
        }
        const float wsum = TreeSum8(w);
        a.combined_weights[i * K + lane] = wsum;
      }
    }
  }
  reduce_trace.Mark("reduced");
  FinishOp(own, seq);
  push_trace.Mark("finish");
  reduce_trace.Mark("finish");
  push_trace.Print("combine push warp", me, seq);
  reduce_trace.Print("combine reduce warp", me, seq);
}

// The kernels' shared-memory plan for a row size; the grid is num_sms blocks,
// fewer when several ranks share the GPU (every block must be resident at
// once, since blocks wait for each other and for peers).
// Flag batching, overridable for tuning with JAX_EP_FLAG_BATCH="batch,keep".
void FlagBatching(int* batch, int* keep) {
  static int b = 12, k = 4;
  static const bool parsed = [] {
    if (const char* v = std::getenv("JAX_EP_FLAG_BATCH")) {
      int vb = 0, vk = 0;
      if (std::sscanf(v, "%d,%d", &vb, &vk) == 2 && vb >= 1 && (vk == 0 || vk == 1 || vk == 2 ||
                                                                  vk == 4) &&
          vb + vk <= kFlagRing) {
        b = vb;
        k = vk;
      }
    }
    return true;
  }();
  (void)parsed;
  *batch = b;
  *keep = k;
}

Plan MakePlan(int64_t row_bytes, bool use_hist, int num_sms, int ranks_on_device) {
  Plan p{};
  FlagBatching(&p.flag_batch, &p.flag_keep);
  const int per_rank = std::max(1, DeviceSmCount() / std::max(1, ranks_on_device));
  p.grid = std::max(1, std::min({num_sms, kMaxBlocks, per_rank}));
  p.use_hist = use_hist;
  const int64_t bars = AlignUp(8LL * kStages);
  const int64_t flags = AlignUp(static_cast<int64_t>(sizeof(FlagEntry)) * kPushWarps * kFlagRing);
  const int64_t hist = use_hist ? AlignUp(4LL * kHistBins) : 0;
  const int64_t avail = kSmemBudget - bars - flags - hist;
  p.stage_bytes = std::min(AlignUp(row_bytes), avail / kStages / kSubArrayAlign * kSubArrayAlign);
  p.chunk_bytes = std::min(row_bytes, p.stage_bytes);
  p.num_chunks = static_cast<int>((row_bytes + p.chunk_bytes - 1) / p.chunk_bytes);
  p.bars_offset = p.stage_bytes * kStages;
  p.flag_ring_offset = p.bars_offset + bars;
  p.hist_offset = p.flag_ring_offset + flags;
  p.smem_bytes = p.hist_offset + hist;
  return p;
}

template <typename Kernel, typename Args>
cudaError_t LaunchPlanned(Kernel kernel, const Args& a, const Plan& p, uint32_t hash,
                          cudaStream_t stream) {
  kernel<<<p.grid, kThreads, static_cast<size_t>(p.smem_bytes), stream>>>(a, p, hash);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

}  // namespace

cudaError_t Preload() {
  // Every intranode kernel may take the whole shared-memory budget.
  const int smem = static_cast<int>(kSmemBudget);
  JAX_EP_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(DispatchKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CachedDispatchKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      CombineKernel<__nv_bfloat16>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  return cudaFuncSetAttribute(CombineKernel<float>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                              smem);
}

cudaError_t Dispatch(const DispatchArgs& a, cudaStream_t stream) {
  const int El = a.num_experts / a.group.num_ranks;
  Plan p = MakePlan(a.row_bytes, El <= kHistBins, a.num_sms, a.group.ranks_on_device);
  // The count phase keeps one byte per token of a block in the (not yet used) stages.
  if ((a.num_tokens + p.grid - 1) / p.grid > p.stage_bytes * kStages) {
    return cudaErrorInvalidValue;
  }
  const uint32_t hash = ShapeHash({a.num_tokens, a.num_recv_rows, a.row_bytes, a.num_topk,
                                   a.num_experts, a.topk_weights != nullptr});
  return LaunchPlanned(DispatchKernel, a, p, hash, stream);
}

cudaError_t CachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream) {
  const Plan p = MakePlan(a.row_bytes, false, a.num_sms, a.group.ranks_on_device);
  const uint32_t hash = ShapeHash({a.num_tokens, a.num_recv_rows, a.row_bytes, a.num_topk,
                                   a.weights != nullptr});
  return LaunchPlanned(CachedDispatchKernel, a, p, hash, stream);
}

cudaError_t Combine(const CombineArgs& a, cudaStream_t stream) {
  const Plan p = MakePlan(a.row_bytes, false, a.num_sms, a.group.ranks_on_device);
  const uint32_t hash = ShapeHash({a.num_tokens, a.num_recv_rows, a.row_bytes, a.num_topk,
                                   a.weights != nullptr, static_cast<int64_t>(a.row_type)});
  if (a.row_type == RowType::kBF16) {
    return LaunchPlanned(CombineKernel<__nv_bfloat16>, a, p, hash, stream);
  }
  return LaunchPlanned(CombineKernel<float>, a, p, hash, stream);
}

}  // namespace intranode
}  // namespace jax_ep
