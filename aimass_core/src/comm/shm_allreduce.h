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
// (acquire/release atomics; spin, then sleep on the counter with a futex, since ranks may share
// cores: a waiting rank then takes no CPU time from the rank it waits for), not
// with MPI barriers. DRAM traffic per rank approaches one read of the input and
// one write of the output. A peer that stops advancing raises DistributedError
// after the timeout instead of hanging.
//
// The segment is POSIX shared memory created by local rank 0 and unlinked as
// soon as every local rank mapped it (nothing leaks when a job dies); it needs
// no MPI one-sided component.
#pragma once
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "aimass/collectives.h"
#include "aimass/comm.h"
#include "aimass/comm_kernels.h"
#include "aimass/dtype.h"
#include "aimass/memory.h"
#include "comm/host_regions.h"

namespace aimass {
namespace comm {

// Element-wise kernels shared by the shared-memory collectives (shm_allreduce.cc).
ElemOp elem_op(ReduceOp op);
// dst = op over the k sources (16-bit floats accumulate in fp32; Bool: sum/max = or, min/product = and).
void reduce_sources(DType dtype, ReduceOp op, const char* const* srcs, int k, char* dst, size_t n);
// The MPI path's average: divide by the world size (integers truncate).
void divide(DType dtype, char* data, size_t n, int world);
// reduce_sources, then the average when asked, into dst and, when dst2 is given, into dst2 too (the
// staged allreduce's result slot and output). fp32, fp64 and fp16/bf16 fold the average and the second
// store into the SIMD pass; other dtypes divide, then copy. dst may be srcs[0] (in place), never
// another source.
void reduce_into(DType dtype, ReduceOp op, const char* const* srcs, int k, char* dst, size_t n, bool average,
                 int world, char* dst2 = nullptr);
// One piece of a claimed-piece push (shm_cma.cc run_cma_steal, ll_push.cc): dst = the L ranks'
// inputs reduced in rank order, so the bits do not depend on which rank claimed the piece. `own` is
// rank me's input, peer(j) rank j's (read into a scratch buffer). When the own input comes first in
// rank order (me == 0, or L == 2: a op b is b op a bit for bit) the result goes straight into dst,
// which may be `own` (in place: the kernels never overwrite a source unread); else through `res`
// (n elements of scratch), then copied. srcs: room for L pointers.
template <class Peer>
inline void reduce_rank_order(DType dtype, ReduceOp op, int me, int L, const char* own, Peer&& peer, char* dst,
                              size_t n, bool average, int world, char* res, const char** srcs) {
  if (L == 2 || me == 0) {
    srcs[0] = own;
    for (int j = 0, i = 1; j < L; ++j)
      if (j != me) srcs[i++] = peer(j);
    reduce_into(dtype, op, srcs, L, dst, n, average, world);
  } else {
    for (int j = 0; j < L; ++j) srcs[j] = j == me ? own : peer(j);
    reduce_into(dtype, op, srcs, L, res, n, average, world);
    std::memcpy(dst, res, n * dtype_size(dtype));
  }
}

// One claimed piece of n elements reduced straight in the ranks' buffers, every one mapped into this process
// (shared host buffers: ShmAllreduce::run_mapped, LLChannel::push_allreduce): ins[j] / outs[j] are rank j's
// input / output of the piece (ins[me], outs[me] this rank's). The operands and kernels of reduce_rank_order,
// so the same bits; with two ranks one pass writes both outputs, with more the own output is copied into
// the peers'. In place is safe (every source of an element is read before it is written). res: n elements
// of scratch; srcs: room for L pointers.
void reduce_mapped_piece(DType dtype, ReduceOp op, int me, int L, const char* const* ins, char* const* outs, size_t n,
                         bool average, int world, char* res, const char** srcs);

// A run of elements of the virtual concatenation a fused buffer would hold:
// read from `in`, the result written to `out` (in may equal out); average: the
// result is divided by the world size (as the MPI path does after the sum).
// pad (staged mode only; the single-copy path ignores it): elements of the staging layout left
// empty before this segment, so that the segment sits in the staging slots at the same offset within
// a 64-byte line as its buffers (see shm_line_pads). Every local rank must pass the same pads.
struct ShmSegment {
  const char* in;
  char* out;
  int64_t count;
  bool average = false;
  int64_t pad = 0;
};

// Pads for the segments of a fused staged allreduce (ShmSegment::pad) that put each segment at
// `line_offset` bytes into a 64-byte line of the staging layout, so that a segment whose buffers start
// that far into a line (numpy's large arrays: 16 bytes, torch's: 64) is read and written by the reduce
// kernel on whole lines, as the low-latency channel's lead does for one buffer. line_offset must be the
// same on every local rank (the engine agrees it in its negotiation round); the actual addresses only
// decide how much it helps, never the layout. A line_offset that is not a multiple of the element size,
// or negative, leaves the segments packed (pads 0).
void shm_line_pads(std::vector<ShmSegment>& segs, size_t elem_bytes, int line_offset);

// Rank j's slice [*b, *e) of m elements of es bytes over L ranks: whole 64-byte units (cache lines), so no
// two ranks write one line. Every path that splits a buffer among the local ranks (staged, single copy,
// the caller-thread hierarchical allreduce) cuts it here, so they reduce the same elements alike.
inline void line_slice(int64_t m, size_t es, int L, int j, int64_t* b, int64_t* e) {
  const int64_t unit = std::max<int64_t>(1, 64 / static_cast<int64_t>(es));
  const int64_t units = (m + unit - 1) / unit;
  *b = std::min(m, units * j / L * unit);
  *e = std::min(m, units * (j + 1) / L * unit);
}

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
  size_t chunk_bytes() const { return chunk_bytes_; }  // the slot size: the largest chunk
  // Chunk size of the next collectives (every local rank alike; 0 or more than a slot: a slot;
  // rounded to whole 4 KiB pages). Smaller chunks keep a step's working set in the L2.
  void set_chunk(size_t bytes) {
    cut_ = bytes == 0 ? chunk_bytes_ : std::min(chunk_bytes_, std::max<size_t>(4096, bytes / 4096 * 4096));
  }
  size_t chunk() const { return cut_ ? cut_ : chunk_bytes_; }
  // Single-copy mode for the next collectives (every local rank alike): peers read each other's
  // buffers with process_vm_readv (cross-memory attach) instead of staging through the segment.
  // Only where cma_available(); the MPI constructor probes it on every rank (AIMASS_SHM_CMA=0: off).
  void use_cma(bool on) { cma_on_ = on && cma_ok_; }
  bool cma_available() const { return cma_ok_; }
  // Whether run() stages n segments through the segment rather than copying once: single copy while
  // the segments' address table fits one staging slot; across nodes whenever possible (one cross-node
  // allreduce per slice instead of one per chunk: fewer waits on the network).
  bool stages(size_t nsegs, bool cross) const {
    return !((cma_on_ || (cross && cma_ok_)) && nsegs * 2 * sizeof(uint64_t) <= chunk_bytes_);
  }
  // Tests (threads as ranks of one process): allow single-copy mode (push: see below).
  void allow_cma_for_tests(bool push = true, bool steal = true, bool map = true) {
    cma_ok_ = true;
    push_ok_ = push;
    steal_ok_ = push && steal;
    map_ok_ = steal_ok_ && map;
  }
  // Whether the claimed-piece push may reduce buffers that live in the peers' shared host buffers
  // (aimass/shared_host.h) with plain loads and stores, every peer's buffer mapped here once: each piece is
  // read from every rank's input and written into every rank's output in one pass, no kernel copy. A peer
  // whose buffers are not shared (or cannot be mapped) is read and written through the kernel as before;
  // either way the same kernels in the same operand order, so the bits are the same. Probed at start-up
  // (every rank maps every local peer's probe buffer; all agree); AIMASS_SHM_MAP=0: off.
  bool maps_peers() const { return map_ok_; }
  // Whether the last run() reduced every piece it claimed straight in the peers' mapped buffers.
  bool last_run_mapped() const { return mapped_; }
  // Whether the single-copy allreduce on one node pushes each reduced chunk into the peers' outputs
  // (process_vm_writev) instead of every rank reading the peers' reduced slices afterwards: every
  // byte of the inputs is read once and every byte of the outputs written once, by the rank that
  // reduced it (the pull allgather reads each reduced slice back from memory a second time).
  // Probed at start-up like cma_available(); AIMASS_SHM_CMA_PUSH=0: off.
  bool cma_push_available() const { return push_ok_; }
  // Whether the last run() or broadcast() let the peers write this rank's outputs (push mode): after a failure
  // a late peer may still write them, so the caller must not free or reuse them.
  bool peers_write_outputs() const { return pushed_; }
  // Whether the push mode hands out its pieces dynamically (a shared claim counter: a rank that is
  // descheduled or slower leaves its pieces to the others) instead of one fixed slice per rank, and
  // the single-copy broadcast's root pushes the pieces of each receiver's copy that the receiver has
  // not pulled yet. On every rank alike; AIMASS_SHM_CMA_STEAL=0: fixed slices, receivers pull alone.
  bool cma_steal_available() const { return steal_ok_; }
  void set_timeout(double seconds) { timeout_s_ = seconds; }
  // Receives steady_clock nanoseconds as the run makes progress or waits (the engine's watchdog).
  void set_heartbeat(std::atomic<int64_t>* beat) { heartbeat_ = beat; }

  // Allreduces `count` elements of `dtype` (any DType; Bool: Sum/Max = or, Min/Product = and) spread over
  // `segs` (segments marked average are divided by `world_size`; op is then Sum).
  // cross_reduce (only with several nodes) allreduces one reduced slice in place
  // across nodes. Every local rank must call it with the same count/dtype/op (and lead).
  // lead (staged mode): the buffers start this many elements past a 64-byte line on every rank; the
  // chunks are then cut on whole lines of the buffers (0, or not below the chunk: cut from element 0).
  void run(const std::vector<ShmSegment>& segs, int64_t count, DType dtype, ReduceOp op,
           int world_size, const std::function<void(void*, int64_t)>& cross_reduce, int64_t lead = 0);

  // ---- the other collectives on one node (shm_collectives.cc); local ranks are the ranks then.
  // Every local rank calls them with matching arguments, like MPI's.
  // Broadcast of `bytes` bytes from local rank `root` into every rank's `data` (the root's is the source).
  void broadcast(void* data, int64_t bytes, int root);
  // Every local rank posts `value` (and the address of `buffer`, read by a single-copy allgather);
  // returns every local rank's value, in local rank order.
  std::vector<int64_t> exchange(int64_t value, const void* buffer = nullptr);
  // Allgather: local rank j contributes rows[j] rows of row_bytes bytes (rows from exchange());
  // `out` receives them all in rank order (sum of rows x row_bytes bytes).
  void allgather(const void* in, const std::vector<int64_t>& rows, int64_t row_bytes, char* out);
  // Reduce-scatter: `in` holds the blocks of every rank back to back (counts[j] elements each);
  // `out` receives the reduction of this rank's block (divided by world_size when average).
  void reduce_scatter(const void* in, const std::vector<int64_t>& counts, char* out, DType dtype, ReduceOp op,
                      bool average, int world_size);

 private:
  struct alignas(128) Control {  // written by one local rank, read by all
    std::atomic<uint64_t> staged;    // last chunk sequence whose parts this rank staged
    std::atomic<uint64_t> reduced;   // last chunk sequence whose slice this rank reduced
    std::atomic<uint64_t> gathered;  // last chunk sequence whose results this rank copied out
    std::atomic<uint64_t> aborted;   // nonzero: this rank gave up (peers fail at once)
    std::atomic<uint64_t> info;      // a small value posted to the peers (allgather: rows)
    std::atomic<uint64_t> addr;      // single-copy mode: the address of the buffer peers read
    std::atomic<int64_t> pid;        // this rank's process id (process_vm_readv)
    // peers asleep on one of this rank's counters (futex on the counter's low word): a rank that
    // moves a counter wakes them only when this is nonzero, so the common case costs no syscall
    std::atomic<uint32_t> waiters;
    // claim counter (fetch_add; own cache line: the claims do not disturb the counters' line):
    // local rank 0's hands out the pieces of the push allreduce, a broadcast receiver's the pieces
    // of its copy (taken by the receiver pulling and the root pushing)
    alignas(64) std::atomic<uint64_t> claims;
  };
  // ---- single-copy mode (shm_cma.cc)
  void cma_read(int j, struct iovec* local, struct iovec* remote, size_t n);
  void cma_write(int j, struct iovec* local, struct iovec* remote, size_t n);
  void run_cma(const std::vector<ShmSegment>& segs, int64_t count, DType dtype, ReduceOp op, int world_size,
               const std::function<void(void*, int64_t)>& cross_reduce);
  void run_cma_steal(const std::vector<ShmSegment>& segs, const std::vector<int64_t>& starts, int64_t count,
                     DType dtype, ReduceOp op, int world_size, uint64_t h);
  void broadcast_cma(void* data, int64_t bytes, int root);
  void broadcast_cma_steal(void* data, int64_t bytes, int root);
  void allgather_cma(const void* in, const std::vector<int64_t>& rows, int64_t row_bytes, char* out);
  void reduce_scatter_cma(const void* in, const std::vector<int64_t>& counts, char* out, DType dtype, ReduceOp op,
                          bool average, int world_size);
  bool probe_cma(int j);  // reads local rank j's probe word
  bool probe_map();       // maps every local peer's probe buffer (posted in its staging slot 0)
  // The claimed-piece push with every peer's buffers mapped here (run_cma_steal when all of them are)
  void run_mapped(const std::vector<ShmSegment>& segs, const std::vector<int64_t>& starts, int64_t count,
                  DType dtype, ReduceOp op, int world_size, uint64_t base,
                  const std::vector<std::vector<const char*>>& ins, const std::vector<std::vector<char*>>& outs,
                  uint64_t h);
  // Whether a run of n segments posts where its buffers live (RegionRef per input and output) after its
  // address table, in the same staging slot
  bool refs_fit(size_t nseg) const { return nseg * (2 + 2 * kRegionRefWords) * sizeof(uint64_t) <= chunk_bytes_; }
  void finish_cma(uint64_t h, int which);  // the closing barrier of a single-copy collective
  // Ops other than allreduce keep the counters' meaning: staged >= s: this rank's staging slot for
  // s is written; reduced >= s: it read every staging slot up to s (and wrote its reduced slice);
  // gathered >= s: it read every result slot up to s.
  void wait_peers(int which, uint64_t target);
  void mark(uint64_t s, bool staged, bool reduced, bool gathered);
  template <typename Fn>
  void guarded(Fn&& fn);  // runs fn; on an exception marks this rank aborted (peers fail at once)
  // Steps t = 0..nsteps-1 in two overlapping stages: stage(t) runs beside consume(t - 1), the
  // heartbeat pulses every 16 steps, and at the end every counter moves to the last step's sequence.
  template <typename Stage, typename Consume>
  void pipeline(int64_t nsteps, Stage&& stage, Consume&& consume);
  static size_t ctrl_bytes(int local_size);
  Control* ctrl(int j) const { return reinterpret_cast<Control*>(base_) + j; }
  char* staging(int j, uint64_t seq) const;
  char* result(uint64_t seq) const;
  void wait_counter(int j, int which, uint64_t target);
  // Moves this rank's counter to s and wakes the peers asleep on it (wait_counter).
  void publish(std::atomic<uint64_t>& counter, uint64_t s);
  // Marks this rank aborted and wakes every peer asleep on its counters (they fail at once).
  void abort_here();
  void set_wait_policy();  // futex_on_ / yield_s_ from the environment and the CPU count
  void pulse(Clock::time_point now) const;

  int lsize_ = 1, lrank_ = 0;
  size_t chunk_bytes_ = 0;
  size_t cut_ = 0;  // set_chunk()
  bool cma_ok_ = false, cma_on_ = false, push_ok_ = false, pushed_ = false, steal_ok_ = false;
  bool map_ok_ = false, mapped_ = false;
  PeerRegions peer_maps_;  // the local peers' shared buffers mapped here (map_ok_)
  // per local rank: its claim counter's value when the next collective using it starts (every rank
  // tracks every counter alike; each claiming rank overshoots once per collective)
  std::vector<uint64_t> claim_base_;
  std::vector<char> tmp_;  // single-copy mode: the peers' pieces of one chunk (L2-resident)
  // single-copy mode across nodes: a slice spread over several tensors, contiguous (huge pages; a receive
  // of a cross-node step that timed out may stay posted into it: the engine then never frees it)
  AlignedBuffer xbuf_;
  uint64_t probe_ = 0;     // read by the peers' start-up probe
  uint64_t exchange_seq_ = 0;  // seq of the last exchange() (its addresses stay valid until the allgather)
  double timeout_s_ = 60;
  // Waits past the spin: yield for yield_s_, then sleep on the counter (futex) until the peer moves
  // it (AIMASS_SHM_WAIT=yield: the old yield-and-nap loop).
  bool futex_on_ = true;
  double yield_s_ = 0;
  std::atomic<int64_t>* heartbeat_ = nullptr;
  char* base_ = nullptr;
  size_t bytes_ = 0;
  size_t ctrl_bytes_ = 0;
  bool owned_ = false;  // mapped by this object (munmap on destruction)
  uint64_t seq_ = 0;  // chunks done by this rank (the same on every local rank)
};

}  // namespace comm
}  // namespace aimass
