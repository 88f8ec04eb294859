// What the NVLink between two GPUs carries when SMs drive it, measured the way
// the intranode kernels use it: every figure is both GPUs pushing to each
// other at once, GB/s each way, rows of `row_bytes` (default DeepEP's
// 7168 x bf16). Complements shared/tools/nvlink_ceiling.py (plain SM copies)
// with bulk (TMA) copies, whose per-SM rate decides how few SMs can carry the
// link, and with the latency of one signal round trip.
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90,code=sm_90 -Iffi \
//        tools/nvlink_tma_ceiling.cu -o /tmp/nvlink_tma_ceiling
//   /tmp/nvlink_tma_ceiling [rows=4096] [row_bytes=14336]
#include <cstdio>
#include <cstdlib>
#include <vector>

#include "common.cuh"
#include "cuda_check.h"

using namespace jax_ep;

enum Mode : int {
  kPush = 1,       // local row -> peer
  kLocal = 2,      // local row -> local copy
  kDual = 3,       // local row -> peer and local (a dispatch sender)
  kSplit = 4,      // even warps push, odd warps copy locally (sender + drain)
  kSplitBlocks = 5,  // the same roles on separate SMs: even blocks push, odd blocks copy
};

// Each warp's lane 0 runs a ring of S stages, keeping L loads ahead; a stage
// is reused once the store that read it has finished reading.

// Flagging variants for pushed rows (each flag a u64 in the peer's memory):
// 0 none; 1 per row: wait for the row's bulk store (4 newer may fly), proxy
// fence, release store; 2 as 1 plus a full system fence; 3 every 8 rows:
// wait (4 newer may fly), proxy fence, one acq_rel fence, relaxed stores.
template <int S, int L>
__global__ void TmaKernel(const char* src, const char* src2, char* peer_dst, char* local_dst,
                          int64_t rows, int row_bytes, int stage_bytes, int mode,
                          int flag_mode, uint64_t* peer_flags) {
  extern __shared__ __align__(128) char smem[];
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if ((threadIdx.x & 31) != 0) return;
  char* stages = smem + static_cast<int64_t>(warp) * S * stage_bytes;
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem + static_cast<int64_t>(warps) * S * stage_bytes) +
                   warp * S;
  for (int s = 0; s < S; ++s) MbarInit(bars + s);
  FenceMbarInit();
  int64_t first = static_cast<int64_t>(blockIdx.x) * warps + warp;
  int64_t step = static_cast<int64_t>(gridDim.x) * warps;
  bool push = mode == kPush || mode == kDual, local = mode == kLocal || mode == kDual;
  const char* from = src;
  if (mode == kSplit) {
    // Half the warps per role, rows split among that half.
    const bool pusher = (warp % 2) == 0;
    push = pusher;
    local = !pusher;
    from = pusher ? src : src2;
    first = static_cast<int64_t>(blockIdx.x) * (warps / 2) + warp / 2;
    step = static_cast<int64_t>(gridDim.x) * (warps / 2);
  } else if (mode == kSplitBlocks) {
    const bool pusher = (blockIdx.x % 2) == 0;
    push = pusher;
    local = !pusher;
    from = pusher ? src : src2;
    first = static_cast<int64_t>(blockIdx.x / 2) * warps + warp;
    step = static_cast<int64_t>(gridDim.x / 2) * warps;
  }
  const int64_t count = first < rows ? (rows - first + step - 1) / step : 0;
  auto issue = [&](int64_t m) {
    const int s = static_cast<int>(m % S);
    const int64_t r = first + m * step;
    MbarArriveExpectTx(bars + s, row_bytes);
    BulkLoad(stages + s * stage_bytes, from + r * row_bytes, row_bytes, bars + s);
  };
  for (int64_t m = 0; m < L && m < count; ++m) issue(m);
  uint32_t phase = 0;
  int64_t flagged = 0;
  auto publish = [&](int64_t upto) {
    FenceProxyAsyncGlobal();
    if (flag_mode == 3) asm volatile("fence.acq_rel.sys;" ::: "memory");
    if (flag_mode == 2) __threadfence_system();
    for (; flagged < upto; ++flagged) {
      uint64_t* f = peer_flags + first + flagged * step;
      if (flag_mode == 3) StoreRelaxedSysU64(f, 1); else StoreReleaseSysU64(f, 1);
    }
  };
  for (int64_t n = 0; n < count; ++n) {
    const int s = static_cast<int>(n % S);
    while (!MbarTryWait(bars + s, (phase >> s) & 1u)) {
    }
    phase ^= 1u << s;
    const int64_t r = first + n * step;
    if (push) BulkStore(peer_dst + r * row_bytes, stages + s * stage_bytes, row_bytes);
    if (local) BulkStore(local_dst + r * row_bytes, stages + s * stage_bytes, row_bytes);
    BulkCommit();
    if (flag_mode == 1 || flag_mode == 2) {
      BulkWait<4>();
      if (n >= 4) publish(n - 3);
    } else if (flag_mode == 3 && n + 1 - flagged >= 12) {
      BulkWait<4>();
      publish(n + 1 - 4);
    }
    const int64_t m = n + L;
    if (m < count) {
      if (m >= S) BulkWaitRead<S - L>();
      issue(m);
    }
  }
  BulkWait<0>();
  if (flag_mode) publish(count);
}

// Plain SM push for comparison: 4 x 16-byte loads in flight per lane.
__global__ void SmPushKernel(const int4* __restrict__ s, int4* __restrict__ d, int64_t n16) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x * 4;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n16; i += stride) {
    int4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t j = i + static_cast<int64_t>(u) * gridDim.x * blockDim.x;
      if (j < n16) v[u] = s[j];
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int64_t j = i + static_cast<int64_t>(u) * gridDim.x * blockDim.x;
      if (j < n16) d[j] = v[u];
    }
  }
}

// Signal round trips: the leader bumps the peer's flag, the follower answers.
__global__ void PingPongKernel(uint32_t* mine, uint32_t* peers, int iters, int leader,
                               unsigned long long* ns) {
  const uint64_t t0 = GlobalTimerNs();
  for (uint32_t i = 1; i <= static_cast<uint32_t>(iters); ++i) {
    if (leader) {
      StoreReleaseSysU32(peers, i);
      while (LoadAcquireSysU32(mine) != i) {
      }
    } else {
      while (LoadAcquireSysU32(mine) != i) {
      }
      StoreReleaseSysU32(peers, i);
    }
  }
  if (leader) *ns = (GlobalTimerNs() - t0) / iters;
}

struct Gpu {
  char *src, *src2, *peer_dst, *local_dst;
  cudaStream_t stream;
  cudaEvent_t start, stop;
};

static std::vector<Gpu> g(2);
static int64_t rows;
static int row_bytes;

template <typename Launch>
static double TimeBoth(Launch launch, int iters = 10) {
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    launch(d);
    CHECK(cudaGetLastError());
  }
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaStreamSynchronize(g[d].stream));
  }
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaEventRecord(g[d].start, g[d].stream));
  }
  for (int it = 0; it < iters; ++it) {
    for (int d = 0; d < 2; ++d) {
      CHECK(cudaSetDevice(d));
      launch(d);
    }
  }
  float worst = 0.f;
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaEventRecord(g[d].stop, g[d].stream));
    CHECK(cudaEventSynchronize(g[d].stop));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, g[d].start, g[d].stop));
    worst = ms > worst ? ms : worst;
  }
  return worst * 1e-3 / iters;
}

static uint64_t* g_flags[2];

template <int S, int L>
static double Tma(int blocks, int warps, int mode, int flag_mode = 0) {
  const int stage_bytes = (row_bytes + 127) / 128 * 128;
  const size_t smem = static_cast<size_t>(warps) * S * stage_bytes + warps * S * 8;
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaFuncSetAttribute(TmaKernel<S, L>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                               static_cast<int>(smem)));
  }
  const double t = TimeBoth([&](int d) {
    TmaKernel<S, L><<<blocks, warps * 32, smem, g[d].stream>>>(
        g[d].src, g[d].src2, g[1 - d].peer_dst, g[d].local_dst, rows, row_bytes, stage_bytes, mode,
        flag_mode, g_flags[1 - d]);
  });
  return rows * static_cast<double>(row_bytes) / t / 1e9;
}

int main(int argc, char** argv) {
  rows = argc > 1 ? std::atoll(argv[1]) : 4096;
  row_bytes = argc > 2 ? std::atoi(argv[2]) : 14336;
  const size_t bytes = static_cast<size_t>(rows) * row_bytes;
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::printf("needs two GPUs, found %d\n", n);
    return 1;
  }
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    int can = 0;
    CHECK(cudaDeviceCanAccessPeer(&can, d, 1 - d));
    if (!can) {
      std::printf("GPU %d cannot access GPU %d\n", d, 1 - d);
      return 1;
    }
    cudaError_t e = cudaDeviceEnablePeerAccess(1 - d, 0);
    if (e == cudaErrorPeerAccessAlreadyEnabled) (void)cudaGetLastError(); else CHECK(e);
    CHECK(cudaMalloc(&g[d].src, bytes));
    CHECK(cudaMalloc(&g[d].src2, bytes));
    CHECK(cudaMalloc(&g[d].peer_dst, bytes));
    CHECK(cudaMalloc(&g[d].local_dst, bytes));
    CHECK(cudaMemset(g[d].src, 1, bytes));
    CHECK(cudaMemset(g[d].src2, 2, bytes));
    CHECK(cudaStreamCreateWithFlags(&g[d].stream, cudaStreamNonBlocking));
    CHECK(cudaEventCreate(&g[d].start));
    CHECK(cudaEventCreate(&g[d].stop));
  }
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(&g_flags[d], rows * 8));
  }
  std::printf("rows %lld x %d bytes = %.1f MB each way\n", static_cast<long long>(rows), row_bytes,
              bytes / 1e6);

  // Copy engines, both directions at once.
  const double ce = bytes / TimeBoth([&](int d) {
    CHECK(cudaMemcpyPeerAsync(g[1 - d].peer_dst, 1 - d, g[d].src, d, bytes, g[d].stream));
  }) / 1e9;
  std::printf("copy engines: %.0f GB/s each way\n", ce);

  std::printf("SM push (512 threads):");
  for (int b : {8, 16, 20, 24, 32}) {
    const double t = TimeBoth([&](int d) {
      SmPushKernel<<<b, 512, 0, g[d].stream>>>(reinterpret_cast<const int4*>(g[d].src),
                                                reinterpret_cast<int4*>(g[1 - d].peer_dst),
                                                static_cast<int64_t>(bytes / 16));
    });
    std::printf("  %dSM %.0f", b, bytes / t / 1e9);
  }
  std::printf("\n");

  const int sms[] = {2, 4, 8, 12, 16, 20, 24};
  auto sweep = [&](const char* name, auto fn) {
    std::printf("%-34s", name);
    for (int b : sms) std::printf("  %2dSM %4.0f", b, fn(b));
    std::printf("\n");
  };
  sweep("TMA push w2 S4 L2, no flags", [](int b) { return Tma<4, 2>(b, 2, kPush, 0); });
  sweep("  + per-row flag (release)", [](int b) { return Tma<4, 2>(b, 2, kPush, 1); });
  sweep("  + per-row flag + sys fence", [](int b) { return Tma<4, 2>(b, 2, kPush, 2); });
  sweep("  + flags per 8 rows (acq_rel)", [](int b) { return Tma<4, 2>(b, 2, kPush, 3); });
  if (argc > 3) return 0;
  sweep("TMA push  w1 S8 L2", [](int b) { return Tma<8, 2>(b, 1, kPush); });
  sweep("TMA push  w2 S4 L2", [](int b) { return Tma<4, 2>(b, 2, kPush); });
  sweep("TMA push  w4 S4 L2", [](int b) { return Tma<4, 2>(b, 4, kPush); });
  sweep("TMA push  w4 S3 L1", [](int b) { return Tma<3, 1>(b, 4, kPush); });
  sweep("TMA push  w8 S2 L1", [](int b) { return Tma<2, 1>(b, 8, kPush); });
  sweep("TMA local w4 S4 L2", [](int b) { return Tma<4, 2>(b, 4, kLocal); });
  sweep("TMA dual (push+local) w4 S4 L2", [](int b) { return Tma<4, 2>(b, 4, kDual); });
  sweep("TMA split (push | drain) w4 S4 L2", [](int b) { return Tma<4, 2>(b, 4, kSplit); });
  sweep("TMA split (push | drain) w8 S2 L1", [](int b) { return Tma<2, 1>(b, 8, kSplit); });
  // The same two roles, on separate SMs: does a push slow the local copies
  // that share its SM (one bulk-copy unit per SM), beyond sharing the SMs?
  sweep("TMA split by SM (push | drain) w4 S4 L2", [](int b) { return Tma<4, 2>(b, 4, kSplitBlocks); });
  sweep("TMA local w4 S4 L2, half the SMs", [](int b) { return Tma<4, 2>(b / 2, 4, kLocal); });
  sweep("TMA push w4 S4 L2, half the SMs", [](int b) { return Tma<4, 2>(b / 2, 4, kPush); });

  // Signal latency.
  uint32_t* flags[2];
  unsigned long long* ns[2];
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaMalloc(&flags[d], 4));
    CHECK(cudaMemset(flags[d], 0, 4));
    CHECK(cudaMalloc(&ns[d], 8));
    CHECK(cudaDeviceSynchronize());
  }
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    PingPongKernel<<<1, 1, 0, g[d].stream>>>(flags[d], flags[1 - d], 2000, d == 0, ns[d]);
    CHECK(cudaGetLastError());
  }
  unsigned long long rtt = 0;
  for (int d = 0; d < 2; ++d) {
    CHECK(cudaSetDevice(d));
    CHECK(cudaStreamSynchronize(g[d].stream));
  }
  CHECK(cudaSetDevice(0));
  CHECK(cudaMemcpy(&rtt, ns[0], 8, cudaMemcpyDeviceToHost));
  std::printf("signal round trip (release store to the peer, acquire spin): %.2f us\n", rtt / 1e3);
  return 0;
}
