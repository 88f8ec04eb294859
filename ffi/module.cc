// Python module jax_ep._C: build information, plus the CUDA backend's
// bindings (FFI handler capsules, buffer management) when built with CUDA.
#include <nanobind/nanobind.h>

#include <string>

#include "xla/ffi/api/c_api.h"

#include "buffer_layout.h"

#ifdef JAX_EP_WITH_CUDA
#include <cuda_runtime_api.h>

#include "cuda_bindings.h"
#endif

#ifndef JAX_EP_CUDA_ARCHS
#define JAX_EP_CUDA_ARCHS ""
#endif

namespace nb = nanobind;

namespace {

nb::dict BuildInfo() {
  nb::dict info;
#ifdef JAX_EP_WITH_CUDA
  info["cuda"] = true;
  info["cuda_runtime_version_built"] = static_cast<int>(CUDART_VERSION);
#else
  info["cuda"] = false;
  info["cuda_runtime_version_built"] = nb::none();
#endif
  const std::string api = std::to_string(XLA_FFI_API_MAJOR) + "." +
                          std::to_string(XLA_FFI_API_MINOR);
  info["ffi_api_version"] = nb::str(api.c_str());
  info["cuda_archs"] = nb::str(JAX_EP_CUDA_ARCHS);
  return info;
}

}  // namespace

NB_MODULE(_C, m) {
  m.doc() = "jax_ep native extension";
  m.def("build_info", &BuildInfo,
        "Build configuration: cuda, cuda_runtime_version_built, "
        "ffi_api_version (XLA FFI headers compiled against), cuda_archs.");
  // Pure arithmetic on the buffer layout: available in CPU-only builds too, so
  // Buffer.get_buffer_size_hint works anywhere.
  m.def("buffer_bytes_needed", &jax_ep::BufferBytesNeeded, nb::arg("num_ranks"),
        nb::arg("num_tokens"), nb::arg("num_worst_tokens"), nb::arg("hidden"),
        nb::arg("num_topk"), nb::arg("elt_bytes"),
        "Bytes of communication buffer one GPU needs (ffi/buffer_layout.h).");
  m.def("low_latency_bytes_needed", &jax_ep::LowLatencyBytesNeeded, nb::arg("num_ranks"),
        nb::arg("num_max_tokens"), nb::arg("num_topk"), nb::arg("data_row_bytes"),
        "Bytes of communication buffer one GPU needs for the low-latency ops, with "
        "data_row_bytes = max(dispatched row bytes, 4 * hidden) (ffi/buffer_layout.h).");
  // Limits, from their one home (ffi/buffer_layout.h).
  m.attr("MAX_RANKS") = jax_ep::kMaxRanks;
  m.attr("MAX_TOPK") = jax_ep::kMaxTopK;
  m.attr("MAX_SMS") = jax_ep::kMaxBlocks;
  m.attr("MAX_LOW_LATENCY_HIDDEN") = jax_ep::kMaxLowLatencyHidden;
  m.attr("MAX_LOW_LATENCY_EXPERTS") = jax_ep::kMaxLowLatencyExperts;
  m.attr("FP8_BLOCK") = jax_ep::kFp8Block;
#ifdef JAX_EP_WITH_CUDA
  jax_ep::BindCuda(m);
#endif
}
