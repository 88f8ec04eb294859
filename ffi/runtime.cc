#include "runtime.h"

#include <algorithm>
#include <cstring>
#include <map>
#include <memory>
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
  int alive_slot = -1;
  std::vector<void*> ipc_opened;  // closed when the last holder lets go
  ~Registered();
};

std::mutex& RegistryMutex() {
  static std::mutex m;
  return m;
}
// Entries are shared: a handler holds one while it launches, so unregistering
// never closes mappings under it.
std::map<std::pair<int64_t, int>, std::shared_ptr<Registered>>& Registry() {
  static auto* r = new std::map<std::pair<int64_t, int>, std::shared_ptr<Registered>>();
  return *r;  // leaked on purpose: no teardown-order issues at exit
}

void CloseMappings(int device, const std::vector<void*>& opened) {
  if (opened.empty()) return;
  int saved = -1;
  (void)cudaGetDevice(&saved);
  (void)cudaSetDevice(device);
  for (void* p : opened) (void)cudaIpcCloseMemHandle(p);
  if (saved >= 0) (void)cudaSetDevice(saved);
}

Registered::~Registered() { CloseMappings(device, ipc_opened); }

// Liveness words: one never-freed table per device; a live group's slot holds
// its buffer id, a dead one's 0. Kernels check it on entry, so a launch
// replayed from a captured CUDA graph after destroy() traps instead of
// touching freed peer memory.
constexpr int kAliveSlots = 4096;

struct AliveTable {
  uint32_t* words = nullptr;
  std::vector<bool> used = std::vector<bool>(kAliveSlots, false);
};

AliveTable& AliveFor(int device) {  // under RegistryMutex
  static auto* tables = new std::map<int, AliveTable>();
  return (*tables)[device];
}

void WriteAlive(int device, uint32_t* word, uint32_t value) {
  ScopedDevice scope(device);
  Check(cudaMemcpy(word, &value, sizeof(value), cudaMemcpyHostToDevice), "cudaMemcpy(alive)");
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
    const size_t bytes = kFaultSlotInts * kMaxRanks * sizeof(int);
    Check(cudaHostAlloc(&p, bytes, cudaHostAllocMapped | cudaHostAllocPortable),
          "cudaHostAlloc(fault record)");
    std::memset(p, 0, bytes);
    record = static_cast<int*>(p);
  }
  return record;
}

std::vector<Fault> ReadFaultRecords() {
  std::vector<Fault> causes, told;
  for (int slot = 0; slot < kMaxRanks; ++slot) {
    const volatile int* r = FaultRecord() + slot * kFaultSlotInts;
    if (r[0] != 2) continue;
    const Fault f{r[1], r[2], r[3], r[4], r[5], static_cast<uint32_t>(r[6])};
    (f.kind == kFaultPeerAborted ? told : causes).push_back(f);
  }
  causes.insert(causes.end(), told.begin(), told.end());
  return causes;
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

void RegisterGroup(int64_t buffer_id, const DeviceBuffer& local, int rank, int num_ranks,
                   int ranks_on_device, const std::vector<PeerSpec>& peers) {
  if (num_ranks < 1 || num_ranks > kMaxRanks) {
    throw std::runtime_error("jax_ep: register_group: num_ranks must be in [1, " +
                             std::to_string(kMaxRanks) + "], got " + std::to_string(num_ranks));
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

  auto reg = std::make_shared<Registered>();
  reg->device = dev;
  GroupEntry& e = reg->entry;
  e.local_ptr = local.ptr();
  e.num_bytes = local.num_bytes();
  e.rank = rank;
  e.num_ranks = num_ranks;
  e.ranks_on_device = std::max(1, ranks_on_device);
  e.fault_record = FaultRecord();
  e.buffer_id = static_cast<uint32_t>(buffer_id);
  ScopedDevice scope(dev);
  Check(PreloadKernels(), "loading the jax_ep kernels");
  for (int d = 0; d < num_ranks; ++d) {
    const PeerSpec& p = peers[d];
    if (d == rank) {
      e.peers[d] = static_cast<char*>(local.ptr());
    } else if (p.local_ptr != nullptr) {
      // Same process, other device: direct peer access.
      if (p.local_device != dev) {
        int can = 0;
        Check(cudaDeviceCanAccessPeer(&can, dev, p.local_device), "cudaDeviceCanAccessPeer");
        if (!can) {
          throw std::runtime_error("jax_ep: register_group: device " + std::to_string(dev) +
                                   " cannot access device " + std::to_string(p.local_device));
        }
        cudaError_t err = cudaDeviceEnablePeerAccess(p.local_device, 0);
        if (err == cudaErrorPeerAccessAlreadyEnabled) {
          (void)cudaGetLastError();  // sticky in the runtime; clear it
        } else {
          Check(err, "cudaDeviceEnablePeerAccess");
        }
      }
      e.peers[d] = static_cast<char*>(p.local_ptr);
      e.num_bytes = std::min(e.num_bytes, p.local_bytes);
    } else {
      if (p.ipc_handle.size() != sizeof(cudaIpcMemHandle_t)) {
        throw std::runtime_error("jax_ep: register_group: IPC handle of rank " +
                                 std::to_string(d) + " has " +
                                 std::to_string(p.ipc_handle.size()) + " bytes, expected " +
                                 std::to_string(sizeof(cudaIpcMemHandle_t)));
      }
      cudaIpcMemHandle_t h;
      std::memcpy(&h, p.ipc_handle.data(), sizeof(h));
      void* mapped = nullptr;
      Check(cudaIpcOpenMemHandle(&mapped, h, cudaIpcMemLazyEnablePeerAccess),
            "cudaIpcOpenMemHandle (rank " + std::to_string(d) + ")");
      reg->ipc_opened.push_back(mapped);  // closed by ~Registered on any failure below
      e.peers[d] = static_cast<char*>(mapped);
    }
  }
  std::lock_guard<std::mutex> lock(RegistryMutex());
  AliveTable& table = AliveFor(dev);
  if (table.words == nullptr) {
    void* words = nullptr;
    Check(cudaMalloc(&words, kAliveSlots * sizeof(uint32_t)), "cudaMalloc(alive table)");
    Check(cudaMemset(words, 0, kAliveSlots * sizeof(uint32_t)), "cudaMemset(alive table)");
    table.words = static_cast<uint32_t*>(words);
  }
  const auto free_slot = std::find(table.used.begin(), table.used.end(), false);
  if (free_slot == table.used.end()) {
    throw std::runtime_error("jax_ep: register_group: more than " + std::to_string(kAliveSlots) +
                             " live Buffers on one device");
  }
  reg->alive_slot = static_cast<int>(free_slot - table.used.begin());
  e.alive = table.words + reg->alive_slot;
  WriteAlive(dev, table.words + reg->alive_slot, e.buffer_id);
  table.used[reg->alive_slot] = true;
  Registry()[{buffer_id, dev}] = std::move(reg);
}

void UnregisterGroup(int64_t buffer_id, int device_ordinal) {
  std::shared_ptr<Registered> reg;
  {
    std::lock_guard<std::mutex> lock(RegistryMutex());
    auto it = Registry().find({buffer_id, device_ordinal});
    if (it == Registry().end()) return;
    reg = std::move(it->second);
    Registry().erase(it);
    AliveTable& table = AliveFor(device_ordinal);
    WriteAlive(device_ordinal, table.words + reg->alive_slot, 0u);
    table.used[reg->alive_slot] = false;
  }
  // The mappings close when the last holder (this, or a handler) lets go.
}

bool LookupGroup(int64_t buffer_id, int device_ordinal, GroupEntry* out) {
  std::lock_guard<std::mutex> lock(RegistryMutex());
  auto it = Registry().find({buffer_id, device_ordinal});
  if (it == Registry().end()) return false;
  *out = it->second->entry;
  return true;
}

double MeasurePeerCopyGbps(int device_a, int device_b, int64_t num_bytes, int iters) {
  if (device_a == device_b) throw std::runtime_error("jax_ep: p2p bandwidth needs two devices");
  const int devs[2] = {device_a, device_b};
  void* src[2] = {nullptr, nullptr};
  void* dst[2] = {nullptr, nullptr};
  cudaStream_t streams[2] = {nullptr, nullptr};
  cudaEvent_t start[2] = {nullptr, nullptr}, stop[2] = {nullptr, nullptr};
  double gbps = 0.0;
  std::string error;
  try {
    for (int k = 0; k < 2; ++k) {
      ScopedDevice scope(devs[k]);
      cudaError_t err = cudaDeviceEnablePeerAccess(devs[1 - k], 0);
      if (err == cudaErrorPeerAccessAlreadyEnabled) {
        (void)cudaGetLastError();
      } else {
        Check(err, "cudaDeviceEnablePeerAccess");
      }
      Check(cudaMalloc(&src[k], num_bytes), "cudaMalloc");
      Check(cudaMalloc(&dst[k], num_bytes), "cudaMalloc");
      Check(cudaMemset(src[k], 1, num_bytes), "cudaMemset");
      Check(cudaStreamCreateWithFlags(&streams[k], cudaStreamNonBlocking), "cudaStreamCreate");
      Check(cudaEventCreate(&start[k]), "cudaEventCreate");
      Check(cudaEventCreate(&stop[k]), "cudaEventCreate");
    }
    auto copy_both = [&] {
      for (int k = 0; k < 2; ++k) {
        Check(cudaMemcpyPeerAsync(dst[1 - k], devs[1 - k], src[k], devs[k], num_bytes, streams[k]),
              "cudaMemcpyPeerAsync");
      }
    };
    copy_both();  // warm-up
    for (int k = 0; k < 2; ++k) Check(cudaStreamSynchronize(streams[k]), "sync");
    for (int k = 0; k < 2; ++k) Check(cudaEventRecord(start[k], streams[k]), "cudaEventRecord");
    for (int it = 0; it < iters; ++it) copy_both();
    float worst_ms = 0.f;
    for (int k = 0; k < 2; ++k) {
      Check(cudaEventRecord(stop[k], streams[k]), "cudaEventRecord");
      Check(cudaEventSynchronize(stop[k]), "cudaEventSynchronize");
      float ms = 0.f;
      Check(cudaEventElapsedTime(&ms, start[k], stop[k]), "cudaEventElapsedTime");
      worst_ms = std::max(worst_ms, ms);
    }
    gbps = static_cast<double>(num_bytes) * iters / (worst_ms * 1e-3) / 1e9;
  } catch (const std::exception& e) {
    error = e.what();
  }
  for (int k = 0; k < 2; ++k) {
    ScopedDevice scope(devs[k]);
    if (src[k]) (void)cudaFree(src[k]);
    if (dst[k]) (void)cudaFree(dst[k]);
    if (streams[k]) (void)cudaStreamDestroy(streams[k]);
    if (start[k]) (void)cudaEventDestroy(start[k]);
    if (stop[k]) (void)cudaEventDestroy(stop[k]);
  }
  if (!error.empty()) throw std::runtime_error(error);
  return gbps;
}

std::string DevicePciBusId(int device_ordinal) {
  char id[32] = {0};
  Check(cudaDeviceGetPCIBusId(id, sizeof(id), device_ordinal), "cudaDeviceGetPCIBusId");
  return std::string(id);
}

}  // namespace jax_ep
