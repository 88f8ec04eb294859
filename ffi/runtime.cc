#include "runtime.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <mutex>
#include <stdexcept>
#include <utility>

#include "kernels.h"

namespace jax_ep {
namespace {

[[noreturn]] void Fail(const std::string& what, cudaError_t err) {
  throw std::runtime_error("jax_ep: " + what + ": " + cudaGetErrorName(err) +
                           " (" + cudaGetErrorString(err) + ")");
}

void Check(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) Fail(what, err);
}

// Switches the calling thread's current device for a scope.
class ScopedDevice {
 public:
  explicit ScopedDevice(int device) {
    Check(cudaGetDevice(&saved_), "cudaGetDevice");
    if (saved_ != device) Check(cudaSetDevice(device), "cudaSetDevice");
  }
  ~ScopedDevice() {
    int now = -1;
    if (cudaGetDevice(&now) == cudaSuccess && now != saved_) {
      (void)cudaSetDevice(saved_);
    }
  }
  ScopedDevice(const ScopedDevice&) = delete;
  ScopedDevice& operator=(const ScopedDevice&) = delete;

 private:
  int saved_ = 0;
};

struct Registered {
  GroupEntry entry;
  int device = -1;
  std::vector<void*> ipc_opened;  // to cudaIpcCloseMemHandle on unregister
};

std::mutex& RegistryMutex() {
  static std::mutex m;
  return m;
}
std::map<std::pair<int64_t, int>, Registered>& Registry() {
  static auto* r = new std::map<std::pair<int64_t, int>, Registered>();
  return *r;  // leaked on purpose: no teardown-order issues at exit
}

void CloseMappings(const Registered& reg) {
  if (reg.ipc_opened.empty()) return;
  int saved = -1;
  (void)cudaGetDevice(&saved);
  (void)cudaSetDevice(reg.device);
  for (void* p : reg.ipc_opened) (void)cudaIpcCloseMemHandle(p);
  if (saved >= 0) (void)cudaSetDevice(saved);
}

}  // namespace

int* FaultRecord() {
  static std::mutex m;
  static int* record = nullptr;
  std::lock_guard<std::mutex> lock(m);
  if (record == nullptr) {
    void* p = nullptr;
    // Portable + mapped: one pinned allocation visible from every device
    // (unified addressing makes the host pointer valid on the device).
    Check(cudaHostAlloc(&p, 4 * sizeof(int), cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc(fault record)");
    std::memset(p, 0, 4 * sizeof(int));
    record = static_cast<int*>(p);
  }
  return record;
}

bool ReadFaultRecord(int* op, int* rank, int* peer) {
  const volatile int* r = FaultRecord();
  if (r[0] != 2) return false;
  *op = r[1];
  *rank = r[2];
  *peer = r[3];
  return true;
}

DeviceBuffer::DeviceBuffer(int device_ordinal, int64_t num_bytes)
    : num_bytes_(num_bytes), device_ordinal_(device_ordinal) {
  if (num_bytes <= 0) throw std::runtime_error("jax_ep: DeviceBuffer size must be > 0");
  ScopedDevice scope(device_ordinal);
  Check(cudaMalloc(&ptr_, static_cast<size_t>(num_bytes)), "cudaMalloc");
  // Zeroed headers are what the barrier protocol starts from; wait for the
  // memset so a peer can never see the buffer before it is clean.
  cudaError_t err = cudaMemset(ptr_, 0, static_cast<size_t>(num_bytes));
  if (err == cudaSuccess) err = cudaDeviceSynchronize();
  if (err != cudaSuccess) {
    (void)cudaFree(ptr_);
    ptr_ = nullptr;
    Fail("cudaMemset", err);
  }
}

DeviceBuffer::~DeviceBuffer() {
  try {
    Free();
  } catch (...) {
    // Destructors must not throw; the pointer is dropped either way.
  }
}

std::string DeviceBuffer::IpcHandle() const {
  if (ptr_ == nullptr) throw std::runtime_error("jax_ep: DeviceBuffer was freed");
  ScopedDevice scope(device_ordinal_);
  cudaIpcMemHandle_t h;
  Check(cudaIpcGetMemHandle(&h, ptr_), "cudaIpcGetMemHandle");
  return std::string(reinterpret_cast<const char*>(&h), sizeof(h));
}

void DeviceBuffer::Synchronize() const {
  ScopedDevice scope(device_ordinal_);
  Check(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
}

void DeviceBuffer::Free() {
  if (ptr_ == nullptr) return;
  void* p = ptr_;
  ptr_ = nullptr;
  ScopedDevice scope(device_ordinal_);
  Check(cudaFree(p), "cudaFree");
}

void RegisterGroup(int64_t buffer_id, const DeviceBuffer& local, int rank,
                   int num_ranks, const std::vector<PeerSpec>& peers) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::runtime_error("jax_ep: register_group: num_ranks must be in [1, 8]");
  }
  if (rank < 0 || rank >= num_ranks) {
    throw std::runtime_error("jax_ep: register_group: rank out of range");
  }
  if (static_cast<int>(peers.size()) != num_ranks) {
    throw std::runtime_error("jax_ep: register_group: len(peers) != num_ranks");
  }
  if (local.ptr() == nullptr) {
    throw std::runtime_error("jax_ep: register_group: local buffer was freed");
  }
  const int dev = local.device_ordinal();
  UnregisterGroup(buffer_id, dev);

  Registered reg;
  reg.device = dev;
  reg.entry.local_ptr = local.ptr();
  reg.entry.num_bytes = local.num_bytes();
  reg.entry.rank = rank;
  reg.entry.num_ranks = num_ranks;
  reg.entry.fault_record = FaultRecord();
  try {
    ScopedDevice scope(dev);
    Check(PreloadKernels(), "loading the jax_ep kernels");
    for (int d = 0; d < num_ranks; ++d) {
      const PeerSpec& p = peers[d];
      if (d == rank) {
        reg.entry.peers[d] = static_cast<char*>(local.ptr());
      } else if (p.local_ptr != nullptr) {
        // Same process, other device: direct peer access.
        if (p.local_device != dev) {
          int can = 0;
          Check(cudaDeviceCanAccessPeer(&can, dev, p.local_device),
                "cudaDeviceCanAccessPeer");
          if (!can) {
            throw std::runtime_error("jax_ep: register_group: device " +
                                     std::to_string(dev) + " cannot access device " +
                                     std::to_string(p.local_device));
          }
          cudaError_t err = cudaDeviceEnablePeerAccess(p.local_device, 0);
          if (err == cudaErrorPeerAccessAlreadyEnabled) {
            (void)cudaGetLastError();  // sticky in the runtime; clear it
          } else {
            Check(err, "cudaDeviceEnablePeerAccess");
          }
        }
        reg.entry.peers[d] = static_cast<char*>(p.local_ptr);
        reg.entry.num_bytes = std::min(reg.entry.num_bytes, p.local_bytes);
      } else {
        if (p.ipc_handle.size() != sizeof(cudaIpcMemHandle_t)) {
          throw std::runtime_error("jax_ep: register_group: IPC handle of rank " +
                                   std::to_string(d) + " has " +
                                   std::to_string(p.ipc_handle.size()) +
                                   " bytes, expected " +
                                   std::to_string(sizeof(cudaIpcMemHandle_t)));
        }
        cudaIpcMemHandle_t h;
        std::memcpy(&h, p.ipc_handle.data(), sizeof(h));
        void* mapped = nullptr;
        Check(cudaIpcOpenMemHandle(&mapped, h, cudaIpcMemLazyEnablePeerAccess),
              "cudaIpcOpenMemHandle (rank " + std::to_string(d) + ")");
        reg.ipc_opened.push_back(mapped);
        reg.entry.peers[d] = static_cast<char*>(mapped);
      }
    }
  } catch (...) {
    CloseMappings(reg);
    throw;
  }
  std::lock_guard<std::mutex> lock(RegistryMutex());
  Registry()[{buffer_id, dev}] = std::move(reg);
}

void UnregisterGroup(int64_t buffer_id, int device_ordinal) {
  Registered reg;
  {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto it = Registry().find({buffer_id, device_ordinal});
    if (it == Registry().end()) return;
    reg = std::move(it->second);
    Registry().erase(it);
  }
  CloseMappings(reg);
}

bool LookupGroup(int64_t buffer_id, int device_ordinal, GroupEntry* out) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  auto it = Registry().find({buffer_id, device_ordinal});
  if (it == Registry().end()) return false;
  *out = it->second.entry;
  return true;
}

}  // namespace jax_ep
