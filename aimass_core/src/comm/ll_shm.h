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
// Two ranks: a rank that posted its slot for an attempt arrives in it (it leaves one only after taking
// the post back while the attempt was not yet open), and of two ranks only the one already waiting could
// abort it. So the waiting
// rank completes as soon as the peer's slot shows the attempt (`posted`, written last: data and flag
// arrive in one line), without waiting for the peer's arrival in the step word; a rank whose next
// exchange finds the step still open at the attempt it completed that way waits for that arrival first
// (and after the fallback window takes back what it posted and falls back). And a rank whose last
// exchange completed posts its slot for the next attempt before it touches the step word, then swaps
// the step expecting it closed (one transfer of the step's line instead of a read and then a swap).
// The late rank's critical path is one cache-line transfer shorter on each side.
//
// Single copy (broadcast and allgather of kCmaMin bytes or more, where the kernel allows
// process_vm_readv between the ranks): a rank posts the address of its input instead of copying
// it into its slot, its peers read it from there straight into their outputs (read()), and the
// rank returns only after every peer finished reading (wait_readers(), bounded by the deadline).
// One copy instead of two, and no freshly written shared lines bouncing between cores.
//
// Eager broadcast (ll_eager.cc): a blocking broadcast of at most eager_max() bytes does not wait
// for its receivers, as MPI's eager protocol does not. The broadcasts of the channel form one
// stream (every rank counts its blocking broadcasts); entry s of a kRing-entry ring holds the s-th:
//   * the root writes signature hash, description and payload, then publishes the entry with a
//     CAS of its state word (s, root, posted) and returns;
//   * a receiver waits for entry s, checks the signature, copies the payload out. A signature
//     that differs raises DistributedError on that receiver at once (naming both sides) and is
//     posted in its control line, so every other rank raises it at its next collective;
//   * a receiver that finds entry s still empty while the root's engine stays busy (the root runs
//     this broadcast through its engine) or after the fallback window claims it instead (CAS to
//     (s, claimer, normal)); a root that wants to post eagerly but finds the entry claimed, or that
//     does not post eagerly (too large, channel off), takes the normal path (the channel's
//     attempts, or the engine and its negotiation) with the claimers. A claim for another
//     signature (a receiver that went to its engine for a broadcast its root ran there) is
//     skipped: the stream stays aligned.
// Every rank acknowledges each entry (its control line's `acked`), and every collective of a rank
// first waits until every rank acknowledged the entries it took part in (settle(), bounded by the
// deadline; a broadcast waits only for those kRing - 1 entries back). So a root runs at most
// kRing - 1 broadcasts ahead, the ring never overwrites an entry
// someone still reads, and a mismatch is raised by every rank, at the latest by its next collective.
//
// The segment is POSIX shared memory created by rank 0 and unlinked once every rank mapped
// it; it exists only when every rank of the communicator is on one node.
#pragma once
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include <sched.h>

#include "aimass/collectives.h"
#include "aimass/parallel.h"
#include "aimass/comm.h"
#include "aimass/dtype.h"
#include "comm/host_regions.h"
#include "comm/way_timings.h"

namespace aimass {
namespace comm {

class ShmAllreduce;  // comm/shm_allreduce.h: the staged allreduce's pipeline

// Reads AIMASS_LL_MAX_BYTES (bytes per rank, 0 disables) and AIMASS_LL_FALLBACK_MS into o.
void ll_options_from_env(EngineOptions& o);
// What must agree across ranks for the channel (name, kind, dtype, op, root, shape; an
// allgather's first dimension is free), hashed (FNV-1a).
uint64_t ll_signature_hash(CollectiveKind kind, DType dtype, DType wire, ReduceOp op, int root,
                           std::string_view name, const int64_t* shape, int ndim);

namespace ll_wait {
using aimass::cpu_relax;

// Waits: spin briefly (a peer on another core answers in well under a microsecond; no spinning
// when a peer last ran on this very CPU), then poll with a yield between looks, as Open MPI's
// shared-memory transport does when oversubscribed (tests run -np 4 on 2 cores), then sleep in
// short naps.
struct Backoff {
  static constexpr double kSpinS = 20e-6, kYieldS = 2e-3;
  uint32_t iter = 0;
  bool spin = true;  // false when a peer last ran on this CPU: spinning would only keep it off
  double waited = 0;  // seconds this wait has lasted, as of the last elapsed()
  std::chrono::steady_clock::time_point start;
  // How long this wait has lasted. The clock is read at the first look (a wait that never pauses
  // never reads it) and every 16th after, in between the last reading stands.
  double elapsed() {
    if (iter == 0) start = std::chrono::steady_clock::now();
    else if ((iter & 15) == 0) waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    return waited;
  }
  void pause(double waited_s) {
    ++iter;
    if (spin && waited_s < kSpinS) {
      cpu_relax();
    } else if (waited_s < kYieldS) {
      sched_yield();
    } else {
      std::this_thread::sleep_for(std::chrono::microseconds(20));
    }
  }
};
}  // namespace ll_wait

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
  // out: a single-copy allreduce's output (posted beside the input; see push_allreduce()).
  Result exchange(uint64_t hash, const void* data, size_t bytes, int64_t rows, double fallback_s,
                  bool by_address = false, void* out = nullptr);
  // Copies bytes [offset, offset + n) of rank j's payload in the completed attempt to dst
  // (from its slot, or from its process); DistributedError when that process is gone.
  void read(int j, size_t offset, void* dst, size_t n) const;
  // Rank j's payload in its slot; nullptr when it posted its address instead (use read()).
  const char* payload(int j) const { return slot(j, attempt_)->addr ? nullptr : slot(j, attempt_)->data(); }
  // After done(): when this rank posted by address, waits until no peer still reads it; false
  // when one still did after deadline_s seconds (it died or stopped mid-read). Peers in `lost` (bit j:
  // local rank j, known dead or stopped: a wait on it already ran out) are not waited for.
  bool wait_readers(double deadline_s, uint32_t lost = 0) const;
  bool cma_available() const { return cma_ok_; }
  // Whether every rank may also write every other's memory (process_vm_writev; probed at start-up,
  // AIMASS_SHM_CMA_PUSH=0: off): the single-copy allreduce below needs it.
  bool push_available() const { return push_ok_; }
  void allow_cma_for_tests() { cma_ok_ = push_ok_ = true; }  // threads as ranks: one process reads itself
  // Runs between this rank's post and its arrival in every exchange (a rank preempted right there: a
  // pair's peer completes from the post meanwhile); tests only.
  void set_arrival_hook_for_tests(std::function<void()> f) { arrival_hook_ = std::move(f); }
  // Whether the single-copy allreduce reduces buffers that live in the peers' shared host buffers in this
  // process's mappings of them (ShmAllreduce::maps_peers: the engine passes its agreed probe; every rank
  // alike). Needs the push.
  void set_maps_peers(bool on) { map_ok_ = on && push_ok_ && slot_bytes_ >= 2 * sizeof(RegionRef); }
  bool maps_peers() const { return map_ok_; }
  // Whether the last push_allreduce reduced its pieces straight in every rank's mapped buffers.
  bool last_push_mapped() const { return push_mapped_; }

  // ---- two ranks on one CPU (ll_shm.cc, step_off()). Measured on the 2-vCPU VM (kernel 6.18, EEVDF,
  // kernel.sched_vcpu_pack): back-to-back 2 MiB allreduces found both ranks on one vCPU for whole runs
  // of 2000 calls (sched_getcpu after every call) while the other vCPU ran nothing of ours; a waiter
  // only yields, so the load balancer never moved either, and the push's claims went 8 : 0 to the rank
  // that ran (0.46 ms a call against 0.19-0.21 with the ranks apart, same load). So a rank that waits
  // for a peer which posted this very CPU steps off it (its affinity briefly excludes the CPU; the
  // kernel migrates it at once; the mask is restored right away, nothing stays pinned). Only where the
  // machine's CPUs are not outnumbered by its ranks (comm::cpu_share) and the thread may use another CPU;
  // AIMASS_LL_STEP_OFF=0 (read at start-up) turns it off. step_offs(): how often it stepped off.
  uint64_t step_offs() const { return step_offs_.load(std::memory_order_relaxed); }
  // idle_only: step off only while no more threads are runnable on the machine than this channel's
  // ranks (/proc/loadavg), i.e. while another CPU idles: on a CPU busy with another process a
  // stepped-off rank would queue behind it for a slice, and its peer's closing wait with it (measured,
  // load 6-13: the mean call took 1.1-2.8 ms against 0.5-1.3 without the step-off)
  void set_step_off(bool on, bool idle_only = true) {
    step_off_ok_ = on;
    step_off_idle_only_ = idle_only;
  }
  // When the calling thread runs on `cpu` and may run elsewhere: moves it off (affinity without `cpu`,
  // then the old mask again) and returns the CPU it ran on meanwhile; else -1.
  static int step_off(int cpu);
  // Threads runnable on the machine now, this one included (/proc/loadavg's fourth field); -1: unknown.
  static int runnable_threads();
  bool step_off_enabled() const { return step_off_ok_; }

  // ---- single-copy allreduce (ll_push.cc), after an exchange() that posted `in` by address and
  // `out` beside it: the buffer is cut into kPushPiece pieces handed out by a claim counter in the
  // segment; whichever rank claims a piece reads it from every peer's input (process_vm_readv, into
  // an L2-sized buffer), reduces it in rank order (the same bits whoever claimed it) and writes it
  // into its own output and every peer's (process_vm_writev), so every input byte is read once and
  // every output byte written once, by one core, and a descheduled rank leaves its pieces to the
  // others. In place is safe (a piece's inputs are all read before its outputs are written, by the
  // one rank that claimed it). Then done() and wait_readers(): a rank returns once every peer
  // finished its claims, i.e. wrote its pieces into this rank's output and read this rank's input.
  // DistributedError when a peer's process is gone; a stopped one is caught by wait_readers().
  static constexpr size_t kPushPiece = 256u << 10;
  // The piece size for `bytes` over L ranks (the same on every rank): kPushPiece (L2-resident
  // steps), smaller for buffers of fewer than 4 pieces per rank so every rank gets some (whole
  // 4 KiB pages: whole lines of every element size; at least 16 KiB: a syscall per piece).
  static size_t push_piece_bytes(size_t bytes, int L) {
    const size_t want = (bytes / (4 * static_cast<size_t>(L)) + 4095) / 4096 * 4096;
    return std::min(kPushPiece, std::max<size_t>(16u << 10, want));
  }
  void push_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count);

  // ---- staged allreduce (ll_push.cc), after an exchange() like the push's: the same reduce-scatter +
  // allgather as the engine's shared-memory path (ShmAllreduce, staging rings in this segment, chunks
  // that stay in the caches, each rank reducing its slice of every chunk), run from the caller's thread.
  // Why beside the push: process_vm_readv/_writev walk the peers' pages one 4 KiB page at a time
  // (measured here: 7-12 GB/s on 4 KiB pages, 22-25 GB/s on huge pages, 40+ GB/s for memcpy from
  // the L3), and torch tensors and numpy arrays under 4 MiB have 4 KiB pages; staging copies with
  // plain loads and stores, which do not care. A peer that stops advancing or died raises
  // DistributedError at deadline_s (peers may not write this rank's output: each rank writes its own).
  void stage_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count,
                       double deadline_s);
  bool stage_available() const { return stage_ != nullptr; }
  // Whether allreduces above the slot may run here at all: the push (peers' memory writable) or the
  // staged allreduce (not turned off). Without the push every large allreduce is staged.
  bool large_available() const { return push_ok_ || (stage_ != nullptr && staged_env_ != 0); }
  // Staged or push, chosen per call. Measured here (2 ranks, same run, busbw GB/s): quiet, staged won
  // (2 MiB 21.8 against 9.0 for the push, 16 MiB torch tensors 7.8 against 4.6); with the 2 cores
  // oversubscribed by other jobs, the push won (staged 1.6-2.0 against 4.5-6.8): the staged
  // pipeline waits for every peer at every chunk, and a descheduled peer stalls it, while the push
  // lets whichever rank runs claim the pieces. So each rank times both per size class (powers of 2)
  // and posts the one it prefers (staged when 1.1x faster) in the exchange (stage_vote(), as
  // `rows`); agree_staged() combines the votes of the completed attempt (the same slots on every
  // rank, so the same decision): push when any rank prefers it, and every kExplore-th call the other
  // one, so a preference can change. AIMASS_LL_STAGED=0 / 1 (any rank's 0 wins): always push /
  // always staged; unset or "auto": as above. AIMASS_LL_STAGE_ALIGN=0: the staged run's chunks are cut
  // from element 0 whatever the buffers' offsets in their lines (see stage_lead()). (The environment is
  // read at start-up.)
  // out: this rank's output; where it sits within its cache line rides along (stage_lead()).
  int64_t stage_vote(size_t bytes, const void* out = nullptr) const;
  bool agree_staged();  // after a completed exchange; also what large_allreduce() runs
  bool staged_now() const { return staged_now_; }
  // The allreduce agree_staged() chose, timed for the vote.
  void large_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count,
                       double deadline_s);
  size_t bytes(int j) const { return slot(j, attempt_)->bytes; }
  // ---- for the caller-thread hierarchical allreduce (hier_fast.cc), after a completed exchange that
  // posted the input by address and the output beside it
  uint64_t attempt() const { return attempt_; }
  // Copies bytes [offset, offset + n) of rank j's posted output to dst (process_vm_readv).
  void read_output(int j, size_t offset, void* dst, size_t n) const;
  // The hierarchical allreduce's staging buffers: [p, p + n) inside a shared host buffer of this rank
  // (aimass/shared_host.h; nullptr: none) is posted in every later exchange() that posts an input by
  // address with an output, so that the node's peers read it in their mappings of it (plain loads: 3-4x
  // the rate of process_vm_readv on 4 KiB pages) instead of reading this rank's own buffers.
  void set_stage(const void* p, size_t n) {
    stage_p_ = p;
    stage_n_ = n;
  }
  // The staging buffer rank j posted in the completed attempt (ino 0: none; base: its address there).
  const RegionRef& posted_stage(int j) const { return posted_regions(j)[kStageRef]; }
  // Bytes [offset, offset + n) of it in this process's mapping (nullptr: it cannot be mapped here; then
  // read_stage copies them through the kernel, DistributedError when that process is gone).
  const char* map_stage(int j, size_t offset, size_t n);
  void read_stage(int j, size_t offset, void* dst, size_t n) const;
  // Whether rank j posted an output in the completed attempt; write_output copies src[0, n) to bytes
  // [offset, offset + n) of it: with plain stores where that output lives in a shared host buffer this
  // process maps (maps_peers(); returns true), else process_vm_writev (false; DistributedError when that
  // process is gone; streaming: the plain stores are non-temporal). begin_output_writes() once per collective
  // that writes outputs (the mappings' idle count).
  bool posted_output(int j) const { return slot(j, attempt_)->out != 0; }
  bool write_output(int j, size_t offset, const void* src, size_t n, bool streaming = false);
  void begin_output_writes() { peer_maps_.next_run(); }
  // Posts v (larger than anything this rank posted before) in its control line; wait_signal waits
  // until rank j's posted word is at least v and returns it, DistributedError after deadline_s.
  void signal(uint64_t v) { ctl(rank_)->signal.store(v, std::memory_order_seq_cst); }
  uint64_t wait_signal(int j, uint64_t v, double deadline_s, const char* what) const;
  int64_t rows(int j) const { return slot(j, attempt_)->rows; }
  void done();  // this rank finished reading the completed attempt's slots

  // ---- eager broadcast (ll_eager.cc; see above)
  static constexpr size_t kEagerMax = 64u << 10;  // the largest eager payload (if the slot is as large)
  static constexpr size_t kEagerDesc = 440;       // a mismatch message, NUL-terminated
  // What a rank asked for (the mismatch message names it; formatted only then).
  struct EagerSig {
    int32_t dtype = 0;  // DType
    int32_t ndim = 0;
    int32_t root = 0;
    uint32_t name_len = 0;
    int64_t shape[8] = {};  // the first 8 dimensions
    char name[192] = {};    // the first 192 bytes of the name
    void set(DType dt, int r, std::string_view nm, const int64_t* sh, int nd);
    std::string str() const;  // broadcast 'name' (float32[2, 3], root 0)
  };
  static_assert(sizeof(EagerSig) == 272, "EagerSig layout");
  size_t eager_max() const { return eager_bytes_; }
  enum class Eager { Done, Normal };  // Done: the broadcast is complete; Normal: take the normal path
  // The root's side: post=true publishes `bytes` of `data` (<= eager_max()); post=false (or an entry
  // already claimed by the receivers) returns Normal. DistributedError when another rank posted this
  // entry as root (root mismatch).
  // by_address (single copy, needs cma_available()): `data` itself is posted, any size; the receivers
  // read it with process_vm_readv, and on Done the caller must wait for their acknowledgements
  // (settle(deadline, 0)) before `data` may change, and call eager_abandon() if that wait fails.
  // `fill(sig, ctx)` writes this rank's request into a signature record (only when one is needed).
  using SigFill = void (*)(EagerSig& sig, const void* ctx);
  Eager eager_root(uint64_t hash, const void* data, size_t bytes, bool post, SigFill fill, const void* ctx,
                   bool by_address = false);
  // The root gave up waiting for the receivers of its last by-address entry: a late receiver that
  // reads it after this raises instead of returning what the buffer holds by then.
  void eager_abandon();
  // The root of a by-address entry of kHelpMin bytes or more (with push_available()), before it waits
  // for the acknowledgements: instead of only waiting, it claims pieces of each receiver that posted
  // its output and writes them there (process_vm_writev) while the receiver reads the others, so two
  // cores copy instead of one. Returns within deadline_s; DistributedError when a receiver's process
  // is gone (peer_lost()).
  static constexpr size_t kHelpMin = 32u << 10;
  static size_t help_piece_bytes(size_t bytes) {  // the same on every rank: whole pages; below 128 KiB
    if (bytes < (128u << 10)) return std::max<size_t>(16u << 10, (bytes / 2 + 4095) / 4096 * 4096);  // 2-3
    // 4-16 pieces; 64 KiB at least from 256 KiB (2 ranks, loaded: 256 KiB in 4 pieces 15.0-15.1 us in two
    // runs, in 8 of 32 KiB 16-20 us; mpi4py 21-26 us)
    const size_t want = (bytes / 8 + 4095) / 4096 * 4096;
    return std::min<size_t>(256u << 10, std::max<size_t>(bytes < (256u << 10) ? 32u << 10 : 64u << 10, want));
  }
  void eager_serve(double deadline_s);
  // The last eager_receive posted its output for the root to write (a failure may leave the root
  // writing it after the call raised: the caller keeps it alive).
  bool eager_output_posted() const { return eager_out_posted_; }
  // A receiver's side: copies the root's payload into `out` (Done), or Normal (see above).
  // DistributedError on a signature mismatch (desc: this rank's request, for the message).
  Eager eager_receive(uint64_t hash, int root, void* out, size_t bytes, SigFill fill, const void* ctx,
                      double fallback_s);
  // Waits until every rank acknowledged the broadcasts this rank took part in but the last `lag`;
  // DistributedError when one did not within deadline_s, or when one reported a mismatch in an
  // entry this rank processed (once per mismatch). Every collective but a broadcast settles with
  // lag 0; a broadcast with lag kRing - 1 (the ring's room: a root runs up to that far ahead).
  void settle(double deadline_s, uint64_t lag = 0);
  bool settled() const { return settled_ >= last_posted_ && reported_upto_ >= last_posted_; }
  static constexpr uint64_t ring_lag() { return kRing - 1; }
  // settle() gave up on a peer that never acknowledged and whose process is gone or stopped: the
  // engine is broken (a live peer that only did not take part is raised without breaking it).
  bool peer_lost() const { return peer_lost_; }
  uint64_t eager_posted() const { return eager_posted_; }

 private:
  struct alignas(128) Control {          // two lines per rank
    // first line: what the peers look at while they wait for this rank
    std::atomic<uint64_t> busy;          // requests in this rank's engine
    std::atomic<int64_t> cpu;            // the CPU this rank last arrived from (sched_getcpu)
    std::atomic<int64_t> pid;            // this rank's process (single copy: process_vm_readv)
    std::atomic<uint64_t> probe;         // the address of its probe word (start-up check)
    std::atomic<uint64_t> want_round;    // the negotiation round its parked engine left to run
    // second line: written by this rank at every arrival and done(); the peers read it only when they
    // reuse a slot without having seen the attempt before complete, or wait for a single-copy reader,
    // so a peer that polls `busy` above does not make every arrival's store a cache-line transfer
    alignas(64) std::atomic<uint64_t> reading;  // attempt + 1 whose slots this rank reads (0: none)
    // rank 0's: the claim counter of the single-copy allreduce (it only grows: every rank tracks
    // where each allreduce's claims start, push_base_)
    std::atomic<uint64_t> claims;
    // a monotonic word this rank posts for its peers (the caller-thread hierarchical allreduce's
    // phases, hier_fast.cc: signal() / wait_signal())
    std::atomic<uint64_t> signal;
  };
  static_assert(sizeof(Control) == 128, "one 128-byte control line per rank (segment_bytes)");
  static constexpr size_t kInline = 16;  // payloads up to this size live in the header's first line
  struct alignas(128) Header {
    // attempt + 1 once the slot holds this rank's request for that attempt: written last (release), so a
    // pair's waiting peer that reads it also sees the rest (0: nothing posted yet)
    std::atomic<uint64_t> posted;
    uint64_t hash;
    uint64_t bytes;
    int64_t rows;
    uint64_t addr;  // nonzero: the payload stays at this address in the writer's process
    uint64_t out;   // a single-copy allreduce: the writer's output
    // a payload of at most kInline bytes (an 8-byte allreduce): in the same line as the hash, so a
    // peer fetches one line instead of two
    alignas(16) char small[kInline];
    // a large allreduce (out != 0): when the writer arrived (steady_clock ns), in the header's second line,
    // which the payload never uses; the vote's timings start at the attempt's last arrival (large_allreduce)
    alignas(64) int64_t arrived_ns;
    // (bytes must be set first)
    char* data() { return bytes <= kInline ? small : reinterpret_cast<char*>(this) + 128; }
    const char* data() const { return bytes <= kInline ? small : reinterpret_cast<const char*>(this) + 128; }
  };
  static_assert(offsetof(Header, small) + kInline == 64, "the small payload shares the header's first line");
  static_assert(sizeof(Header) == 128, "one 128-byte header per slot");
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
  // Rank j's shared-host regions posted in the completed attempt beside a by-address payload (exchange(),
  // where map_ok_): [0] its input's, [1] its output's (ino 0: not in a shared host buffer).
  // [kStageRef]: its staging buffer (set_stage; posted whatever map_ok_, ino 0: none).
  const RegionRef* posted_regions(int j) const { return reinterpret_cast<const RegionRef*>(slot(j, attempt_)->data()); }
  static constexpr int kStageRef = 2;
  bool closed(uint64_t w) const { return (w & kAborted) || (w & kMaskBits) == full_; }
  struct alignas(128) EagerCtl {  // one per rank: 640 bytes
    std::atomic<uint64_t> acked;       // the last stream entry this rank processed (alone in its line)
    char pad0[56];
    // a receiver's single-copy broadcast of kHelpMin bytes or more: the root, which would only wait,
    // writes some of its pieces (see eager_serve)
    std::atomic<uint64_t> help;        // entry s whose output is at help_out (0: none yet)
    std::atomic<uint64_t> help_out;
    std::atomic<uint64_t> claims;      // s << 24 | pieces claimed so far (by this rank or the root)
    std::atomic<uint64_t> pushed;      // s << 24 | pieces the root finished writing
    char pad1[32];
    std::atomic<uint64_t> bad;         // the last entry whose signature did not match this rank's (0: none)
    std::atomic<uint64_t> claim_hash;  // the signature of this rank's last claim
    char pad[48];
    char desc[kEagerDesc];             // the mismatch message (valid while bad is the latest)
  };
  struct alignas(128) EagerEntry {  // header (512 bytes), then eager_bytes_ of payload
    std::atomic<uint64_t> state;  // s << 8 | writer << 2 | kind (1 posted, 2 normal)
    uint64_t hash;
    uint64_t bytes;
    int64_t root;
    std::atomic<uint64_t> addr;  // posted by address: the payload in the root's process (0: in data();
                                 // kAbandoned: the root stopped waiting for the readers)
    uint64_t sig_of;             // the signature hash whose record `sig` holds (written only when it changes)
    char pad[80];
    EagerSig sig;  // the root's request
    char pad2[112];
    char* data() { return reinterpret_cast<char*>(this) + sizeof(EagerEntry); }
  };
  static_assert(sizeof(EagerCtl) == 640 && sizeof(EagerEntry) == 512, "eager lines");
  static constexpr uint64_t kRing = 8;  // stream entries in the ring: a root runs at most kRing - 1 ahead
  char* eager_base() const {
    return base_ + kHeadBytes + 128 * static_cast<size_t>(size_) +
           static_cast<size_t>(size_) * 2 * (128 + slot_bytes_);
  }
  EagerCtl* ectl(int j) const { return reinterpret_cast<EagerCtl*>(eager_base()) + j; }
  EagerEntry* entry(uint64_t s) const {
    return reinterpret_cast<EagerEntry*>(eager_base() + sizeof(EagerCtl) * static_cast<size_t>(size_) +
                                         (s % kRing) * (sizeof(EagerEntry) + eager_bytes_));
  }
  static size_t eager_bytes_for(size_t slot_bytes) {
    return std::min(kEagerMax, (slot_bytes + 127) / 128 * 128);
  }
  static constexpr uint64_t kAbandoned = 1;  // (no payload address is 1)
  void eager_ack(uint64_t s);
  void receive_by_address(uint64_t s, int root, uint64_t addr, void* out, size_t bytes);
  [[noreturn]] void mismatch_at(uint64_t s, int other, const EagerEntry* e, SigFill fill, const void* ctx,
                                bool as_root);
  void attach(void* memory, size_t slot_bytes);
  // The staging area (ShmAllreduce's control lines and rings) follows the eager ring, page-aligned.
  static size_t stage_offset(int size, size_t slot_bytes);
  static size_t stage_chunk(int size);
  // Every 16th exchange or eager broadcast: posts this rank's CPU and sets spin_ (false when a peer last
  // ran on the same CPU: a wait then yields at once instead of spinning it away from that peer).
  void note_cpu();
  // This rank's CPU, posted for the peers (a large allreduce posts it at every arrival and at its end).
  void post_cpu() const;
  // Rank j (a peer this rank waits for) posted the CPU this thread runs on: step off it (see above).
  // Returns whether it did.
  bool step_off_from(int j) const;

  int rank_ = 0, size_ = 1;
  uint64_t full_ = 0;
  size_t slot_bytes_ = 0;
  char* base_ = nullptr;
  size_t map_bytes_ = 0;
  bool owned_ = false;
  uint64_t attempt_ = 0;  // the attempt of the last exchange
  bool by_address_ = false;  // the last exchange posted this rank's payload by address
  // the last attempt this rank saw complete (every rank arrived in it, so none still reads the
  // attempt before it: the next attempt reuses its slots without looking; UINT64_MAX: none)
  uint64_t completed_ = UINT64_MAX;
  bool last_complete_ = false;  // the last exchange completed (two ranks: the next one predicts its attempt)
  std::function<void()> arrival_hook_;  // set_arrival_hook_for_tests
  bool cma_ok_ = false;      // every rank can read every other's memory (probed at start-up)
  bool push_ok_ = false;     // ... and write it
  uint64_t push_base_ = 0;   // the claim counter's value when the next single-copy allreduce starts
  bool map_ok_ = false, push_mapped_ = false;  // set_maps_peers(), last_push_mapped()
  PeerRegions peer_maps_;   // the peers' shared host buffers mapped here (map_ok_, their staging buffers)
  const void* stage_p_ = nullptr;  // set_stage()
  size_t stage_n_ = 0;
  std::vector<char> push_tmp_;  // the peers' pieces of one claimed piece (L2-resident)
  std::unique_ptr<ShmAllreduce> stage_;  // the staged allreduce, on the segment's staging area
  // ---- the staged-or-push choice (ll_push.cc)
  static constexpr int kClasses = 48;        // size classes: floor(log2(bytes))
  static constexpr uint64_t kExplore = 32;   // every kExplore calls the large allreduce tries the other way,
  // kExploreBurst calls in a row: a lone run of the way not chosen finds its memory cold (the staged one its
  // staging area: 16 MiB, quiet, 1.4-1.6 ms alone against 1.1-1.3 ms in a row, the push 1.5-1.7 ms), so
  // with one call per exploration the incumbent kept the vote; the median of 5 keeps the warm runs
  static constexpr uint64_t kExploreBurst = 3;
  // seconds per byte per way and class (way_timings.h); mutable: the closing wait_readers() records it.
  // Three warm runs: the first run of each way in a class pays for cold pages (the staged run faults in
  // the staging area's pages, ~1 ms at 16 MiB here; the push its scratch), and the staged run's second
  // was still slow (2 MiB: 0.24, 0.15-0.32, then 0.09-0.12 ms; the push 0.6, then 0.2); each replaces
  // the record until the third; kept, they would sway the vote for many calls, since the way not chosen
  // is timed again only every kExplore-th call. With two warm runs and the 1.25 margin the bench's
  // 2 MiB row ran the push in 2 of 6 jobs (0.80-0.93x mpi4py) and its 16 MiB row in 3 of 6.
  // The median of the last 5 runs per way and class, not a moving average (see WayTimings).
  mutable WayTimings<kClasses> timings_{3, 5};
  Clock::time_point timing_{};               // when the timed large allreduce started
  mutable size_t timed_bytes_ = 0;           // its bytes (0: none being timed)
  void note_large_allreduce() const;
  int64_t vote(size_t bytes) const;          // stage_vote()'s low byte
  int64_t stage_lead(size_t es) const;       // the staged run's lead, from the attempt's votes
  uint64_t large_calls_ = 0;                 // completed large allreduces (the same count on every rank)
  bool staged_now_ = false;
  int staged_env_ = -1;                      // AIMASS_LL_STAGED: 0 never, 1 always, -1 auto
  bool stage_align_ = true;                  // AIMASS_LL_STAGE_ALIGN (not 0): post the output's line offset
  uint64_t probe_ = 0;       // read by the peers' start-up probe
  uint64_t exchanges_ = 0;   // exchanges so far (the CPU check runs every 16th)
  bool spin_ = true;         // spin before yielding (no peer seen arriving from this CPU)
  bool step_off_ok_ = false;  // AIMASS_LL_STEP_OFF and not oversubscribed (step_off_from)
  bool step_off_idle_only_ = true;
  mutable std::atomic<uint64_t> step_offs_{0};
  size_t eager_bytes_ = 0;      // eager_max()
  uint64_t eager_acked_ = 0;    // the last stream entry this rank processed (= its ectl acked)
  uint64_t settled_ = 0;        // every rank acknowledged the entries up to this one
  uint64_t reported_upto_ = 0;  // the peers' mismatches in entries up to this one were looked at
  uint64_t reported_ = 0;       // the last entry whose mismatch this rank raised
  bool peer_lost_ = false;
  uint64_t last_posted_ = 0;    // the last posted entry this rank processed (what settle() waits for)
  uint64_t posted_by_address_ = 0;  // the last entry this rank posted by address (eager_abandon)
  bool eager_out_posted_ = false;
  double timeout_s_ = 60;          // the engine timeout (bounds a receiver's wait for the root's pieces)
  uint64_t eager_posted_ = 0;   // broadcasts this rank completed eagerly (root or receiver)
};

// The end of a caller-thread data phase on `ch`: done(), then wait until no peer still reads this
// rank's slot and buffers (the peers may reuse our slot once we stop reading theirs, and our buffers
// once they stopped reading them). finish() is the normal path and says whether every peer finished
// within the deadline; a guard left armed (an exception on the way) does the same, bounded, on the
// error path, except for the peers marked lost(): a wait on them already ran out (or their process is
// gone), so the error leaves after one deadline, not two.
class ReaderRelease {
 public:
  ReaderRelease(LLChannel& ch, double deadline_s) : ch_(ch), deadline_s_(deadline_s) {}
  ReaderRelease(const ReaderRelease&) = delete;
  ReaderRelease& operator=(const ReaderRelease&) = delete;
  ~ReaderRelease() {
    if (!armed_) return;
    ch_.done();
    ch_.wait_readers(deadline_s_, lost_);
  }
  bool finish() {
    armed_ = false;
    ch_.done();
    return ch_.wait_readers(deadline_s_, lost_);
  }
  void lost(int j) { lost_ |= uint32_t(1) << j; }  // local rank j is dead or stopped
  // Where the collective's own words showed every peer done with this rank's buffers: this rank's
  // done() without the wait.
  void finish_unread() {
    armed_ = false;
    ch_.done();
  }

 private:
  LLChannel& ch_;
  double deadline_s_;
  bool armed_ = true;
  uint32_t lost_ = 0;
};

}  // namespace comm
}  // namespace aimass
