// The collective engine's state (internal to the comm area). Its methods live by concern:
// engine.cc (lifecycle, the background loop, the shared-memory glue), controller.cc
// (negotiation and the response cache), fusion.cc (the data phase: fusion and unpacking),
// mpi_transport.cc (MPI collectives); wire messages in message.h.
#pragma once
#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <condition_variable>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <sstream>
#include <string>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>
#include <vector>

#include "aimass/collectives.h"
#include "aimass/comm.h"
#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "aimass/memory.h"
#include "aimass/shared_host.h"
#include "comm/algorithms.h"
#include "comm/ll_shm.h"
#include "comm/message.h"
#include "comm/mpi_transport.h"
#include "comm/shm_allreduce.h"
#include "comm/way_timings.h"

namespace aimass {

namespace comm {
// The two-node exchange of the hierarchical allreduce's cross step (cross_node.cc): data's n elements
// allreduced with the other rank of the two-rank communicator cc (me: this rank's rank in it) by
// point-to-point messages of `tag`; `buf` receives the peer's part (it must outlive a failed call:
// a receive may stay posted into it); `wait` waits for one request with the caller's deadline.
void cross_pair_allreduce(MPI_Comm cc, int tag, int me, std::vector<char>& buf, void* data, int64_t n, DType wire,
                          ReduceOp op, const std::function<void(MPI_Request*, const char*)>& wait);
}  // namespace comm

using Clock = std::chrono::steady_clock;
using comm::kMaxChunk;
using comm::mpi_type;
using comm::numel_of;
using comm::Reader;
using comm::signature;
using comm::Writer;

inline double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

// Wakes the background thread: submissions, a caller blocking on a handle (flush), stop.
// Shared with the handles, which may outlive the engine.
// Also the engine's liveness, which the handles' watchdog reads.
struct EngineWaker {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t submitted = 0;
  // The thread is collecting a burst of submissions: it looks again every burst gap by itself, so
  // a submission does not wake it (waking it for each of a backward pass's 161 gradients cost a
  // context switch per submission on a loaded 2-core machine).
  bool gathering = false;
  bool flush = false;
  bool stop = false;
  bool exited = false;  // the background thread left run() (under mu; exited_cv notified)
  std::condition_variable exited_cv;
  std::atomic<int64_t> beat{0};  // steady_clock ns: the thread's last sign of progress
  std::atomic<double> timeout_s{60};
  std::atomic<bool> stalled{false};
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
  }
  void pulse() { beat.store(now_ns(), std::memory_order_relaxed); }
  // Every wait of the thread is bounded by the timeout and beats while it waits, so a
  // beat older than 2 x timeout + 2 s means the thread is stuck where no deadline reaches.
  std::string stall_message() {
    const double t = timeout_s.load(std::memory_order_relaxed);
    const double age = static_cast<double>(now_ns() - beat.load(std::memory_order_relaxed)) * 1e-9;
    // generous: one MPI_Test may reduce a whole large buffer on a loaded machine
    if (age <= 2 * t + 2.0) {
      std::lock_guard<std::mutex> lk(mu);
      if (!exited) return std::string();
      return "aimass.dist: the collective engine stopped before this collective finished (internal error)";
    }
    stalled.store(true);
    note_peer_failure();
    return detail::concat("aimass.dist: the collective engine made no progress for ", age,
                          " s (timeout ", t, " s): a peer rank has died or stopped calling aimass");
  }
  void notify(bool* flag) {
    {
      std::lock_guard<std::mutex> lk(mu);
      *flag = true;
    }
    cv.notify_one();
  }
};

struct CollectiveEngine::Impl {
  struct Pending {
    CollectiveRequest req;
    std::string sig;
    std::shared_ptr<CollectiveHandle> handle;
    Clock::time_point submitted;
    bool reported = false;
  };
  struct CacheEntry {
    std::string name;
    std::string sig;
  };
  struct TableEntry {  // coordinator only
    std::vector<std::string> sigs;  // per rank; empty = not submitted yet
    int count = 0;
    double timeout_s = 0;
    Clock::time_point first_seen;
    uint64_t seq = 0;
  };
  struct Response {
    bool ok;
    std::string name;
    std::string error;
  };

  std::shared_ptr<Communicator> comm;
  MPI_Comm mpi;
  int rank, size;

  // shared with callers
  mutable std::mutex mu;
  EngineOptions opts;
  std::vector<Pending> incoming;
  std::unordered_set<std::string> inflight;  // names submitted and not finished
  std::unordered_map<std::string, std::pair<std::string, Clock::time_point>> poisoned;  // name -> error, when
  std::string broken;  // set once the engine cannot run anything
  bool stop_requested = false;
  bool running = false;
  bool clean_exit = false;
  EngineStats st;

  // background thread only
  std::thread thread;
  std::map<std::string, Pending> pending;  // by name
  std::vector<CacheEntry> cache;
  std::unordered_map<std::string, size_t> cache_index;
  bool table_nonempty = false;
  std::unordered_map<std::string, TableEntry> table;
  uint64_t table_seq = 0;
  // The fusion buffer (compressed or MPI-path batches): huge pages from 2 MiB (AlignedBuffer), since
  // the single-copy path's process_vm_readv / _writev walk a peer's buffer page by page and a
  // 4 KiB-page buffer costs about twice as much there. Grown in whole huge pages, never shrunk.
  AlignedBuffer fusion;
  char* fusion_bytes(size_t need) { return grow_huge(fusion, need); }
  // Buffers handed to non-blocking MPI calls. After a timeout the request stays posted
  // (MPI cannot cancel a collective), so they live as long as the Impl, which is then
  // never freed (see ~CollectiveEngine).
  std::vector<uint64_t> neg_bits;
  Writer neg_w, neg_out;
  int neg_len = 0, neg_out_len = 0;
  std::vector<int> neg_lens, neg_displs, ag_counts, ag_displs;
  std::vector<char> neg_all;
  int64_t ag_mine = 0;
  std::vector<int64_t> ag_rows;
  bool posted_on_failure = false;  // a wait gave up with its MPI request still posted
  MPI_Op half_ops[2][4] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                           {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
  Clock::time_point stop_since;
  double cycle_s = 0.001;  // snapshot of opts.cycle_time_s for this cycle
  size_t shm_min_agreed = SIZE_MAX;  // BAND of every rank's shm_min_bytes this cycle

  std::shared_ptr<EngineWaker> waker = std::make_shared<EngineWaker>();
  uint64_t submissions_seen = 0;  // background thread only
  // Background thread only: negotiation rounds run, and whether every rank agreed in the last one
  // that nobody had work (with the low-latency channel: the engines then park, see wait_for_work).
  uint64_t rounds_done = 0;
  bool parked = false;
  // The caller-thread path found a peer dead or stopped (a failed read, a reader that never
  // finished): `broken` holds its message and the background thread leaves at its next wait.
  std::atomic<bool> fast_broke{false};

  // ---- shared-memory path (one segment per node; see comm/shm_allreduce.h)
  std::unique_ptr<comm::ShmAllreduce> shm;
  bool shm_ok = false;
  comm::AlgoTable algos;  // agreed by every rank at start-up (shm_init)
  // Allreduces on one node: staged or single-copy by timing (vote_bits, engine.cc). On (agreed at
  // start-up) when every rank of the machine has a CPU and no table names allreduce.
  bool ar_vote = false;
  static constexpr int kVoteClasses = 8;
  static constexpr uint64_t kVoteExplore = 32;
  static constexpr double kVoteMargin = 1.1;  // staged only where every rank finds it this much faster (vote_bits)
  // seconds per byte per way and size class (way_timings.h); each way's first two runs replace the average
  comm::WayTimings<kVoteClasses> ar_timings{2};
  uint64_t ar_votes_agreed = 0;  // this cycle's BAND of every rank's vote_bits()
  // This cycle's agreed line offset of the staged layout (line_offset_code; -1: none, segments packed).
  int ar_line_offset = -1;
  uint64_t line_offset_code() const;
  // This cycle's allreduces all live in the ranks' shared host buffers (every rank's pending ones, BAND in
  // the round): they take the single-copy path, which reduces them in the peers' mappings, without the vote.
  bool ar_cycle_mapped = false;
  bool pending_all_mapped() const;
  uint64_t ar_runs = 0;          // voted data phases so far (the same sequence on every rank)
  static int vote_class(uint64_t bytes);
  uint64_t vote_bits() const;
  // The shared-memory algorithm for a non-allreduce collective of `bytes` bytes on one node.
  bool shm_for(comm::AlgoKind kind, uint64_t bytes) {
    if (!shm_ok || comm->cross_size() != 1) return false;
    const comm::AlgoChoice c = algos.pick(kind, bytes);
    if (c.shm) shm_prepare(c);
    return c.shm;
  }
  void shm_prepare(const comm::AlgoChoice& c) {  // the deadline, heartbeat, chunk and copy mode of the next call
    shm->set_chunk(c.chunk);
    shm->use_cma(c.cma);
    shm->set_timeout(opts.timeout_s);
    shm->set_heartbeat(&waker->beat);
  }

  // ---- low-latency path: blocking small collectives in the caller's thread (fast_path.cc)
  std::unique_ptr<comm::LLChannel> ll;
  std::mutex fast_mu;  // one caller thread in the channel at a time (others use the engine)
  void ll_init();
  void ll_publish_busy() {  // under mu, after inflight changes
    if (ll) ll->set_busy(inflight.size());
    if (hier) hier->ch->set_busy(inflight.size());
  }
  bool try_fast(const CollectiveRequest& r, CollectiveHandle& h);
  bool fast(FastCollective& c);  // the caller-thread path itself (fast_path.cc)
  // r as a FastCollective whose allgather / reduce_scatter result goes into h (try_fast, try_alone)
  FastCollective fast_of(const CollectiveRequest& r, CollectiveHandle& h);
  void finish_fast(const CollectiveRequest& r, const FastCollective& c, CollectiveHandle& h);
  // One rank (size == 1): the collective done in the caller's thread, blocking or not (fast_path.cc).
  // false: the engine is closed or broken, and submit() reports it as before.
  bool try_alone(const CollectiveRequest& r, CollectiveHandle& h);
  bool alone(FastCollective& c, DType wire);
  // push: a large allreduce (staged or the push); gather_push: an allgather whose ranks write their rows
  // into every rank's posted result (see fast())
  void fast_data(FastCollective& c, size_t nbytes, double deadline, bool push, bool gather_push);
  size_t ll_push_max = 0;  // the agreed single-copy allreduce bound (0: off; fixed after ll_init)
  // blocking broadcasts larger than this are posted by address in the eager stream (the root's
  // choice alone: receivers follow the entry; AIMASS_LL_EAGER_COPY_MAX_BYTES, fixed after ll_init)
  size_t eager_copy_max = 0;
  std::atomic<uint64_t> ll_collectives{0}, ll_fallbacks{0};  // (stats: counted without taking mu)
  std::atomic<uint64_t> ll_mapped{0};
  std::atomic<uint64_t> ll_staged{0};  // of ll_collectives, large allreduces run staged (the vote, or forced)
  std::atomic<uint64_t> ll_gather_pushed{0}, ll_gather_mapped{0};
  // Eager broadcasts (ll_shm.h): the stream's turn of a blocking broadcast, and the settling every
  // other collective of this rank does first (one caller thread in the stream at a time).
  std::mutex eager_mu;
  // Only the thread that started the engine takes turns in the stream: broadcasts from other
  // threads (which may interleave differently on each rank) keep the name-matched paths.
  const std::thread::id eager_thread = std::this_thread::get_id();
  bool eager_broadcast(FastCollective& c, size_t nbytes);
  void eager_settle();
  void eager_settle_or_break(double deadline, uint64_t lag);
  void fast_path_broke(const char* what);  // a peer found dead or stopped: the engine is broken

  // ---- caller-thread hierarchical allreduce: blocking allreduces across two nodes (hier_fast.cc)
  struct Hier {
    std::unique_ptr<Communicator> local;  // this node's ranks
    std::unique_ptr<comm::LLChannel> ch;  // the node's channel (agreement, addresses, phase words)
    MPI_Comm xc = MPI_COMM_NULL;          // a duplicate of the cross communicator (headers and slices)
    bool pair = false;                    // local rank 0: takes part in the cross-node agreement
    std::mutex call_mu;                   // one caller thread on the path at a time
    // the pair's agreement state, shared with the engine thread (which answers a peer that gave up
    // waiting while this rank's caller is elsewhere; see hier_fast.cc)
    std::mutex mu;
    uint64_t calls = 0;       // eligible blocking allreduces so far: the id of the pair's attempts
    struct Posted {
      uint64_t type, hash;
      bool ok;
    };
    std::map<uint64_t, Posted> peer;  // what the peer posted for ids this rank has not settled yet
    uint64_t giveup = 0;      // the last id the peer gave up waiting for
    uint64_t cancelled = 0;   // the last id this rank's engine answered CANCEL for
    int timeouts = 0;         // attempts in a row settled by a window that passed in vain
    std::atomic<bool> off{false};  // the path is off for good on this rank (see kHierMaxTimeouts)
    std::vector<char> tmp, xbuf;  // the caller's scratch: the peers' pieces, the cross step's receive
    // this rank's staging buffer (hier_data's staged node steps), posted for allreduces of up to stage_max
    // bytes (EngineOptions::hier_stage_max_bytes; 0: never, also once a buffer could not be had)
    std::unique_ptr<SharedHostBuffer> stage;
    // staging buffers outgrown but perhaps still read by a local peer finishing the last call (through the
    // kernel at their addresses): freed once an exchange completes, as every local peer then left that call
    std::vector<std::unique_ptr<SharedHostBuffer>> retired;
    size_t stage_max = 0;
    bool stage_map = true;  // read the peers' staging buffers in mappings (AIMASS_HIER_STAGE_MAP=0: through the kernel)
  };
  std::unique_ptr<Hier> hier;
  std::atomic<uint64_t> hier_collectives{0}, hier_fallbacks{0}, hier_staged{0};
  void hier_init();
  // A blocking allreduce in the caller's thread: true when done here, false when it goes to the engine.
  bool hier_allreduce(FastCollective& c);
  // sent: runs once the header is sent (the staged copy-in, while the other node's header is on its way)
  bool hier_pair_step(Hier& h, uint64_t id, uint64_t hash, bool local_ok, double fallback, double deadline,
                      const std::function<void()>& sent);
  bool hier_peer_step(Hier& h, uint64_t id, uint64_t hash, bool local_ok, double deadline,
                      const std::function<void()>& sent);
  void hier_stage_in(Hier& h, const FastCollective& c, int64_t n);
  void hier_pump(Hier& h, uint64_t keep_from);
  void hier_send(Hier& h, uint64_t type, uint64_t id, uint64_t hash, uint64_t flag);
  // staged: every local rank posted a staging buffer in the completed exchange (and copied its input in)
  void hier_data(Hier& h, FastCollective& c, int64_t n, double deadline, bool staged);
  void hier_engine_answer();  // local rank 0's engine thread, every cycle (and every nap while parked)

  // ---- parked engines across nodes (engine.cc: park_init, wait_for_work). With the hierarchical
  // path (two nodes, its node channel hier->ch) idle engines park as on one node: no rounds, no MPI
  // traffic. A rank that leaves posts the round in its node's channel (its node peers see it) and sends
  // WAKE(epoch, round) to every rank of the other node on wake_comm; a parked engine drains that
  // communicator at each nap (MPI_Iprobe: local, no message) and joins a round past its last one; wakes
  // for rounds already run, or from an earlier engine (another epoch), are discarded.
  MPI_Comm wake_comm = MPI_COMM_NULL;  // a duplicate of mpi: wake messages only
  std::vector<int> wake_peers;         // the ranks (of mpi) on the other node(s)
  uint64_t wake_epoch = 0;             // agreed at park_init: the same on every rank, new per engine
  uint64_t wake_out[2] = {0, 0};       // the send buffer (epoch, round)
  Clock::duration park_nap{};          // a parked engine's nap across nodes (park_init; at least the cycle time)
  void park_init();
  comm::LLChannel* park_channel() const { return ll ? ll.get() : hier ? hier->ch.get() : nullptr; }
  bool park_round_wanted();     // the parked engine's look (without the waker's lock held)
  void park_leave(bool own);    // posts the round about to run (and sends the wakes when this rank's own)








  // With several nodes the next tick counts from the end of the last cycle, not its start. Counted
  // from the start, a data phase longer than the cycle time (a hierarchical allreduce of 1 MiB on a
  // busy machine) was followed at once by a tick round, before the caller could submit its next
  // collective: that round went without this rank's request, its peers (whose callers had
  // submitted) found nothing ready, and the call needed a second round of every rank. Measured
  // (4 ranks as 2 x 2, loaded 2-core VM): 1.7-2.1 rounds per blocking allreduce before, 1.02-1.14
  // after. On one node the low-latency channel parks idle engines instead (wait_for_work).
  bool tick_from_end = false;

  double timeout_of(const CollectiveRequest& r) const { return r.timeout_s > 0 ? r.timeout_s : opts.timeout_s; }

  Impl(std::shared_ptr<Communicator> c, EngineOptions o);
  void shm_init();
  bool use_shm(int64_t count, DType wire) const;
  void shm_allreduce_segments(std::vector<comm::ShmSegment> segs, int64_t count, DType wire, ReduceOp op);
  void shm_allreduce(void* data, int64_t count, DType wire, ReduceOp op);
  // The hierarchical allreduce's cross-node step of one slice (cross_node.cc); cross_buf receives
  // the peer node's slice.
  void cross_allreduce(void* data, int64_t n, DType wire, ReduceOp op);
  std::vector<char> cross_buf;
  ~Impl();
  void wait_req(MPI_Request* req, double spin_s, const char* what);
  void finish(Pending& p, CollectiveHandle::ErrorKind kind, const std::string& msg);
  MPI_Op mpi_op(DType wire, ReduceOp op);
  void wait_for_work(Clock::time_point last);
  void run();
  void fail_all(CollectiveHandle::ErrorKind kind, const std::string& msg);
  bool cycle_once();
  void full_round(std::vector<std::string>& ready);
  std::string describe(const std::string& name, const TableEntry& e, const std::string& headline);
  void execute(const std::vector<std::string>& ready, size_t threshold);
  void execute_work(const std::vector<std::string>& ready, size_t threshold, std::vector<Pending>& work);
  void allreduce_inplace(void* data, int64_t count, DType wire, ReduceOp op);
  void unpack(Pending& p, const void* src);
  void allreduce_batch(const std::vector<Pending*>& batch);
  // A data phase's allreduces that completed, finished (handles released) only at the end of the phase
  // when finish_at_end: on a rank whose caller and engine thread share a core, a caller woken after the
  // first fused batch ran its synchronize() calls beside the next batch's data phase, taking CPU time
  // from it (and a staged run's peers wait for this rank at every chunk). Background thread only.
  bool finish_at_end = false;
  std::vector<Pending*> finished_ok;
  void done_ok(Pending& p);
  void flush_finished();
  void run_single(Pending& p);
};

}  // namespace aimass
