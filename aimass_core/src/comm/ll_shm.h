// Low-latency shared-memory channel for small collectives on one node (internal to the comm area).
//
// The caller's thread runs a small collective here instead of handing it to the engine's
// background thread: no negotiation round over MPI, no thread wake-up, no syscall. Ranks
// agree through one atomic "step" word in a shared segment:
//
//   step = attempt << 16 | aborted << 15 | arrival mask (one bit per rank, at most 15 ranks)
//
// A rank writes its slot (header: attempt, op-signature hash, payload bytes, rows; then the
// payload) and arrives by setting its bit with a CAS (release: the slot is visible to
// whoever sees the bit). When the mask is full the attempt is complete and every rank reads
// every slot (same bytes on every rank, so every rank reduces in the same rank order and
// gets bitwise the same result). Two slots per rank (attempt parity) let the next attempt
// start while slow peers still read the last one; a writer waits until no peer still reads
// the attempt two back (each rank posts the attempt it reads).
//
// The channel is optimistic: it never raises on disagreement. An attempt is aborted (CAS of
// the aborted bit, so it is either complete on every rank or aborted on every rank) when
//   * an arrived peer's signature hash differs from this rank's (a mismatch, or ranks that
//     run blocking collectives in different orders from several threads),
//   * a peer that has not arrived has had requests in its background engine for a grace period
//     of 1 ms (it runs this collective through the engine, or waits there for something this
//     rank has not sent yet; a shorter spell is a peer finishing its last engine collective),
//   * the wait passed the fallback window (a slow, stopped or dead peer).
// Every rank of an aborted attempt then submits its request to the engine, whose
// negotiation matches by name, reports mismatches (DistributedError naming what each rank
// submitted) and applies the full deadline. A late rank that finds the attempt aborted
// starts a new one, sees its peers' engines busy and falls back too.
//
// Single copy (broadcast and allgather of kCmaMin bytes or more, where the kernel allows
// process_vm_readv between the ranks): a rank posts the address of its input instead of copying
// it into its slot, its peers read it from there straight into their outputs (read()), and the
// rank returns only after every peer finished reading (wait_readers(), bounded by the deadline).
// One copy instead of two, and no freshly written shared lines bouncing between cores.
//
// The segment is POSIX shared memory created by rank 0 and unlinked once every rank mapped
// it; it exists only when every rank of the communicator is on one node.
#pragma once
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "aimass/collectives.h"
#include "aimass/comm.h"

namespace aimass {
namespace comm {

// Reads AIMASS_LL_MAX_BYTES (bytes per rank, 0 disables) and AIMASS_LL_FALLBACK_MS into o.
void ll_options_from_env(EngineOptions& o);
// What must agree across ranks for the channel (name, kind, dtype, op, root, shape; an
// allgather's first dimension is free), hashed (FNV-1a).
uint64_t ll_signature_hash(CollectiveKind kind, DType dtype, DType wire, ReduceOp op, int root,
                           std::string_view name, const int64_t* shape, int ndim);

class LLChannel {
 public:
  using Clock = std::chrono::steady_clock;
  static constexpr int kMaxRanks = 15;

  // Collective over comm.comm(). available() is false (on every rank alike) when the ranks
  // span several nodes, are more than kMaxRanks, slot_bytes is 0, or a segment cannot be made.
  LLChannel(const Communicator& comm, size_t slot_bytes, double timeout_s);
  // Attaches to caller-owned, zero-filled, 128-byte-aligned memory of segment_bytes(size,
  // slot_bytes) bytes shared by the ranks (threads or processes); used by the unit tests.
  LLChannel(int rank, int size, void* memory, size_t slot_bytes);
  ~LLChannel();
  LLChannel(const LLChannel&) = delete;
  LLChannel& operator=(const LLChannel&) = delete;
  static size_t segment_bytes(int size, size_t slot_bytes);

  bool available() const { return base_ != nullptr; }
  size_t slot_bytes() const { return slot_bytes_; }
  int rank() const { return rank_; }
  int size() const { return size_; }

  // This rank's engine has n requests submitted and not finished (peers fall back while > 0).
  void set_busy(uint64_t n) { ctl(rank_)->busy.store(n, std::memory_order_seq_cst); }
  // Parked engines (every rank agreed in negotiation round r that nobody had work): the rank that
  // leaves first posts r + 1, its peers see it and join that round (see Impl::wait_for_work).
  void want_round(uint64_t r) { ctl(rank_)->want_round.store(r, std::memory_order_seq_cst); }
  bool round_wanted(uint64_t done) const {
    for (int j = 0; j < size_; ++j)
      if (j != rank_ && ctl(j)->want_round.load(std::memory_order_seq_cst) > done) return true;
    return false;
  }

  enum class Result { Complete, Fallback };
  static constexpr size_t kCmaMin = 16u << 10;
  // Posts this rank's slot (hash, `bytes` of payload from `data`, `rows`) and waits for the
  // attempt to complete or abort (see above); `fallback_s` bounds the wait. On Complete the
  // caller reads the peers' slots (read(), bytes(), rows()) and must call done().
  // by_address: a payload of kCmaMin bytes or more stays in `data` (single copy, see above; the
  // caller then calls wait_readers() after done() before it may change `data`).
  Result exchange(uint64_t hash, const void* data, size_t bytes, int64_t rows, double fallback_s,
                  bool by_address = false);
  // Copies bytes [offset, offset + n) of rank j's payload in the completed attempt to dst
  // (from its slot, or from its process); DistributedError when that process is gone.
  void read(int j, size_t offset, void* dst, size_t n) const;
  // Rank j's payload in its slot; nullptr when it posted its address instead (use read()).
  const char* payload(int j) const { return slot(j, attempt_)->addr ? nullptr : slot(j, attempt_)->data(); }
  // After done(): when this rank posted by address, waits until no peer still reads it; false
  // when one still did after deadline_s seconds (it died or stopped mid-read).
  bool wait_readers(double deadline_s) const;
  bool cma_available() const { return cma_ok_; }
  void allow_cma_for_tests() { cma_ok_ = true; }  // threads as ranks: one process reads itself
  size_t bytes(int j) const { return slot(j, attempt_)->bytes; }
  int64_t rows(int j) const { return slot(j, attempt_)->rows; }
  void done();  // this rank finished reading the completed attempt's slots

 private:
  struct alignas(128) Control {          // one line per rank
    std::atomic<uint64_t> reading;       // attempt + 1 whose slots this rank reads (0: none)
    std::atomic<uint64_t> busy;          // requests in this rank's engine
    std::atomic<int64_t> cpu;            // the CPU this rank last arrived from (sched_getcpu)
    std::atomic<int64_t> pid;            // this rank's process (single copy: process_vm_readv)
    std::atomic<uint64_t> probe;         // the address of its probe word (start-up check)
    std::atomic<uint64_t> want_round;    // the negotiation round its parked engine left to run
  };
  struct alignas(128) Header {
    uint64_t attempt;
    uint64_t hash;
    uint64_t bytes;
    int64_t rows;
    uint64_t addr;  // nonzero: the payload stays at this address in the writer's process
    char* data() { return reinterpret_cast<char*>(this) + 128; }
    const char* data() const { return reinterpret_cast<const char*>(this) + 128; }
  };
  // Outcomes of recent attempts (attempt << 1 | aborted), written by whoever starts the next
  // attempt before it does: a member that missed its attempt's closed state reads it here.
  static constexpr int kOutcomes = 64;
  static constexpr size_t kHeadBytes = 128 + kOutcomes * 8;
  static constexpr uint64_t kAborted = uint64_t(1) << 15;
  static constexpr uint64_t kMaskBits = (uint64_t(1) << 15) - 1;

  std::atomic<uint64_t>& step() const { return *reinterpret_cast<std::atomic<uint64_t>*>(base_); }
  std::atomic<uint64_t>& outcome(uint64_t attempt) const {
    return reinterpret_cast<std::atomic<uint64_t>*>(base_ + 128)[attempt % kOutcomes];
  }
  Control* ctl(int j) const { return reinterpret_cast<Control*>(base_ + kHeadBytes) + j; }
  Header* slot(int j, uint64_t attempt) const {
    return reinterpret_cast<Header*>(base_ + kHeadBytes + 128 * static_cast<size_t>(size_) +
                                     (static_cast<size_t>(j) * 2 + attempt % 2) * (128 + slot_bytes_));
  }
  bool closed(uint64_t w) const { return (w & kAborted) || (w & kMaskBits) == full_; }
  void attach(void* memory, size_t slot_bytes);

  int rank_ = 0, size_ = 1;
  uint64_t full_ = 0;
  size_t slot_bytes_ = 0;
  char* base_ = nullptr;
  size_t map_bytes_ = 0;
  bool owned_ = false;
  uint64_t attempt_ = 0;  // the attempt of the last exchange
  bool by_address_ = false;  // the last exchange posted this rank's payload by address
  bool cma_ok_ = false;      // every rank can read every other's memory (probed at start-up)
  uint64_t probe_ = 0;       // read by the peers' start-up probe
  uint64_t exchanges_ = 0;   // exchanges so far (the CPU check runs every 16th)
  bool spin_ = true;         // spin before yielding (no peer seen arriving from this CPU)
};

}  // namespace comm
}  // namespace aimass
