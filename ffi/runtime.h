// Host runtime: communication buffers and the group registry the FFI
// handlers consult. Plain C++ (cuda_runtime_api.h only), thread-safe.
#pragma once

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include <cuda_runtime_api.h>

#include "buffer_layout.h"

namespace jax_ep {

// One zeroed cudaMalloc allocation on one device. Errors are reported by
// throwing std::runtime_error carrying the CUDA error string.
class DeviceBuffer {
 public:
  DeviceBuffer(int device_ordinal, int64_t num_bytes);
  ~DeviceBuffer();
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // 64-byte cudaIpcMemHandle_t of the allocation, as raw bytes.
  std::string IpcHandle() const;
  void Free();  // idempotent
  // Waits for all work on this buffer's device (ours and XLA's), so nothing
  // still reads or writes peers' memory when the group is torn down.
  void Synchronize() const;

  void* ptr() const { return ptr_; }
  int64_t num_bytes() const { return num_bytes_; }
  int device_ordinal() const { return device_ordinal_; }

 private:
  void* ptr_ = nullptr;
  int64_t num_bytes_ = 0;
  int device_ordinal_ = -1;
};

// A group member as given to RegisterGroup: either a buffer of this process
// (`local_ptr` set, with its device) or a peer process's IPC handle.
struct PeerSpec {
  void* local_ptr = nullptr;
  int local_device = -1;
  int64_t local_bytes = 0;
  std::string ipc_handle;  // used when local_ptr == nullptr
};

// What a handler needs about the group of (buffer_id, device_ordinal).
struct GroupEntry {
  void* local_ptr = nullptr;
  int64_t num_bytes = 0;  // min over the local and same-process peer buffers
  int rank = 0;
  int num_ranks = 0;
  int ranks_on_device = 1;               // group members on this GPU (any process)
  std::array<char*, kMaxRanks> peers{};  // rank order, as mapped here
  int* fault_record = nullptr;           // FaultRecord(), see below
  const uint32_t* alive = nullptr;       // liveness word, see AliveSlot
  uint32_t buffer_id = 0;
};

// The process's host-mapped fault record: one int32[8] slot {state, kind, op,
// rank, peer, other_op, seq, 0} per rank (kMaxRanks slots), which a kernel
// fills before trapping (state 2 = written; kind is a FaultKind, op an
// OpCode). One slot per rank, because ranks driven by one process run on
// different GPUs, and atomics on host memory are not atomic across devices:
// a shared slot let a rank told of an abort overwrite the rank that caused
// it. Allocated on first use; throws on failure.
int* FaultRecord();

struct Fault {
  int kind, op, rank, peer, other_op;
  uint32_t seq;
};

// What the kernels of this process recorded before they gave up, causes first
// (a rank that gave up on its own before the ranks it told), then by rank.
std::vector<Fault> ReadFaultRecords();

// Maps every peer into `local`'s device and records the group. Replaces an
// existing entry with the same key (closing its IPC mappings).
// `ranks_on_device` is how many members of the group (any process) use this
// GPU. Throws std::runtime_error on failure.
void RegisterGroup(int64_t buffer_id, const DeviceBuffer& local, int rank, int num_ranks,
                   int ranks_on_device, const std::vector<PeerSpec>& peers);

// Marks the group dead (kernels replayed later trap) and closes its IPC
// mappings once no handler holds it; no-op for an unknown key.
void UnregisterGroup(int64_t buffer_id, int device_ordinal);

// Copies the entry out; false when the key is unknown (or unregistered).
bool LookupGroup(int64_t buffer_id, int device_ordinal, GroupEntry* out);

// Copy-engine bandwidth between two devices of this process, both directions
// at once, in GB/s each way (slowest direction), over `num_bytes` per
// direction: the benchmark's "p2p" reference.
double MeasurePeerCopyGbps(int device_a, int device_b, int64_t num_bytes, int iters);

// PCI bus id of a device ("0000:1b:00.0"): identifies a GPU across processes.
std::string DevicePciBusId(int device_ordinal);

}  // namespace jax_ep
