// Byte layout of the jax_ep communication buffer (one per GPU, see
// docs/design.md "Communication buffer"). Usable from host and device code.
//
// Python reaches BufferBytesNeeded through jax_ep._C.buffer_bytes_needed
// (bound in module.cc, CPU builds too). In formula form:
//
//   align(x)      = (x + 127) // 128 * 128        # every sub-array start
//   row           = H * elt_bytes                  # bytes of one token row
//   # dispatch part (offsets relative to the data region)
//   d_x           = 0                              # recv_x      [M, row]
//   d_idx         = align(d_x   + M * row)         # recv_topk_idx [M,K] i32
//   d_w           = align(d_idx + M * K * 4)       # recv_topk_w   [M,K] f32
//   d_src_idx     = align(d_w   + M * K * 4)       # recv_src_idx  [M]   i32
//   d_src_rank    = align(d_src_idx + M * 4)       # recv_src_rank [M]   i32
//   dispatch      = align(d_src_rank + M * 4)
//   # combine part (offsets relative to the data region)
//   c_slots       = 0                              # slots   [R, N, row]
//   c_w           = align(R * N * row)             # weights [R, N, K] f32
//   combine       = align(c_w + R * N * K * 4)
//   BufferBytesNeeded(R, N, M, H, K, elt_bytes)
//                 = 4096 + max(dispatch, combine)
//
// Header (first 4096 bytes): int32 barrier_signal[8] at +0, int32
// barrier_epoch at +64, int32 counts[8][8] at +256 (row s written by rank s).
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
constexpr int64_t kHeaderBytes = 4096;
constexpr int64_t kSubArrayAlign = 128;

// Header offsets (bytes from the buffer base).
constexpr int64_t kBarrierSignalOffset = 0;   // int32[8]
constexpr int64_t kBarrierEpochOffset = 64;   // int32
constexpr int64_t kCountsOffset = 256;        // int32[8][8]
constexpr int64_t kDataOffset = kHeaderBytes; // data region start
static_assert(kCountsOffset + kMaxRanks * kMaxRanks * 4 <= kHeaderBytes,
              "header overflow");

JAX_EP_HD constexpr int64_t AlignUp(int64_t x) {
  return (x + kSubArrayAlign - 1) / kSubArrayAlign * kSubArrayAlign;
}

// Dispatch part; all offsets relative to the data region start.
struct DispatchLayout {
  int64_t recv_x, recv_topk_idx, recv_topk_w, recv_src_idx, recv_src_rank;
  int64_t bytes;  // size of the dispatch part
};

JAX_EP_HD constexpr DispatchLayout MakeDispatchLayout(int64_t M, int64_t H,
                                                      int64_t K,
                                                      int64_t elt_bytes) {
  DispatchLayout l{};
  l.recv_x = 0;
  l.recv_topk_idx = AlignUp(l.recv_x + M * H * elt_bytes);
  l.recv_topk_w = AlignUp(l.recv_topk_idx + M * K * 4);
  l.recv_src_idx = AlignUp(l.recv_topk_w + M * K * 4);
  l.recv_src_rank = AlignUp(l.recv_src_idx + M * 4);
  l.bytes = AlignUp(l.recv_src_rank + M * 4);
  return l;
}

// Combine part; all offsets relative to the data region start.
struct CombineLayout {
  int64_t slots, weights;
  int64_t bytes;  // size of the combine part
};

JAX_EP_HD constexpr CombineLayout MakeCombineLayout(int64_t R, int64_t N,
                                                    int64_t H, int64_t K,
                                                    int64_t elt_bytes) {
  CombineLayout l{};
  l.slots = 0;
  l.weights = AlignUp(l.slots + R * N * H * elt_bytes);
  l.bytes = AlignUp(l.weights + R * N * K * 4);
  return l;
}

JAX_EP_HD constexpr int64_t BufferBytesNeeded(int64_t R, int64_t N, int64_t M,
                                              int64_t H, int64_t K,
                                              int64_t elt_bytes) {
  const int64_t d = MakeDispatchLayout(M, H, K, elt_bytes).bytes;
  const int64_t c = MakeCombineLayout(R, N, H, K, elt_bytes).bytes;
  return kHeaderBytes + (d > c ? d : c);
}

// Worked example the Python mirror can assert against.
static_assert(BufferBytesNeeded(8, 4096, 8192, 7168, 8, 2) ==
                  4096 + AlignUp(AlignUp(8LL * 4096 * 7168 * 2) +
                                 8LL * 4096 * 8 * 4),
              "layout self-check");

}  // namespace jax_ep
