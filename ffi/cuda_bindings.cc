#include "cuda_bindings.h"

#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>
#include <nanobind/stl/string.h>

#include "xla/ffi/api/ffi.h"

#include "buffer_layout.h"
#include "runtime.h"

// Defined in handlers.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLayout);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpCombine);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpClock);
// Defined in low_latency_handlers.cc.
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatchRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineSend);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombineRecv);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCachedDispatch);
XLA_FFI_DECLARE_HANDLER_SYMBOL(JaxEpLowLatencyCombine);

namespace nb = nanobind;
using namespace nb::literals;

namespace jax_ep {
namespace {

template <typename T>
nb::capsule EncapsulateHandler(T* fn) {
  static_assert(std::is_invocable_r_v<XLA_FFI_Error*, T, XLA_FFI_CallFrame*>,
                "not an XLA FFI handler");
  return nb::capsule(reinterpret_cast<void*>(fn));
}

// A recorded fault in the words the kernel printed.
std::string FaultText(const Fault& f) {
  const std::string op = OpName(f.op), other = OpName(f.other_op);
  const std::string r = std::to_string(f.rank), p = std::to_string(f.peer);
  switch (f.kind) {
    case kFaultTimeout: return op + " timed out on rank " + r + " waiting for rank " + p;
    case kFaultOpMismatch: return op + " on rank " + r + " met " + other + " from rank " + p;
    case kFaultShapeMismatch:
      return op + " on rank " + r + " met " + other + " with different shapes from rank " + p;
    case kFaultLayoutMismatch:
      return op + " on rank " + r + ": the layout does not match topk_idx (a stale layout?)";
    case kFaultPeerAborted: return op + " on rank " + r + ": rank " + p + " gave up on the op";
    case kFaultBadRank:
      return op + " got rank operand " + p + " but the buffer is registered as rank " + r;
    case kFaultDestroyed: return op + " used a Buffer after destroy()";
    case kFaultHandleMismatch:
      return op + " on rank " + r + ": a row from rank " + p + " does not match the handle";
    case kFaultReceivePending:
      return op + " on rank " + r + ": the " + other + " sent before it was not received yet "
             "(call its recv_fn first)";
    case kFaultNothingToReceive:
      return op + " on rank " + r + ": nothing to receive (its send must be the last jax_ep op "
             "on this Buffer before it)";
    default: return op + " failed on rank " + r;
  }
}

}  // namespace

void BindCuda(nb::module_& m) {
  m.def("ffi_targets", []() {
    nb::dict d;
    d["jax_ep_layout"] = EncapsulateHandler(JaxEpLayout);
    d["jax_ep_dispatch"] = EncapsulateHandler(JaxEpDispatch);
    d["jax_ep_cached_dispatch"] = EncapsulateHandler(JaxEpCachedDispatch);
    d["jax_ep_combine"] = EncapsulateHandler(JaxEpCombine);
    d["jax_ep_clock"] = EncapsulateHandler(JaxEpClock);
    d["jax_ep_ll_dispatch_send"] = EncapsulateHandler(JaxEpLowLatencyDispatchSend);
    d["jax_ep_ll_dispatch_recv"] = EncapsulateHandler(JaxEpLowLatencyDispatchRecv);
    d["jax_ep_ll_combine_send"] = EncapsulateHandler(JaxEpLowLatencyCombineSend);
    d["jax_ep_ll_combine_recv"] = EncapsulateHandler(JaxEpLowLatencyCombineRecv);
    d["jax_ep_ll_dispatch"] = EncapsulateHandler(JaxEpLowLatencyDispatch);
    d["jax_ep_ll_cached_dispatch"] = EncapsulateHandler(JaxEpLowLatencyCachedDispatch);
    d["jax_ep_ll_combine"] = EncapsulateHandler(JaxEpLowLatencyCombine);
    return d;
  });

  // std::runtime_error from the runtime becomes RuntimeError in Python.
  nb::class_<DeviceBuffer>(m, "DeviceBuffer")
      .def(nb::init<int, int64_t>(), "device_ordinal"_a, "num_bytes"_a)
      .def("ipc_handle",
           [](const DeviceBuffer& b) {
             const std::string h = b.IpcHandle();
             return nb::bytes(h.data(), h.size());
           })
      .def_prop_ro("ptr",
                   [](const DeviceBuffer& b) {
                     return static_cast<uint64_t>(
                         reinterpret_cast<uintptr_t>(b.ptr()));
                   })
      .def_prop_ro("num_bytes", &DeviceBuffer::num_bytes)
      .def_prop_ro("device_ordinal", &DeviceBuffer::device_ordinal)
      .def("free", &DeviceBuffer::Free)
      .def("synchronize", &DeviceBuffer::Synchronize,
           nb::call_guard<nb::gil_scoped_release>());

  m.def(
      "register_group",
      [](int64_t buffer_id, const DeviceBuffer& local, int rank, int num_ranks,
         int ranks_on_device, nb::list peers) {
        std::vector<PeerSpec> specs;
        specs.reserve(nb::len(peers));
        for (nb::handle h : peers) {
          PeerSpec s;
          if (nb::isinstance<DeviceBuffer>(h)) {
            const DeviceBuffer& b = nb::cast<const DeviceBuffer&>(h);
            if (b.ptr() == nullptr) {
              throw std::runtime_error("jax_ep: register_group: a peer DeviceBuffer was freed");
            }
            s.local_ptr = b.ptr();
            s.local_device = b.device_ordinal();
            s.local_bytes = b.num_bytes();
          } else if (nb::isinstance<nb::bytes>(h)) {
            nb::bytes bytes = nb::borrow<nb::bytes>(h);
            s.ipc_handle.assign(static_cast<const char*>(bytes.data()), bytes.size());
          } else {
            throw nb::type_error(
                "register_group: peers must hold DeviceBuffer or bytes (IPC handle)");
          }
          specs.push_back(std::move(s));
        }
        nb::gil_scoped_release release;
        RegisterGroup(buffer_id, local, rank, num_ranks, ranks_on_device, specs);
      },
      "buffer_id"_a, "local"_a, "rank"_a, "num_ranks"_a, "ranks_on_device"_a, "peers"_a);

  m.def(
      "unregister_group",
      [](int64_t buffer_id, int device_ordinal) {
        nb::gil_scoped_release release;
        UnregisterGroup(buffer_id, device_ordinal);
      },
      "buffer_id"_a, "device_ordinal"_a);

  // What a kernel of this process recorded before it trapped, as the message
  // it printed ("jax_ep: dispatch timed out on rank 0 waiting for rank 1"),
  // else None.
  m.def("fault_message", []() -> nb::object {
    std::string all;
    for (const Fault& f : ReadFaultRecords()) {
      if (!all.empty()) all += "\n";
      all += "jax_ep: " + FaultText(f);
    }
    if (all.empty()) return nb::none();
    return nb::str(all.c_str());
  });

  m.def(
      "p2p_bandwidth",
      [](int device_a, int device_b, int64_t num_bytes, int iters) {
        nb::gil_scoped_release release;
        return MeasurePeerCopyGbps(device_a, device_b, num_bytes, iters);
      },
      "device_a"_a, "device_b"_a, "num_bytes"_a = int64_t{1} << 30, "iters"_a = 10,
      "Copy-engine GB/s each way between two devices, both directions at once.");

  m.def("pci_bus_id", &DevicePciBusId, "device_ordinal"_a);

  // 0 when no usable driver/device (CPU-only machines) instead of raising.
  m.def("cuda_device_count", []() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return n;
  });

  m.def("cuda_runtime_version", []() {
    int v = 0;
    if (cudaRuntimeGetVersion(&v) != cudaSuccess) {
      (void)cudaGetLastError();
      return 0;
    }
    return v;
  });
}

}  // namespace jax_ep
