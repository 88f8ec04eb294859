// Op entry points (one rank -> local family, several -> intranode family),
// module preloading, and the benchmark's device clock.
#include "common.cuh"
#include "kernels.h"

namespace jax_ep {

int DeviceSmCount() {
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

namespace {

__global__ void ClockKernel(uint64_t* out) { *out = GlobalTimerNs(); }

}  // namespace

cudaError_t LaunchClock(uint64_t* out, cudaStream_t stream) {
  ClockKernel<<<1, 1, 0, stream>>>(out);
  JAX_EP_LAUNCH_CHECK();
  return cudaSuccess;
}

cudaError_t PreloadKernels() {
  (void)DeviceSmCount();  // cached now: handlers may run while XLA captures a graph
  cudaFuncAttributes attr;
  JAX_EP_CUDA_RETURN_IF_ERROR(cudaFuncGetAttributes(&attr, ClockKernel));
  JAX_EP_CUDA_RETURN_IF_ERROR(layout::Preload());
  JAX_EP_CUDA_RETURN_IF_ERROR(local::Preload());
  JAX_EP_CUDA_RETURN_IF_ERROR(low_latency::Preload());
  return intranode::Preload();
}

cudaError_t LaunchDispatch(const DispatchArgs& a, cudaStream_t stream) {
  return a.group.num_ranks == 1 ? local::Dispatch(a, stream) : intranode::Dispatch(a, stream);
}

cudaError_t LaunchCachedDispatch(const CachedDispatchArgs& a, cudaStream_t stream) {
  return a.group.num_ranks == 1 ? local::CachedDispatch(a, stream)
                                : intranode::CachedDispatch(a, stream);
}

cudaError_t LaunchCombine(const CombineArgs& a, cudaStream_t stream) {
  return a.group.num_ranks == 1 ? local::Combine(a, stream) : intranode::Combine(a, stream);
}

}  // namespace jax_ep
