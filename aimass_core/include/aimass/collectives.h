// The collective engine: one background thread per communicator owns all of
// aimass's MPI traffic. Callers submit named tensors and get a handle; the
// thread negotiates across ranks which names are ready everywhere (rank 0
// coordinates; a response cache reduces steady-state steps to one small
// bit-vector allreduce), fuses ready allreduces into one buffer up to a
// threshold, runs one MPI collective per buffer and unpacks the results.
//
// Mismatches never hang: the same name with different arguments on different
// ranks, or a name that some ranks do not submit within its timeout, fails
// that name on every rank with a DistributedError listing what each rank
// submitted. A peer that stops answering (dead, stopped, or stuck) fails
// every request, queued or in flight, after the engine timeout: every wait
// (negotiation, data phase over MPI or shared memory, and the caller's wait on
// its handle) has that deadline.
#pragma once
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <vector>

#include "aimass/comm.h"
#include "aimass/dtype.h"

namespace aimass {

// Bool tensors: Sum and Max are logical or, Min and Product logical and (as torch); Average is rejected.
enum class ReduceOp : int { Sum = 0, Average = 1, Min = 2, Max = 3, Product = 4 };
enum class CollectiveKind : int { Allreduce = 0, Broadcast = 1, Allgather = 2, ReduceScatter = 3, Barrier = 4 };

const char* reduce_op_name(ReduceOp op);
ReduceOp parse_reduce_op(const std::string& name);  // "sum", "average", "min", "max", "product"
bool try_parse_reduce_op(std::string_view name, ReduceOp* op);  // the same names; false (no throw) for others
const char* collective_kind_name(CollectiveKind kind);

struct CollectiveRequest {
  std::string name;  // must be the same on every rank, unique among in-flight requests of a rank
  CollectiveKind kind = CollectiveKind::Allreduce;
  ReduceOp op = ReduceOp::Sum;
  DType dtype = DType::F32;
  DType wire = DType::F32;  // what travels: dtype, or F16/BF16 for a compressed F32 allreduce
  std::vector<int64_t> shape;
  int root = 0;  // broadcast
  // Caller-owned memory that must stay valid until the handle completes.
  // allreduce/broadcast write `output` (same size as input; may alias input);
  // allgather/reduce_scatter results live in the handle.
  const void* input = nullptr;
  void* output = nullptr;
  double timeout_s = 0;  // <= 0: the engine's default
  // The caller waits on the handle at once (a blocking call): a small collective on one node
  // may then run in the caller's thread through the low-latency channel (comm/ll_shm.h).
  bool blocking = false;
};

class CollectiveHandle {
 public:
  enum class ErrorKind : int { None = 0, Distributed, Closed, Value };
  bool poll() const;
  // Blocks until done; throws the request's error (DistributedError, ClosedError, ValueError).
  // Never blocks past the engine's deadline: when the engine thread makes no progress for
  // twice its timeout plus 2 s, wait() throws DistributedError without completing the handle.
  void wait();
  // True when the request failed while its data phase was still posted to MPI (a peer
  // died or stalled mid-transfer): MPI may still write the input/output memory later,
  // so the caller must keep it alive (aimass.dist parks it until the process exits).
  bool buffers_in_use() const;
  // allgather / reduce_scatter result (valid after wait()).
  const std::vector<int64_t>& result_shape() const { return result_shape_; }
  uint8_t* result_data() { return result_.data(); }
  DType dtype() const { return dtype_; }

 private:
  friend class CollectiveEngine;
  void finish(ErrorKind kind, const std::string& message);
  // Set by the engine: tells it a caller blocks on this handle, so the burst of
  // submissions is over and the next cycle may start at once.
  std::function<void()> on_wait_;
  // Set by the engine: returns a non-empty message when the engine stalled past its deadline.
  std::function<std::string()> watchdog_;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  bool done_ = false;
  ErrorKind error_kind_ = ErrorKind::None;
  std::string error_;
  bool buffers_in_use_ = false;
  DType dtype_ = DType::F32;
  std::vector<int64_t> result_shape_;
  // Not zero-filled (every byte is written by the collective), and large blocks are recycled
  // (result_block_*: a gather of tens of MiB into fresh pages costs more page faults than copying).
  struct NoInit : std::allocator<uint8_t> {
    template <typename U>
    struct rebind {
      using other = NoInit;
    };
    void construct(uint8_t* p) noexcept { ::new (static_cast<void*>(p)) uint8_t; }
    uint8_t* allocate(size_t n) { return static_cast<uint8_t*>(result_block_get(n)); }
    void deallocate(uint8_t* p, size_t n) noexcept { result_block_put(p, n); }
  };
  std::vector<uint8_t, NoInit> result_;

 public:
  // Result memory of n bytes, not zero-filled: a recycled block of exactly n bytes when one was
  // put back (blocks of 1 MiB or more, at most 4 and 512 MiB kept), else fresh. Also the lean
  // lane's allgather / reduce_scatter results (csrc/bind_comm.cc), so that a repeated blocking
  // gather reuses pages already faulted in, as the engine's results do. put: give it back (the
  // same n).
  static void* result_block_get(size_t n);
  static void result_block_put(void* p, size_t n) noexcept;
  // The same in shared host buffers (aimass/shared_host.h) that the local peers map: the lean lane's
  // allgather results, which the peers then write their rows into with plain stores (comm/fast_path.cc).
  // From 1 MiB a block of its own (recycled as above, by size class); from 32 KiB to 1 MiB a power-of-two
  // block of a shared 2 MiB slab (at most 32 MiB of slabs per process, kept), so that the peers map a slab
  // once. nullptr under 32 KiB, past the slabs, or when no shared memory could be made (the caller takes
  // ordinary memory). A forked child gets private copies of every such block (its writes stay its own, as
  // with any other array).
  static void* shared_result_block_get(size_t n);
  static void shared_result_block_put(void* p) noexcept;
};

struct EngineOptions {
  size_t fusion_threshold = 64u << 20;  // bytes per fused buffer (0: no fusion)
  double cycle_time_s = 0.001;         // negotiation period
  double timeout_s = 60;               // default per-request stall timeout, and dead-peer timeout
  size_t cache_capacity = 4096;        // response-cache entries (one bit each in the steady-state vector)
  // Low-latency channel (comm/ll_shm.h): blocking collectives of at most ll_max_bytes per rank on
  // one node run in the caller's thread (0 disables); an attempt that waits ll_fallback_s goes to
  // the engine. from_env reads AIMASS_LL_MAX_BYTES and AIMASS_LL_FALLBACK_MS (milliseconds).
  size_t ll_max_bytes = 1u << 20;  // measured: the channel beats the engine up to ~1 MiB (docs/comm.md)
  double ll_fallback_s = 0.05;
  // Blocking allreduces above the channel's slot and up to ll_push_max_bytes run in the caller's
  // thread too, single copy (comm/ll_push.cc: claimed pieces read from the peers' inputs,
  // reduced in the L2 and pushed into every rank's output) where the kernel lets the ranks read
  // and write each other's memory; larger ones (or 0: all) go to the engine. Agreed across ranks
  // at start-up (the smallest wins). AIMASS_LL_PUSH_MAX_BYTES.
  size_t ll_push_max_bytes = size_t(1) << 30;
  // Blocking allgathers of equal parts whose result is at least this large are pushed (each rank writes
  // its rows into every rank's result) rather than pulled; a rank whose bound differs posts nothing and
  // every rank pulls (comm/fast_path.cc). AIMASS_LL_GATHER_PUSH_MIN_BYTES.
  size_t ll_gather_push_min_bytes = size_t(128) << 20;
  // The caller-thread hierarchical allreduce (two nodes) runs its node steps through staging buffers up to
  // this many bytes (comm/hier_fast.cc; 0: never; a rank whose bound differs posts no buffer at the sizes
  // between, and every rank then reads through the kernel). AIMASS_HIER_STAGE.
  size_t hier_stage_max_bytes = size_t(2) << 20;
  // Hierarchical path: allreduces of at least shm_min_bytes go through a small shared-memory
  // segment on each node in chunks of shm_chunk_bytes (each local rank reduces its slice of a
  // chunk with SIMD straight from its own input; slices are allreduced across nodes with MPI);
  // smaller ones use MPI_Allreduce.
  bool shm = true;
  size_t shm_min_bytes = 4u << 10;  // measured: below ~4 KiB both paths cost the same
  size_t shm_chunk_bytes = 512u << 10;  // the segment's slot: the largest chunk (table chunks are clamped to it)
  // Per-size algorithm table over the built-in one (comm/algorithms.h; docs/comm.md), e.g.
  // "allreduce=0:shm@256k,8m:shm@1m;broadcast=0:mpi,16k:shm". Every rank must give the same.
  std::string algorithms;
  // Reads AIMASS_COMM_TIMEOUT (s), AIMASS_FUSION_THRESHOLD (bytes), AIMASS_CYCLE_TIME (ms),
  // AIMASS_SHM (0 disables), AIMASS_SHM_MIN_BYTES, AIMASS_SHM_CHUNK_BYTES, AIMASS_COMM_ALGOS.
  static EngineOptions from_env();
};

struct EngineStats {
  uint64_t cycles = 0;          // negotiation rounds (one bit-vector allreduce each)
  uint64_t full_rounds = 0;     // rounds that also gathered requests at the coordinator
  uint64_t cache_hits = 0;      // requests that completed through the bit vector alone
  uint64_t fused_buffers = 0;   // MPI allreduce calls issued for allreduce requests
  uint64_t fused_tensors = 0;   // allreduce requests those calls carried
  uint64_t errors = 0;          // requests failed by negotiation
  uint64_t shm_allreduces = 0;  // buffers reduced through the shared-memory path
  uint64_t shm_voted = 0;       // of those, staged or single-copy as the ranks' timing vote chose
  uint64_t shm_voted_staged = 0;  // of those, staged through the segment
  uint64_t shm_staged_lined = 0;  // staged fused batches laid out at the ranks' agreed line offset
  uint64_t shm_mapped = 0;      // single-copy allreduces reduced straight in the peers' mapped shared buffers
  uint64_t ll_collectives = 0;  // blocking collectives run in the caller's thread (low-latency channel)
  uint64_t ll_fallbacks = 0;    // low-latency attempts handed to the engine (busy/slow peer, mismatch)
  uint64_t hier_collectives = 0;  // blocking allreduces across two nodes run in the caller's thread
  uint64_t hier_fallbacks = 0;    // ... attempts handed to the engine (late/absent peer, mismatch)
  uint64_t hier_staged = 0;       // ... of hier_collectives, those whose node steps went through staging buffers
  uint64_t ll_mapped = 0;       // of ll_collectives, allreduces pushed straight in the peers' mapped shared buffers
  uint64_t ll_staged = 0;       // of ll_collectives, large allreduces run staged through the segment (not pushed)
  uint64_t ll_step_offs = 0;    // times a caller-thread wait stepped off a CPU that the awaited peer ran on
  uint64_t ll_gather_pushed = 0;  // of ll_collectives, allgathers whose ranks wrote their rows into every result
  uint64_t ll_gather_mapped = 0;  // of those, allgathers that wrote every peer's result with plain stores (shared results)
};

// A blocking collective on caller memory, described without allocation: the lean lane of the
// Python bindings (CollectiveEngine::run_fast).
struct FastCollective {
  CollectiveKind kind = CollectiveKind::Allreduce;
  ReduceOp op = ReduceOp::Sum;
  DType dtype = DType::F32;
  int root = 0;  // broadcast
  std::string_view name;
  const int64_t* shape = nullptr;
  int ndim = 0;
  const void* input = nullptr;
  // allreduce / broadcast: the result (as large as the input; may alias it). allgather /
  // reduce_scatter: memory for the result, `capacity` bytes; when the result has another size
  // (ranks gathering different row counts) run_fast asks `alloc(alloc_ctx, bytes)` for it.
  void* output = nullptr;
  size_t capacity = 0;
  void* (*alloc)(void* ctx, size_t bytes) = nullptr;
  void* alloc_ctx = nullptr;
  int64_t result_rows = 0;  // set by run_fast: dimension 0 of an allgather / reduce_scatter result
  // set by run_fast when it threw after the peers were allowed to write `output` (a single-copy
  // allreduce): a peer that is only late may still write it, so the caller must keep it alive
  bool peers_may_write = false;
};

class CollectiveEngine {
 public:
  // Starts the background thread. Collective: every rank of `comm` constructs one.
  CollectiveEngine(std::shared_ptr<Communicator> comm, EngineOptions options);
  ~CollectiveEngine();
  CollectiveEngine(const CollectiveEngine&) = delete;
  CollectiveEngine& operator=(const CollectiveEngine&) = delete;

  // Validates and queues; throws ValueError/TypeError for bad arguments and
  // DistributedError/ClosedError when the engine cannot run it.
  std::shared_ptr<CollectiveHandle> submit(CollectiveRequest request);
  // Collective: waits (up to the timeout) until every rank asked to stop,
  // fails what is still pending with ClosedError and joins the thread.
  // Returns true when all ranks stopped together (the communicator may then be freed).
  // Once the engine failed (a peer died or stalled) it returns false at once; it
  // never blocks longer than the timeout plus a second (a stuck thread is detached).
  bool shutdown();
  // The caller-thread fast path alone (comm/fast_path.cc): true when `c` ran in this thread
  // through the low-latency channel. false: nothing ran, and the caller must submit the same
  // collective (blocking = false: the channel was tried already) and wait, as its peers may have
  // handed an aborted attempt to their engines. Arguments the engine would refuse give false too
  // (submit() then raises). No allocation, no handle: a steady-state call costs the exchange.
  bool run_fast(FastCollective& c);
  // The engine failed (a peer died or stalled): every later submit raises DistributedError.
  // MPI requests may still be posted, so collective MPI teardown must be skipped.
  bool broken() const;

  void set_fusion_threshold(size_t bytes);
  void set_cycle_time(double seconds);
  // Size from which allreduces take the shared-memory path (SIZE_MAX: never).
  void set_shm_min_bytes(size_t bytes);
  // Largest blocking collective (bytes per rank) for the caller-thread low-latency channel
  // (0: never; at most the slot size fixed at start-up, ll_slot_bytes()).
  void set_ll_max_bytes(size_t bytes);
  size_t ll_slot_bytes() const;  // 0 when the channel does not exist (several nodes, AIMASS_LL_MAX_BYTES=0)
  // Whether the caller-thread channel writes into peers' results that live in shared host buffers with
  // plain stores (its allgather: results from CollectiveHandle::shared_result_block_get); every rank alike.
  bool ll_maps_peers() const;
  // Whether the shared-memory segment exists (every rank agreed at start-up).
  bool shm_available() const;
  // Whether the shared-memory allreduce reduces buffers that live in shared host buffers
  // (aimass/shared_host.h: aimass.dist's gradient buckets) with loads and stores in every local peer's
  // mapping (every local rank could map the others' at init; the same on every rank). False across nodes:
  // the hierarchical paths read and write the node's peers through the kernel, where private memory
  // (huge pages) moves faster than a shared buffer's 4 KiB pages.
  bool shm_maps_peers() const;
  // The algorithm table in use (canonical text; every rank's is the same).
  std::string algorithms() const;
  EngineOptions options() const;
  EngineStats stats() const;
  const Communicator& communicator() const { return *comm_; }

 private:
  struct Impl;
  std::shared_ptr<Communicator> comm_;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aimass
