// NCCL collectives on device memory (aimass._cuda only). libnccl is opened at
// run time (dlopen) from the nvidia-nccl wheel, so the CUDA module imports
// without it and reports why NCCL is unusable instead of failing to load.
#pragma once
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace aimass::nccl {

// True when the module was compiled against nccl.h (the wheel was present at build time).
bool compiled();
// dlopen `library` (a path or a soname) and resolve the entry points; throws aimass::Error
// with dlerror() when that fails. Idempotent once it succeeded.
void load(const std::string& library);
bool loaded();
// NCCL's version as major*10000+minor*100+patch (throws when not loaded).
int version();
// A fresh ncclUniqueId (128 bytes) for rank 0 to broadcast over MPI.
std::vector<uint8_t> unique_id();

// Element types: float16 bfloat16 float32 float64 int8 uint8 int32 int64.
// Ops: sum average min max.
class Comm {
 public:
  // Collective over the `nranks` ranks that pass the same id; binds `device` first.
  Comm(const std::vector<uint8_t>& id, int nranks, int rank, int device);
  ~Comm();
  Comm(const Comm&) = delete;
  Comm& operator=(const Comm&) = delete;

  int rank() const { return rank_; }
  int size() const { return nranks_; }
  int device() const { return device_; }

  // Each call enqueues on `stream` (a cudaStream_t as an integer; 0 = legacy default stream).
  void allreduce(const void* send, void* recv, size_t count, const std::string& dtype, const std::string& op,
                 uintptr_t stream);
  void broadcast(const void* send, void* recv, size_t count, const std::string& dtype, int root, uintptr_t stream);
  // counts[r] elements from rank r land at offset sum(counts[:r]) of recv (equal counts: one ncclAllGather,
  // else one grouped broadcast per rank).
  void allgather(const void* send, void* recv, const std::vector<size_t>& counts, const std::string& dtype,
                 uintptr_t stream);
  // Reduce `send` (sum(counts) elements) and leave block r (counts[r] elements at offset sum(counts[:r]))
  // in rank r's recv (equal counts: one ncclReduceScatter, else one grouped ncclReduce per block).
  void reduce_scatter(const void* send, void* recv, const std::vector<size_t>& counts, const std::string& dtype,
                      const std::string& op, uintptr_t stream);

  // Wait until everything enqueued on `stream` so far has finished. Polls the stream and NCCL's
  // asynchronous error; on an NCCL error or after `timeout_s` the communicator is aborted (peers then
  // fail too instead of hanging) and aimass::DistributedError is thrown.
  void wait(uintptr_t stream, double timeout_s);
  // True when everything enqueued on `stream` so far has finished (throws on an NCCL error).
  bool query(uintptr_t stream);
  // Abort outstanding work and release the communicator; later calls raise ClosedError.
  void abort();
  bool closed() const { return comm_ == nullptr; }

 private:
  void* comm_ = nullptr;  // ncclComm_t
  int nranks_ = 0, rank_ = 0, device_ = 0;
  void check_open(const char* what) const;
  void check_async(const char* what);
};

}  // namespace aimass::nccl
