// Can copy engines carry the DeepEP-shape dispatch faster than SM pushes?
// A model of that dispatch on two GPUs (one process, peer access), both GPUs
// at once, to measure before building it into ffi/intranode.cu:
//
// - main stream: one kernel of `sms` blocks per GPU. Block 0 says hello to
//   the peer, waits for the peer's hello, then sets a local "go" word. Every
//   block copies this rank's own rows (x -> recv[0, N)), then drains the
//   peer's rows chunk by chunk from the stage (written by the peer's copy
//   engine) into recv[N, 2N), waiting for each chunk's flag.
// - copy stream A: waits for "go" (the peer has finished its previous op),
//   then one cudaMemcpyAsync per chunk of x into the peer's stage; after
//   chunk c, its flag reaches the peer (stream B waits chunk c's event).
// - the main stream waits for the copy streams' end (x must outlive its copies).
//
// Modes (the last argument, "chunks:mode,..."; "base" times the copy engines
// alone and the kernel's own rows alone):
//   0  go waited by a one-thread kernel on A, flags by 8-byte copies on B
//   1  as 0, flags by one-thread kernels on B
//   2  as 0, flags copied on A itself
//   3  no go wait (unsafe: a model of the floor), flags by cuStreamWriteValue64
//      of the sequence number the host knows
//   4  go waited by cuStreamWaitValue64 (host-known value), flags as 3
//   5  go = 1 waited and reset by stream memory operations, flags by 8-byte
//      copies of words the kernel wrote: no host-known value, the only form a
//      command buffer replay could use
// Seen on two H100s (benchmarks/RESULTS.md, twelfth session): modes 0 and 1
// hang (the side stream's kernel never ran beside the spinning dispatch
// kernel; mode 2 waits with the same kernel, not run); the watchdog traps
// after ~2 s and the host prints where each GPU stopped.
//
// Prints the median per-op time on each GPU (device events, after warm-up).
//
//   nvcc -std=c++17 -O3 -gencode=arch=compute_90a,code=sm_90a \
//        tools/ce_pipeline.cu -o /tmp/ce_pipeline
//   /tmp/ce_pipeline [rows=4096] [row_bytes=14336] [sms=24] [iters=30] [base | chunks:mode,...]
//   e.g. /tmp/ce_pipeline 4096 14336 24 30 8:4
#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include <cuda.h>
#include <unistd.h>

#include "cuda_check.h"

// Stream memory operations come from the driver API; fetched through the
// runtime so that nothing links libcuda.
using Value64Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint64_t, unsigned int);
using Value32Fn = CUresult (*)(CUstream, CUdeviceptr, cuuint32_t, unsigned int);
static Value64Fn StreamWaitValue64 = nullptr, StreamWriteValue64 = nullptr;
static Value32Fn StreamWaitValue32 = nullptr, StreamWriteValue32 = nullptr;

// A stream memory operation's result; on an error, says which and exits.
static void CheckDriver(CUresult res, const char* what) {
  if (res != CUDA_SUCCESS) {
    std::fprintf(stderr, "%s: CUresult %d\n", what, int(res));
    std::exit(1);
  }
}

__device__ __forceinline__ uint64_t LoadAcquireSys(const uint64_t* p) {
  uint64_t v;
  asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
// Spins until *p == v; after ~2 s says which wait it is and traps.
__device__ void WaitFor(const uint64_t* p, uint64_t v, const char* what, int index) {
  const long long t0 = clock64();
  while (LoadAcquireSys(p) != v) {
    if (clock64() - t0 > 4000000000LL) {
      printf("ce_pipeline: timed out waiting for %s %d (have %llu, want %llu)\n", what, index,
             (unsigned long long)LoadAcquireSys(p), (unsigned long long)v);
      __trap();
    }
  }
}

__device__ __forceinline__ void StoreReleaseSys(uint64_t* p, uint64_t v) {
  asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Copies `words` 16-byte words, the block's threads striding over them, 8
// loads in flight per thread (1024 threads: 128 KB in flight per SM).
__device__ void CopyRows(const int4* from, int4* to, int64_t words) {
  constexpr int U = 8;
  int64_t i = threadIdx.x;
  const int64_t step = blockDim.x;
  for (; i + (U - 1) * step < words; i += U * step) {
    int4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = from[i + u * step];
#pragma unroll
    for (int u = 0; u < U; ++u) to[i + u * step] = v[u];
  }
  for (; i < words; i += step) to[i] = from[i];
}

__device__ __forceinline__ int64_t Min64(int64_t a, int64_t b) { return a < b ? a : b; }

constexpr int kThreads = 1024;

// Rank::words, one u64 each: go (seq), hello (written by the peer), go as the
// value 1 (mode 5), then kMaxChunks chunk flags (written by the peer) and the
// flag sources the copies send.
constexpr int kWordGo = 0, kWordHello = 1, kWordGoOne = 2;
constexpr int kMaxChunks = 64;
constexpr int kWordFlags = 8, kWordFlagSources = kWordFlags + kMaxChunks;

// Host-mapped progress words, for a hang, kProgressStride per GPU g:
// [0] WaitGo started, [1] go seen by WaitGo, [2] go set by the kernel,
// [3 + c] chunk c's flag seen.
constexpr int kProgressStride = 3 + kMaxChunks;
__device__ uint64_t* g_progress;

struct Rank {
  char* x;            // [N, row] own rows
  char* stage;        // [N, row] written by the peer's copies
  char* recv;         // [2N, row]
  int id;
  uint64_t* words;    // laid out by the kWord* indices above
};

__global__ void __launch_bounds__(kThreads)
    DispatchModel(Rank me, uint64_t* peer_hello, uint64_t seq, int64_t rows, int row_bytes,
                  int chunks, int drain) {
  if (blockIdx.x == 0 && threadIdx.x == 0) {
    StoreReleaseSys(peer_hello, seq);
    WaitFor(me.words + kWordHello, seq, "hello", 0);
    for (int c = 0; c < chunks; ++c) me.words[kWordFlagSources + c] = seq;  // the flags this op sends
    __threadfence_system();
    StoreReleaseSys(me.words + kWordGo, seq);  // go: the peer's stage is free
    StoreReleaseSys(me.words + kWordGoOne, 1);
    StoreReleaseSys(g_progress + me.id * kProgressStride + 2, seq);
  }
  const int64_t row_words = row_bytes / 16;
  // Own rows.
  {
    const int64_t per = (rows + gridDim.x - 1) / gridDim.x;
    const int64_t a = Min64(rows, per * blockIdx.x), b = Min64(rows, a + per);
    CopyRows(reinterpret_cast<const int4*>(me.x) + a * row_words,
             reinterpret_cast<int4*>(me.recv) + a * row_words, (b - a) * row_words);
  }
  if (!drain) return;
  const int64_t chunk_rows = (rows + chunks - 1) / chunks;
  for (int c = 0; c < chunks; ++c) {
    const int64_t c0 = c * chunk_rows, c1 = Min64(rows, c0 + chunk_rows);
    const int64_t per = (c1 - c0 + gridDim.x - 1) / gridDim.x;
    const int64_t a = Min64(c1, c0 + per * blockIdx.x), b = Min64(c1, a + per);
    if (threadIdx.x == 0) {
      WaitFor(me.words + kWordFlags + c, seq, "chunk flag", c);
      if (blockIdx.x == 0) StoreReleaseSys(g_progress + me.id * kProgressStride + 3 + c, seq);
    }
    __syncthreads();
    CopyRows(reinterpret_cast<const int4*>(me.stage) + a * row_words,
             reinterpret_cast<int4*>(me.recv) + (rows + a) * row_words, (b - a) * row_words);
  }
}

// Waits for "go" (the dispatch kernel wrote this op's flag sources before it).
__global__ void WaitGo(uint64_t* words, uint64_t seq, int id) {
  StoreReleaseSys(g_progress + id * kProgressStride + 0, seq);
  WaitFor(words + kWordGo, seq, "go", 0);
  StoreReleaseSys(g_progress + id * kProgressStride + 1, seq);
}

__global__ void StoreFlag(uint64_t* flag, const uint64_t* src) { StoreReleaseSys(flag, *src); }

int main(int argc, char** argv) {
  const int64_t rows = argc > 1 ? std::atoll(argv[1]) : 4096;
  const int row_bytes = argc > 2 ? std::atoi(argv[2]) : 14336;
  const int sms = argc > 3 ? std::atoi(argv[3]) : 24;
  const int iters = argc > 4 ? std::atoi(argv[4]) : 30;
  const int64_t bytes = rows * row_bytes;
  int n = 0;
  CHECK(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::fprintf(stderr, "needs two GPUs\n");
    return 1;
  }
  Rank r[2];
  cudaStream_t main_s[2], a_s[2], b_s[2];
  for (int g = 0; g < 2; ++g) {
    CHECK(cudaSetDevice(g));
    CHECK(cudaDeviceEnablePeerAccess(1 - g, 0));
    CHECK(cudaMalloc(&r[g].x, bytes));
    CHECK(cudaMalloc(&r[g].stage, bytes));
    CHECK(cudaMalloc(&r[g].recv, 2 * bytes));
    CHECK(cudaMalloc(&r[g].words, (kWordFlagSources + kMaxChunks) * sizeof(uint64_t)));
    CHECK(cudaMemset(r[g].words, 0, (kWordFlagSources + kMaxChunks) * sizeof(uint64_t)));
    CHECK(cudaMemset(r[g].x, 1 + g, bytes));
    CHECK(cudaStreamCreateWithFlags(&main_s[g], cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&a_s[g], cudaStreamNonBlocking));
    CHECK(cudaStreamCreateWithFlags(&b_s[g], cudaStreamNonBlocking));
  }
  for (int g = 0; g < 2; ++g) {
    CHECK(cudaSetDevice(g));
    CHECK(cudaDeviceSynchronize());
  }
  {
    cudaDriverEntryPointQueryResult q1, q2;
    CHECK(cudaGetDriverEntryPoint("cuStreamWaitValue64", (void**)&StreamWaitValue64, cudaEnableDefault, &q1));
    CHECK(cudaGetDriverEntryPoint("cuStreamWriteValue64", (void**)&StreamWriteValue64, cudaEnableDefault, &q2));
    cudaDriverEntryPointQueryResult q3, q4;
    CHECK(cudaGetDriverEntryPoint("cuStreamWaitValue32", (void**)&StreamWaitValue32, cudaEnableDefault, &q3));
    CHECK(cudaGetDriverEntryPoint("cuStreamWriteValue32", (void**)&StreamWriteValue32, cudaEnableDefault, &q4));
    if (q1 != cudaDriverEntryPointSuccess || q2 != cudaDriverEntryPointSuccess ||
        q3 != cudaDriverEntryPointSuccess || q4 != cudaDriverEntryPointSuccess) {
      std::fprintf(stderr, "stream memory operations not found\n");
      return 1;
    }
  }
  volatile uint64_t* progress = nullptr;
  CHECK(cudaHostAlloc((void**)&progress, 2 * kProgressStride * sizeof(uint64_t),
                      cudaHostAllocMapped | cudaHostAllocPortable));
  for (int i = 0; i < 2 * kProgressStride; ++i) progress[i] = 0;
  for (int g = 0; g < 2; ++g) {
    CHECK(cudaSetDevice(g));
    uint64_t* dev = nullptr;
    CHECK(cudaHostGetDevicePointer((void**)&dev, (void*)progress, 0));
    CHECK(cudaMemcpyToSymbol(g_progress, &dev, sizeof dev));
    r[g].id = g;
  }
  uint64_t seq = 0;
  std::printf("rows %lld x %d B (%.1f MB each way), %d SMs, GPU %s\n", (long long)rows, row_bytes,
              bytes / 1e6, sms, "0<->1");

  // variant: chunks, flag mode (-1: copy engines alone; -2: kernel alone, no drain)
  auto run = [&](int chunks, int flag_mode, const char* name) {
    std::vector<float> t[2];
    cudaEvent_t start[2], stop[2], fork[2], join[2];
    std::vector<cudaEvent_t> chunk_ev[2];
    for (int g = 0; g < 2; ++g) {
      CHECK(cudaSetDevice(g));
      CHECK(cudaEventCreate(&start[g]));
      CHECK(cudaEventCreate(&stop[g]));
      CHECK(cudaEventCreateWithFlags(&fork[g], cudaEventDisableTiming));
      CHECK(cudaEventCreateWithFlags(&join[g], cudaEventDisableTiming));
      chunk_ev[g].resize(std::max(chunks, 1));
      for (auto& e : chunk_ev[g]) CHECK(cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
    }
    const int64_t chunk_rows = (rows + std::max(chunks, 1) - 1) / std::max(chunks, 1);
    std::fprintf(stderr, "%s ...\n", name);
    for (int it = 0; it < iters + 5; ++it) {
      ++seq;
      for (int g = 0; g < 2; ++g) {
        const int p = 1 - g;
        CHECK(cudaSetDevice(g));
        CHECK(cudaEventRecord(start[g], main_s[g]));
        if (flag_mode == -1) {  // copy engines alone, the whole x at once
          CHECK(cudaMemcpyAsync(r[p].stage, r[g].x, bytes, cudaMemcpyDeviceToDevice, main_s[g]));
        } else if (flag_mode == -2) {  // the kernel's own rows alone
          DispatchModel<<<sms, kThreads, 0, main_s[g]>>>(r[g], r[p].words + kWordHello, seq, rows, row_bytes, 1, 0);
          CHECK(cudaGetLastError());
        } else {
          CHECK(cudaEventRecord(fork[g], main_s[g]));
          CHECK(cudaStreamWaitEvent(a_s[g], fork[g], 0));
          CHECK(cudaStreamWaitEvent(b_s[g], fork[g], 0));
          DispatchModel<<<sms, kThreads, 0, main_s[g]>>>(r[g], r[p].words + kWordHello, seq, rows, row_bytes,
                                                    chunks, 1);
          CHECK(cudaGetLastError());
          if (flag_mode == 5) {
            // Waits for go == 1, then puts it back to 0: no value the host must know.
            const auto go = reinterpret_cast<CUdeviceptr>(r[g].words + kWordGoOne);
            CheckDriver(StreamWaitValue32(a_s[g], go, 1, CU_STREAM_WAIT_VALUE_EQ),
                        "cuStreamWaitValue32");
            CheckDriver(StreamWriteValue32(a_s[g], go, 0, 0), "cuStreamWriteValue32");
          } else if (flag_mode == 4) {
            // The copy stream waits for "go" by a stream memory operation.
            CheckDriver(StreamWaitValue64(a_s[g], reinterpret_cast<CUdeviceptr>(r[g].words + kWordGo), seq,
                                          CU_STREAM_WAIT_VALUE_EQ),
                        "cuStreamWaitValue64");
          } else if (flag_mode != 3) {
            WaitGo<<<1, 1, 0, a_s[g]>>>(r[g].words, seq, g);
            CHECK(cudaGetLastError());
          }
          for (int c = 0; c < chunks; ++c) {
            const int64_t c0 = c * chunk_rows, c1 = std::min(rows, c0 + chunk_rows);
            CHECK(cudaMemcpyAsync(r[p].stage + c0 * row_bytes, r[g].x + c0 * row_bytes,
                                  (c1 - c0) * row_bytes, cudaMemcpyDeviceToDevice, a_s[g]));
            uint64_t* flag = r[p].words + kWordFlags + c;
            const uint64_t* src = r[g].words + kWordFlagSources + c;
            if (flag_mode == 5) {
              CHECK(cudaEventRecord(chunk_ev[g][c], a_s[g]));
              CHECK(cudaStreamWaitEvent(b_s[g], chunk_ev[g][c], 0));
              CHECK(cudaMemcpyAsync(flag, src, 8, cudaMemcpyDeviceToDevice, b_s[g]));
            } else if (flag_mode >= 3) {
              // No flag source words were laid out: the host knows seq here.
              CHECK(cudaEventRecord(chunk_ev[g][c], a_s[g]));
              CHECK(cudaStreamWaitEvent(b_s[g], chunk_ev[g][c], 0));
              CheckDriver(StreamWriteValue64(b_s[g], reinterpret_cast<CUdeviceptr>(flag), seq, 0),
                          "cuStreamWriteValue64");
            } else if (flag_mode == 2) {
              CHECK(cudaMemcpyAsync(flag, src, 8, cudaMemcpyDeviceToDevice, a_s[g]));
            } else {
              CHECK(cudaEventRecord(chunk_ev[g][c], a_s[g]));
              CHECK(cudaStreamWaitEvent(b_s[g], chunk_ev[g][c], 0));
              if (flag_mode == 0) {
                CHECK(cudaMemcpyAsync(flag, src, 8, cudaMemcpyDeviceToDevice, b_s[g]));
              } else {
                StoreFlag<<<1, 1, 0, b_s[g]>>>(flag, src);
                CHECK(cudaGetLastError());
              }
            }
          }
          CHECK(cudaEventRecord(join[g], flag_mode == 2 ? a_s[g] : b_s[g]));
          CHECK(cudaStreamWaitEvent(main_s[g], join[g], 0));
        }
        CHECK(cudaEventRecord(stop[g], main_s[g]));
      }
      // Wait up to 2 s for both GPUs, then say where each stopped.
      for (int spins = 0;; ++spins) {
        bool done = true;
        for (int g = 0; g < 2; ++g) {
          CHECK(cudaSetDevice(g));
          cudaError_t q = cudaEventQuery(stop[g]);
          if (q == cudaErrorNotReady) done = false;
          else CHECK(q);
        }
        if (done) break;
        if (spins > 2000) {
          for (int g = 0; g < 2; ++g) {
            std::printf("HANG %s GPU%d seq %llu: WaitGo started %llu, WaitGo saw go %llu, kernel set go %llu, flags seen",
                        name, g, (unsigned long long)seq, (unsigned long long)progress[g * kProgressStride],
                        (unsigned long long)progress[g * kProgressStride + 1], (unsigned long long)progress[g * kProgressStride + 2]);
            for (int c = 0; c < chunks; ++c) std::printf(" %llu", (unsigned long long)progress[g * kProgressStride + 3 + c]);
            std::printf("\n");
          }
          std::fflush(stdout);
          std::_Exit(2);
        }
        usleep(1000);
      }
      if (it >= 5) {
        for (int g = 0; g < 2; ++g) {
          float ms = 0;
          CHECK(cudaEventElapsedTime(&ms, start[g], stop[g]));
          t[g].push_back(ms * 1000.f);
        }
      }
    }
    for (int g = 0; g < 2; ++g) {
      std::sort(t[g].begin(), t[g].end());
      const float med = t[g][t[g].size() / 2];
      std::printf("%-34s GPU%d median %7.1f us  (min %6.1f, max %6.1f)  %6.1f GB/s crossing\n", name, g,
                  med, t[g].front(), t[g].back(), bytes / (med * 1e3));
      std::fflush(stdout);
    }
    // The drained rows must be the peer's.
    if (flag_mode >= 0) {
      for (int g = 0; g < 2; ++g) {
        CHECK(cudaSetDevice(g));
        CHECK(cudaDeviceSynchronize());
      }
      for (int g = 0; g < 2; ++g) {
        CHECK(cudaSetDevice(g));
        std::vector<unsigned char> h(row_bytes);
        for (int64_t row : {int64_t{0}, rows / 2, rows - 1}) {
          CHECK(cudaMemcpy(h.data(), r[g].recv + (rows + row) * row_bytes, row_bytes,
                           cudaMemcpyDeviceToHost));
          for (int i = 0; i < row_bytes; ++i) {
            if (h[i] != 2 - g) {
              std::fprintf(stderr, "GPU%d row %lld byte %d is %d, not %d\n", g, (long long)row, i, h[i],
                           2 - g);
              std::exit(1);
            }
          }
        }
        CHECK(cudaMemset(r[g].recv, 0, 2 * bytes));
      }
    }
  };
  std::fflush(stdout);
  // argv[5]: which runs, "base" or "<chunks>:<mode>,..." (modes: 0 memcpy flag
  // on B, 1 kernel flag on B, 2 memcpy flag on A; 3 no go wait, flags by
  // cuStreamWriteValue64 on B; 4 go waited by cuStreamWaitValue64, flags as 3;
  // 5 go waited as the value 1 and reset by stream memory operations, flags by
  // 8-byte copies of words the kernel wrote, on B: nothing the host must know).
  const char* which = argc > 5 ? argv[5] : "base";
  if (std::string(which) == "base") {
    run(0, -1, "copy engines alone, one copy");
    run(0, -2, "kernel own rows alone");
  } else {
    for (const char* q = which; *q;) {
      int chunks = 0, mode = 0, used = 0;
      if (std::sscanf(q, "%d:%d%n", &chunks, &mode, &used) != 2) break;
      if (chunks < 1 || chunks > kMaxChunks || mode < 0 || mode > 5) {
        std::fprintf(stderr, "chunks must be 1..%d and mode 0..5, got %d:%d\n", kMaxChunks, chunks,
                     mode);
        return 1;
      }
      char name[64];
      std::snprintf(name, sizeof name, "pipeline chunks %2d flag mode %d", chunks, mode);
      run(chunks, mode, name);
      q += used;
      if (*q == ',') ++q;
    }
  }
  return 0;
}
