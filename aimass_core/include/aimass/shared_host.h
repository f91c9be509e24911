// Host memory that the other processes of the node can map (aimass.dist's gradient buckets): a
// sealed memfd per buffer, registered so that the shared-memory allreduce finds it. A local peer
// opens it once through /proc/<pid>/fd/<fd> and keeps the mapping (comm/host_regions.h), and the
// single-copy allreduce then reduces a bucket with plain loads and stores straight into every
// rank's bucket (no process_vm_readv / _writev, no page pinning, no staging copy).
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass {

// `bytes` of zeroed, page-aligned shared memory (MAP_SHARED of a memfd created with sealing; the
// size is sealed, so a peer's mapping can never be cut short: a peer that maps it never gets SIGBUS,
// even after this process died). No name in /dev/shm: the memory goes when the last mapping does.
// Throws aimass::IOError when memfd or the memory is not there (the caller falls back to private memory).
class SharedHostBuffer {
 public:
  explicit SharedHostBuffer(size_t bytes);
  ~SharedHostBuffer();
  SharedHostBuffer(const SharedHostBuffer&) = delete;
  SharedHostBuffer& operator=(const SharedHostBuffer&) = delete;

  void* data() const { return p_; }
  size_t size() const { return n_; }
  int fd() const { return fd_; }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;   // bytes asked for
  size_t mapped_ = 0;  // whole pages
  int fd_ = -1;
};

// Whether [p, p + bytes) lies inside one live SharedHostBuffer of this process (aimass.dist.is_shared: an
// array there takes the mapped allreduce where the engine maps the peers' buffers).
bool in_shared_host_buffer(const void* p, size_t bytes);

}  // namespace aimass
