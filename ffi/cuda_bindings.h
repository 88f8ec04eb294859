// nanobind bindings of the CUDA half of jax_ep (called from ffi/module.cc
// when the extension is built with JAX_EP_WITH_CUDA).
#pragma once

#include <nanobind/nanobind.h>

namespace jax_ep {
void BindCuda(nanobind::module_& m);
}  // namespace jax_ep
