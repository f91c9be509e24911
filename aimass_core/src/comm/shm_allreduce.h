// Intra-node allreduce through a small shared-memory segment (internal to the comm area).
//
// The buffer goes through in chunks (default 512 KiB; smaller with many local ranks,
// so the segment stays within 32 MiB) so the shared memory stays cache-resident. Per chunk, each local rank
//   1. stages the parts of its input that the peers reduce into its slot of a
//      ring of staging buffers (kDepth deep),
//   2. reduces its own slice straight from its own input plus the peers' staged
//      parts (SIMD kernel) into the shared result slot; with several nodes the
//      slice is then allreduced across nodes over MPI (one rank per node and slice),
//   3. copies every rank's reduced slice from the result slot into its output.
// The steps of consecutive chunks are software-pipelined (stage c+1, reduce c,
// gather c-1) and synchronised with per-rank sequence counters in the segment
// (acquire/release atomics; spin, then yield, since ranks may share cores), not
// with MPI barriers. DRAM traffic per rank approaches one read of the input and
// one write of the output. A peer that stops advancing raises DistributedError
// after the timeout instead of hanging.
//
// The segment is POSIX shared memory created by local rank 0 and unlinked as
// soon as every local rank mapped it (nothing leaks when a job dies); it needs
// no MPI one-sided component.
#pragma once
#include <mpi.h>

#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <vector>

#include "aimass/collectives.h"
#include "aimass/comm.h"
#include "aimass/comm_kernels.h"
#include "aimass/dtype.h"

namespace aimass {
namespace comm {

// Element-wise kernels shared by the shared-memory collectives (shm_allreduce.cc).
ElemOp elem_op(ReduceOp op);
// dst = op over the k sources (16-bit floats accumulate in fp32; Bool: sum/max = or, min/product = and).
void reduce_sources(DType dtype, ReduceOp op, const char* const* srcs, int k, char* dst, size_t n);
// The MPI path's average: divide by the world size (integers truncate).
void divide(DType dtype, char* data, size_t n, int world);

// A run of elements of the virtual concatenation a fused buffer would hold:
// read from `in`, the result written to `out` (in may equal out); average: the
// result is divided by the world size (as the MPI path does after the sum).
struct ShmSegment {
  const char* in;
  char* out;
  int64_t count;
  bool average = false;
};

class ShmAllreduce {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr int kDepth = 4;  // staging/result ring slots per rank

  // Collective over comm.comm() (every rank, every node). available() is false
  // (on every rank alike) when a node has one rank, node sizes differ, or the
  // segment cannot be created somewhere.
  ShmAllreduce(const Communicator& comm, size_t chunk_bytes, double timeout_s);
  // Attaches to caller-owned, zero-filled memory of segment_bytes(local_size, chunk_bytes)
  // bytes shared by the local ranks (threads or processes); used by the unit tests.
  ShmAllreduce(int local_rank, int local_size, void* memory, size_t chunk_bytes, double timeout_s);
  static size_t segment_bytes(int local_size, size_t chunk_bytes);
  ~ShmAllreduce();
  ShmAllreduce(const ShmAllreduce&) = delete;
  ShmAllreduce& operator=(const ShmAllreduce&) = delete;

  bool available() const { return base_ != nullptr; }
  size_t chunk_bytes() const { return chunk_bytes_; }
  void set_timeout(double seconds) { timeout_s_ = seconds; }
  // Receives steady_clock nanoseconds as the run makes progress or waits (the engine's watchdog).
  void set_heartbeat(std::atomic<int64_t>* beat) { heartbeat_ = beat; }

  // Allreduces `count` elements of `dtype` (any DType; Bool: Sum/Max = or, Min/Product = and) spread over
  // `segs` (segments marked average are divided by `world_size`; op is then Sum).
  // cross_reduce (only with several nodes) allreduces one reduced slice in place
  // across nodes. Every local rank must call it with the same count/dtype/op.
  void run(const std::vector<ShmSegment>& segs, int64_t count, DType dtype, ReduceOp op,
           int world_size, const std::function<void(void*, int64_t)>& cross_reduce);

 private:
  struct alignas(128) Control {  // written by one local rank, read by all
    std::atomic<uint64_t> staged;    // last chunk sequence whose parts this rank staged
    std::atomic<uint64_t> reduced;   // last chunk sequence whose slice this rank reduced
    std::atomic<uint64_t> gathered;  // last chunk sequence whose results this rank copied out
    std::atomic<uint64_t> aborted;   // nonzero: this rank gave up (peers fail at once)
  };
  static size_t ctrl_bytes(int local_size);
  Control* ctrl(int j) const { return reinterpret_cast<Control*>(base_) + j; }
  char* staging(int j, uint64_t seq) const;
  char* result(uint64_t seq) const;
  void wait_counter(int j, int which, uint64_t target);
  void pulse(Clock::time_point now) const;
  void slice(int j, int64_t m, size_t es, int64_t* b, int64_t* e) const;

  int lsize_ = 1, lrank_ = 0;
  size_t chunk_bytes_ = 0;
  double timeout_s_ = 60;
  std::atomic<int64_t>* heartbeat_ = nullptr;
  char* base_ = nullptr;
  size_t bytes_ = 0;
  size_t ctrl_bytes_ = 0;
  bool owned_ = false;  // mapped by this object (munmap on destruction)
  uint64_t seq_ = 0;  // chunks done by this rank (the same on every local rank)
};

}  // namespace comm
}  // namespace aimass
