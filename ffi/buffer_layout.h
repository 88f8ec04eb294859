// Limits, op names and the byte layout of the jax_ep communication buffer
// (one per GPU, see docs/design.md "Communication buffer"). Usable from host
// and device code; the one home for these numbers (Python reads them through
// jax_ep._C, bound in module.cc, CPU builds too).
//
// In formula form (every region start aligned to 128 bytes):
//
//   row        = H * elt_bytes                 # bytes of one token row
//   F          = max(M, (R - 1) * N)           # per-row arrival flags
//   flags      = 4096                          # u64 [F]
//   data       = flags + align(8 * F)          # shared by the ops, one at a time
//   # dispatch: rows from peers by (peer index, row among the peer's rows to
//   # us); cached dispatch: by receive row
//   stage_rows = data                          # [F, row]
//   stage_meta = stage_rows + align(F * row)   # [F, 2K] i32: local expert ids, f32 weights
//   # combine (a peer's copy of one of our tokens, by (peer index, token))
//   slots      = data                          # [(R-1) * N, row]
//   slot_w     = slots + align((R-1) * N * row) # [(R-1) * N, K] f32
//   BufferBytesNeeded(R, N, M, H, K, elt_bytes)
//              = max(end of dispatch part, end of combine part);  4096 when R = 1
//
// Header (first 4096 bytes), see the k*Offset constants below.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define JAX_EP_HD __host__ __device__ __forceinline__
#else
#define JAX_EP_HD inline
#endif

namespace jax_ep {

constexpr int kMaxRanks = 8;
constexpr int kMaxTopK = 32;
// FP8 rows (jax_ep/fp8.py): one float32 scale per kFp8Block values, e4m3fn's
// largest finite value kFp8Max.
constexpr int kFp8Block = 128;
constexpr float kFp8Max = 448.0f;
// Thread blocks of a peer kernel (num_sms); bounds the header's scan scratch.
constexpr int kMaxBlocks = 64;
constexpr int64_t kHeaderBytes = 4096;
constexpr int64_t kSubArrayAlign = 128;
// Dynamic shared memory one peer-kernel block may use (Hopper: 227 KB).
constexpr int64_t kMaxSmemBytes = 227 * 1024;

// Ops, as carried by cross-rank signals and fault records.
enum OpCode : int {
  kOpNone = 0,
  kOpDispatch = 1,
  kOpCachedDispatch = 2,
  kOpCombine = 3,
  kOpLayout = 4,
  kOpLowLatencyDispatch = 5,
  kOpLowLatencyCombine = 6,
  kOpAbort = 15,  // a hello saying "this rank gave up on the op"
};

JAX_EP_HD const char* OpName(int op) {
  switch (op) {
    case kOpDispatch: return "dispatch";
    case kOpCachedDispatch: return "cached_dispatch";
    case kOpCombine: return "combine";
    case kOpLayout: return "get_dispatch_layout";
    case kOpLowLatencyDispatch: return "low_latency_dispatch";
    case kOpLowLatencyCombine: return "low_latency_combine";
    default: return "unknown op";
  }
}

// Ints per rank slot of the host-mapped fault record (runtime.h).
constexpr int kFaultSlotInts = 8;

// What a fault record (runtime.h) says went wrong.
enum FaultKind : int {
  kFaultNone = 0,
  kFaultTimeout = 1,         // waited longer than timeout_ns for `peer`
  kFaultOpMismatch = 2,      // `peer` ran `other_op` where we ran `op`
  kFaultShapeMismatch = 3,   // same op, different shapes
  kFaultLayoutMismatch = 4,  // the layout operand disagrees with topk_idx
  kFaultPeerAborted = 5,     // `peer` gave up on the op (its own fault)
  kFaultBadRank = 6,         // the rank operand is not the registered rank
  kFaultDestroyed = 7,       // the Buffer was destroyed
  kFaultHandleMismatch = 8,  // a peer's row disagrees with our handle
  kFaultReceivePending = 9,  // `other_op`'s receive has not run yet (low-latency split form)
  kFaultNothingToReceive = 10,  // a low-latency receive without its send just before
};

// Header offsets (bytes from the buffer base). "own" fields are read and
// written by this rank only; [parity][src] slots are written by rank src.
constexpr int64_t kSeqOffset = 0;            // u32, own: ops started on this buffer
constexpr int64_t kDoneTicketOffset = 4;     // u32, own: blocks of the current op done
constexpr int64_t kLayoutSeqOffset = 8;      // u32, own: layout calls
constexpr int64_t kLayoutTicketOffset = 12;  // u32, own
constexpr int64_t kLayoutZeroedOffset = 16;  // u32, own: layout seq once outputs are zeroed
// u32 pair, own: {seq, op} of a low-latency send whose receive has not run
// yet, {0, 0} if none. Every other op refuses to start while it is set (it
// would overwrite the rows in flight).
constexpr int64_t kPendingReceiveOffset = 20;
constexpr int64_t kHelloOffset = 64;         // u64 [2][kMaxRanks]: PackHello
// u64 [2][kMaxRanks][kMaxRanks]: [par][src][dst] = (seq << 32) | rows src sends
// dst (kCountAbort: src gave up on the op); each word carries its op's
// sequence number, so no fence orders it against other words.
constexpr int64_t kCountsOffset = 256;
constexpr uint32_t kCountAbort = 0xffffffffu;
constexpr int64_t kBlockFlagOffset = 1280;   // u32 [kMaxBlocks], own: seq once published
constexpr int64_t kBlockCountsOffset = 1536; // i32 [kMaxBlocks][kMaxRanks + 1], own
static_assert(kHelloOffset + 2 * kMaxRanks * 8 <= kCountsOffset, "header overlap");
static_assert(kCountsOffset + 2 * kMaxRanks * kMaxRanks * 8 <= kBlockFlagOffset, "header overlap");
static_assert(kBlockFlagOffset + kMaxBlocks * 4 <= kBlockCountsOffset, "header overlap");
static_assert(kBlockCountsOffset + kMaxBlocks * (kMaxRanks + 1) * 4 <= kHeaderBytes,
              "header overflow");

JAX_EP_HD constexpr int64_t AlignUp(int64_t x) {
  return (x + kSubArrayAlign - 1) / kSubArrayAlign * kSubArrayAlign;
}

// A cross-rank signal: the op's sequence number, the op and a 28-bit hash of
// its shapes, in one 64-bit word so that a single store publishes all three.
JAX_EP_HD constexpr uint64_t PackHello(uint32_t seq, int op, uint32_t shape_hash) {
  return (static_cast<uint64_t>(seq) << 32) | (static_cast<uint64_t>(op & 0xf) << 28) |
         (shape_hash & 0x0fffffffu);
}
JAX_EP_HD constexpr uint32_t HelloSeq(uint64_t h) { return static_cast<uint32_t>(h >> 32); }
JAX_EP_HD constexpr int HelloOp(uint64_t h) { return static_cast<int>((h >> 28) & 0xf); }
JAX_EP_HD constexpr uint32_t HelloShape(uint64_t h) {
  return static_cast<uint32_t>(h & 0x0fffffffu);
}

// Byte offsets (from the buffer base) of the regions after the header.
struct IntranodeRegions {
  int64_t flags;         // u64 [num_flags]: (seq << 32) | source token, per row
  int64_t num_flags;
  int64_t stage_rows;    // dispatch, cached dispatch: [num_flags, row]
  int64_t stage_meta;    // the same rows' [2K] (K i32 local expert ids, K f32 weights)
  int64_t slots;         // combine: [(R-1) * N, row]
  int64_t slot_weights;  // combine: [(R-1) * N, K] f32
  int64_t bytes;         // the whole buffer
};

JAX_EP_HD constexpr IntranodeRegions MakeIntranodeRegions(int64_t R, int64_t N, int64_t M,
                                                         int64_t row_bytes, int64_t K) {
  IntranodeRegions l{};
  const int64_t peer_slots = (R - 1) * N;
  l.num_flags = M > peer_slots ? M : peer_slots;
  l.flags = kHeaderBytes;
  const int64_t data = l.flags + AlignUp(8 * l.num_flags);
  l.stage_rows = data;
  l.stage_meta = l.stage_rows + AlignUp(l.num_flags * row_bytes);
  const int64_t dispatch_end = l.stage_meta + AlignUp(l.num_flags * 2 * K * 4);
  l.slots = data;
  l.slot_weights = l.slots + AlignUp(peer_slots * row_bytes);
  const int64_t combine_end = l.slot_weights + AlignUp(peer_slots * K * 4);
  l.bytes = dispatch_end > combine_end ? dispatch_end : combine_end;
  return l;
}

// The low-latency ops (low_latency.cu) use the buffer after the header their
// own way, one op at a time like the others. T = num_max_dispatch_tokens_per_rank;
// a "slot" is (source rank s, token i, k), numbered (s * T + i) * K + k.
//
//   ll_flags   = header                        # u64 [R, T]: (seq << 32) | word, by (rank, token)
//   ll_ids     = ll_flags + align(8 R T)       # i32 [R, T, K]: dispatch: each source's expert ids
//   ll_copy_index = ll_ids + align(4 R T K)    # i32 [R, T, K]: dispatch: copy (s, i, k)'s place
//                                              #   among source s's copies to its expert
//   ll_counts  = ll_copy_index + align(4 R T K)  # u64 [R, E/R]: dispatch: (seq << 32) | copies
//                                              #   source s sends our expert e (E <=
//                                              #   kMaxLowLatencyExperts, so E-independent)
//   ll_weights = ll_counts + align(8 Emax)     # f32 [R, T, K]: cached dispatch: each source's
//                                              #   weights; combine: [T, K] this rank's own,
//                                              #   which peers read
//   ll_data    = ll_weights + align(4 R T K)   # dispatch: [R, T, row] rows by source;
//                                              # combine: [R, T, H] f32 partial sums by expert rank
//   LowLatencyBytesNeeded(R, T, K, data_row)   # data_row = max(dispatch row bytes, 4 H)
struct LowLatencyRegions {
  int64_t flags, ids, copy_index, counts, weights, data, bytes;
};

// Experts the low-latency ops take: bounds the dispatch's per-expert counts
// region (8 bytes an expert), so the buffer size does not depend on E.
constexpr int64_t kMaxLowLatencyExperts = 8192;

JAX_EP_HD constexpr LowLatencyRegions MakeLowLatencyRegions(int64_t R, int64_t T, int64_t K,
                                                           int64_t data_row_bytes) {
  LowLatencyRegions l{};
  l.flags = kHeaderBytes;
  l.ids = l.flags + AlignUp(8 * R * T);
  l.copy_index = l.ids + AlignUp(4 * R * T * K);
  l.counts = l.copy_index + AlignUp(4 * R * T * K);
  l.weights = l.counts + AlignUp(8 * kMaxLowLatencyExperts);
  l.data = l.weights + AlignUp(4 * R * T * K);
  l.bytes = l.data + AlignUp(R * T * data_row_bytes);
  return l;
}

// Dynamic shared memory a low-latency kernel may take: the combine stages a
// partial sum per task group (two: 8 * hidden bytes), so hidden <=
// kMaxLowLatencyHidden; the dispatch counts copies per expert in E ints.
constexpr int64_t kMaxLowLatencySmem = kMaxSmemBytes - 1024;
constexpr int64_t kMaxLowLatencyHidden = kMaxLowLatencySmem / 8;
// The dispatch's counts: E ints (low_latency.cu NumberingSmem), within this
// budget; its kernels keep the rest for their static shared memory.
constexpr int64_t kMaxLowLatencyNumberingSmem = 4 * kMaxLowLatencyExperts;
static_assert(kMaxLowLatencyNumberingSmem + 8 * 1024 <= kMaxSmemBytes, "low-latency smem");

JAX_EP_HD constexpr int64_t LowLatencyBytesNeeded(int64_t R, int64_t T, int64_t K,
                                                  int64_t data_row_bytes) {
  return MakeLowLatencyRegions(R, T, K, data_row_bytes).bytes;
}

// With one rank nothing crosses: the ops copy operands straight into their
// outputs and only the header (layout's counters) is used.
JAX_EP_HD constexpr int64_t BufferBytesNeeded(int64_t R, int64_t N, int64_t M, int64_t H,
                                              int64_t K, int64_t elt_bytes) {
  return R <= 1 ? kHeaderBytes : MakeIntranodeRegions(R, N, M, H * elt_bytes, K).bytes;
}

// Worked example the Python mirror can assert against: DeepEP's shape at
// R = 2 (M = N * R = 8192 rows of 7168 bf16, top-8).
static_assert(BufferBytesNeeded(2, 4096, 8192, 7168, 8, 2) ==
                  4096 + AlignUp(8LL * 8192) + AlignUp(8192LL * 14336) + AlignUp(8192LL * 16 * 4),
              "layout self-check");

}  // namespace jax_ep
