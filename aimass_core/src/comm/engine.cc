// The collective engine: lifecycle, the background loop (wait for work, then one
// negotiation round and the data phase it makes ready, per cycle; controller.cc and
// fusion.cc), the shared-memory glue, and the public API (see aimass/collectives.h).
#include <sched.h>
#include <sys/prctl.h>

#include "comm/cpu_share.h"
#include "comm/engine_impl.h"

namespace aimass {

namespace {
constexpr int kWakeTag = 0x41c8;
std::atomic<uint64_t> g_engine_epochs{0};  // engines made in this process (the wake messages' epoch)
}  // namespace


CollectiveEngine::Impl::Impl(std::shared_ptr<Communicator> c, EngineOptions o) : comm(std::move(c)), opts(o) {
  mpi = comm->comm();
  rank = comm->rank();
  size = comm->size();
  comm::create_half_ops(half_ops);
  shm_init();
  ll_init();
  hier_init();  // (hier_fast.cc)
  park_init();
  tick_from_end = comm->cross_size() > 1;
  // each rank runs a caller and this engine thread: more of them than CPUs (2 ranks on 2 cores)
  const comm::CpuShare share = comm::cpu_share(comm->local_size());
  finish_at_end = share.cpus > 0 && 2 * share.ranks > share.cpus;
}

// Collective over the communicator (runs before the thread starts): every
// rank must agree, since the path changes which MPI calls are made.
void CollectiveEngine::Impl::shm_init() {
  // Allreduces on one node pick staged or single-copy by timing (vote_bits) when every rank of the
  // machine has a CPU and no table names allreduce. Agreed (MIN) so every rank runs the same protocol.
  {
    const comm::CpuShare share = comm::cpu_share(comm->local_size());  // (cpu_share.h: the one such decision)
    int vote = share.cpus > 0 && !share.oversubscribed() && opts.algorithms.find("allreduce") == std::string::npos
                   ? 1
                   : 0;
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, &vote, 1, MPI_INT, MPI_MIN, mpi, &req), "MPI_Iallreduce(vote)");
    wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
    ar_vote = vote != 0;
  }
  // every rank must choose algorithms alike: the tables must be equal (compared by hash)
  std::string bad;
  try {
    algos = comm::AlgoTable::parse(opts.algorithms);
  } catch (const std::exception& e) {
    bad = e.what();
  }
  const uint64_t h = bad.empty() ? comm::fnv1a64(algos.str()) : 0;
  uint64_t agree[2] = {h, ~h};  // MIN of h and of ~h: every rank's h is equal iff agree == {h, ~h}
  int want = opts.shm ? 1 : 0;
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, agree, 2, MPI_UINT64_T, MPI_MIN, mpi, &req), "MPI_Iallreduce(algorithms)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  if (!bad.empty()) throw ValueError(bad);
  if (agree[0] != h || agree[1] != ~h)
    throw ValueError("aimass.dist.init(): AIMASS_COMM_ALGOS (or the tuning profile's comm_algos) differs between "
                     "ranks; every rank must use the same algorithm table");
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, &want, 1, MPI_INT, MPI_MIN, mpi, &req), "MPI_Iallreduce(shm)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  if (!want) return;
  shm = std::make_unique<comm::ShmAllreduce>(*comm, opts.shm_chunk_bytes, opts.timeout_s);
  shm_ok = shm->available();
  if (!shm_ok) shm.reset();
}

bool CollectiveEngine::Impl::use_shm(int64_t count, DType wire) const {
  if (!shm_ok) return false;
  const uint64_t bytes = static_cast<uint64_t>(count) * dtype_size(wire);
  return bytes >= shm_min_agreed && algos.pick(comm::AlgoKind::Allreduce, bytes).shm;
}

// Allreduce of the concatenation of segs through the node's shared memory; with
// several nodes each reduced slice is allreduced across nodes over MPI.
void CollectiveEngine::Impl::shm_allreduce_segments(std::vector<comm::ShmSegment> segs, int64_t count, DType wire,
                                                    ReduceOp op) {
  {
    std::lock_guard<std::mutex> lk(mu);
    ++st.shm_allreduces;
  }
  std::function<void(void*, int64_t)> cross;
  if (comm->cross_size() > 1) {
    cross = [&](void* data, int64_t n) { cross_allreduce(data, n, wire, op); };  // (cross_node.cc)
  }
  const uint64_t bytes = static_cast<uint64_t>(count) * dtype_size(wire);
  comm::AlgoChoice c = algos.pick(comm::AlgoKind::Allreduce, bytes);
  // staged or single-copy as every rank voted in this cycle's negotiation (vote_bits), the other way
  // every kVoteExplore-th run so that both timings stay current (ar_runs is alike on every rank)
  // (a cycle of allreduces in shared host buffers on every rank: single copy, reduced in the peers' mappings)
  const bool mapped = ar_cycle_mapped && !cross && c.shm && shm->maps_peers();
  if (mapped) c.cma = true;
  const bool voted = ar_vote && !cross && c.shm && shm->cma_available() && !mapped;
  const int cls = vote_class(bytes);
  bool staged = false;
  if (voted) {
    const bool explore = ++ar_runs % kVoteExplore == 0;
    staged = (((ar_votes_agreed >> cls) & 1) != 0) != explore;
    c.cma = !staged;
    std::lock_guard<std::mutex> lk(mu);
    ++st.shm_voted;
    if (staged) ++st.shm_voted_staged;
  }
  // Staged on one node: each tensor sits in the staging layout at the line offset every rank agreed in
  // this cycle (line_offset_code, controller.cc). The single-copy path reads the tensors where they are
  // (it ignores the pads; ShmAllreduce::run stages a batch whose address table outgrows a slot); across
  // nodes the slices go over MPI as laid out, so they stay packed.
  const bool lined = !cross && ar_line_offset >= 0;
  if (lined) comm::shm_line_pads(segs, dtype_size(wire), ar_line_offset);
  shm_prepare(c);
  if (lined && shm->stages(segs.size(), false)) {
    std::lock_guard<std::mutex> lk(mu);
    ++st.shm_staged_lined;
  }
  const auto t0 = Clock::now();
  try {
    shm->run(segs, count, wire, op, size, cross);
    if (shm->last_run_mapped()) {
      std::lock_guard<std::mutex> lk(mu);
      ++st.shm_mapped;
    }
    if (voted && bytes > 0) {
      const double spb = seconds_between(t0, Clock::now()) / static_cast<double>(bytes);
      // the first run of a way pays for cold pages and caches: the second replaces it (ar_timings{2})
      ar_timings.note(staged ? ar_timings.kStaged : ar_timings.kSingleCopy, cls, spb);
    }
  } catch (...) {
    // a peer that is only late may still push its reduced slices into these outputs: park them
    if (shm->peers_write_outputs()) posted_on_failure = true;
    throw;
  }
}

int CollectiveEngine::Impl::vote_class(uint64_t bytes) {
  int c = 0;  // < 256 KiB, then one class per factor of 4
  for (uint64_t b = bytes >> 18; b != 0 && c + 1 < kVoteClasses; b >>= 2) ++c;
  return c;
}

// Bit c: this rank prefers the staged allreduce for size class c. Ways timed less than twice are
// tried first (staged, then single-copy); then staged only when clearly faster, as the low-latency channel's
// vote (ll_push.cc): it waits at every chunk for a rank that is descheduled, where the single-copy
// push hands that rank's pieces to the others. Measured (2 ranks, ResNet-50's 161 gradients fused,
// loaded VM, ranks at real-time priority): staged 12.4 ms against 17.2 ms single-copy while both ranks
// ran, but 56-62 ms against 16-17 ms while the machine's other load took CPU time from them.
// The margin is 1.1 (the channel's vote keeps 1.25): under contention staged loses by 3-4x, far past
// any margin, while on a quiet machine (session 13, normal scheduling) staged forced took the step in
// 0.64x per-tensor MPI's time and single-copy forced in 0.74x, yet the vote at 1.25 chose single-copy
// (0.72x): staged was only ~1.17x faster per byte.
uint64_t CollectiveEngine::Impl::vote_bits() const {
  uint64_t v = 0;
  for (int c = 0; c < kVoteClasses; ++c)
    if (ar_timings.prefers_staged(c, kVoteMargin)) v |= uint64_t(1) << c;
  return v;
}

void CollectiveEngine::Impl::shm_allreduce(void* data, int64_t count, DType wire, ReduceOp op) {
  shm_allreduce_segments({{static_cast<const char*>(data), static_cast<char*>(data), count, false}}, count, wire,
                         op);
}

CollectiveEngine::Impl::~Impl() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  if (wake_comm != MPI_COMM_NULL && broken.empty()) {
    uint64_t m[2];  // stale wakes (the peers' last leave): received, so none outlives the communicator
    int flag = 1;
    MPI_Status st;
    while (MPI_Iprobe(MPI_ANY_SOURCE, kWakeTag, wake_comm, &flag, &st) == MPI_SUCCESS && flag)
      MPI_Recv(m, 2, MPI_UINT64_T, st.MPI_SOURCE, kWakeTag, wake_comm, MPI_STATUS_IGNORE);
    MPI_Comm_free(&wake_comm);  // (after a failure it is abandoned, as the engine's own communicators)
  }
  if (hier) {
    if (broken.empty()) {
      MPI_Comm_free(&hier->xc);
    } else {
      hier->local->abandon();  // (as the engine's own communicators after a failure)
    }
  }
  comm::free_half_ops(half_ops);
}

// wait_mpi with the engine's deadline; the wait beats the engine's heartbeat.
void CollectiveEngine::Impl::wait_req(MPI_Request* req, double spin_s, const char* what) {
  try {
    wait_mpi(req, spin_s, opts.timeout_s, what, &waker->beat);
  } catch (...) {
    posted_on_failure = true;
    throw;
  }
}

void CollectiveEngine::Impl::finish(Pending& p, CollectiveHandle::ErrorKind kind, const std::string& msg) {
  {
    std::lock_guard<std::mutex> lk(mu);
    inflight.erase(p.req.name);
    ll_publish_busy();
    if (kind == CollectiveHandle::ErrorKind::Distributed) ++st.errors;
  }
  p.handle->finish(kind, msg);
}

// -------------------------------------------------------------- parked engines across nodes
// Collective over the communicator (before the thread starts). Only with the hierarchical path's node
// channel (its existence is agreed on every rank); AIMASS_PARK_ACROSS_NODES=0 on any rank: the engines
// tick every cycle as before. The epoch is agreed too (MAX), so a wake of an earlier engine whose
// communicator's id MPI reuses is never taken for this one's.
void CollectiveEngine::Impl::park_init() {
  if (ll || !hier) return;
  int64_t v[2] = {0, static_cast<int64_t>(g_engine_epochs.load() + 1)};
  if (const char* e = std::getenv("AIMASS_PARK_ACROSS_NODES")) v[0] = std::strcmp(e, "0") == 0 ? 1 : 0;
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, v, 2, MPI_INT64_T, MPI_MAX, mpi, &req), "MPI_Iallreduce(park)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  g_engine_epochs.store(static_cast<uint64_t>(v[1]));
  if (v[0] != 0) return;  // (every rank alike)
  // Parked naps across nodes: a fifth of the fallback window (10 ms by default; local rank 0 answers a
  // GIVEUP well within the window), at least the cycle time. A round only waits that long for a parked
  // peer that has no work (a peer with work leaves at its submission); AIMASS_PARK_NAP_MS overrides.
  double nap_s = std::min(0.01, opts.ll_fallback_s / 5);
  if (const char* e = std::getenv("AIMASS_PARK_NAP_MS")) nap_s = std::max(0.0, std::atof(e)) * 1e-3;
  park_nap = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(nap_s));
  // the other node's ranks: those of mpi that are not in this node's communicator
  MPI_Group all, mine;
  check_mpi(MPI_Comm_group(mpi, &all), "MPI_Comm_group");
  check_mpi(MPI_Comm_group(comm->local_comm(), &mine), "MPI_Comm_group(local)");
  const int L = comm->local_size();
  std::vector<int> lr(static_cast<size_t>(L)), wr(static_cast<size_t>(L));
  for (int i = 0; i < L; ++i) lr[static_cast<size_t>(i)] = i;
  check_mpi(MPI_Group_translate_ranks(mine, L, lr.data(), all, wr.data()), "MPI_Group_translate_ranks");
  MPI_Group_free(&mine);
  MPI_Group_free(&all);
  std::vector<char> local(static_cast<size_t>(size), 0);
  for (int r : wr)
    if (r >= 0 && r < size) local[static_cast<size_t>(r)] = 1;
  for (int r = 0; r < size; ++r)
    if (!local[static_cast<size_t>(r)]) wake_peers.push_back(r);
  check_mpi(MPI_Comm_dup(mpi, &wake_comm), "MPI_Comm_dup(wake)");
  MPI_Comm_set_errhandler(wake_comm, MPI_ERRORS_RETURN);
  wake_epoch = static_cast<uint64_t>(v[1]);
}

// Whether some rank left the park for a round past the last one run here: its node peer posted it in
// the node's channel, or a rank of the other node sent a wake (every wake is received here, the stale
// ones discarded). Local rank 0 of a hierarchical node also answers the other node's GIVEUP while parked,
// within the fallback window (hier_fast.cc).
bool CollectiveEngine::Impl::park_round_wanted() {
  if (hier && hier->pair) hier_engine_answer();
  bool wanted = park_channel()->round_wanted(rounds_done);
  if (wake_comm == MPI_COMM_NULL) return wanted;
  uint64_t m[2];
  int flag = 0;
  MPI_Status st;
  while (true) {
    check_mpi(MPI_Iprobe(MPI_ANY_SOURCE, kWakeTag, wake_comm, &flag, &st), "MPI_Iprobe(wake)");
    if (!flag) return wanted;
    check_mpi(MPI_Recv(m, 2, MPI_UINT64_T, st.MPI_SOURCE, kWakeTag, wake_comm, MPI_STATUS_IGNORE), "MPI_Recv(wake)");
    if (m[0] == wake_epoch && m[1] > rounds_done) wanted = true;
  }
}

// Leaving the park for round rounds_done + 1: posted in the node's channel; a rank that leaves for its own
// work (a submission, a flush, stop) also sends it to the other node's ranks (small messages: they
// complete at once, bounded by the engine timeout like every wait of this thread).
void CollectiveEngine::Impl::park_leave(bool own) {
  park_channel()->want_round(rounds_done + 1);
  if (!own || wake_comm == MPI_COMM_NULL) return;
  wake_out[0] = wake_epoch;
  wake_out[1] = rounds_done + 1;
  for (int r : wake_peers) {
    MPI_Request req;
    check_mpi(MPI_Isend(wake_out, 2, MPI_UINT64_T, r, kWakeTag, wake_comm, &req), "MPI_Isend(wake)");
    wait_req(&req, 1e-3, "a wake message");
  }
}

// -------------------------------------------------------------- the loop
// Sleeps until the next tick (cycle time after the last cycle began: idle ranks still
// join every negotiation round in time; with several nodes after it ended: tick_from_end) or until
// something is submitted (parked: until some rank has work, below). A submission
// starts a cycle once the caller has been quiet for kBurstGap (a burst such as a backward
// pass's gradients is negotiated and fused together), at the latest one cycle time after
// the first: a lone blocking allreduce no longer waits for the tick.
void CollectiveEngine::Impl::wait_for_work(Clock::time_point last) {
  constexpr auto kBurstGap = std::chrono::microseconds(40);
  Clock::duration cycle;
  {
    std::lock_guard<std::mutex> lk(mu);
    cycle = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts.cycle_time_s));
  }
  EngineWaker& w = *waker;
  std::unique_lock<std::mutex> lk(w.mu);
  auto woken = [&] { return w.submitted != submissions_seen || w.flush || w.stop; };
  if (parked) {
    // Every rank agreed in the last round that nobody had work: no rounds (no MPI, no thread
    // spinning next to the callers' fast path) until some rank has some. The first to leave posts
    // the round it runs in its node's low-latency segment (and, across nodes, sends it to the other
    // node's ranks); the others see it within a nap (a cycle time; across nodes park_nap) and join,
    // so the rounds still match across ranks. Waits beat the heartbeat.
    bool own = false;
    while (!(own = woken())) {
      lk.unlock();  // (the look may make MPI calls: submitters must not wait for them)
      const bool wanted = park_round_wanted();
      lk.lock();
      if (wanted) {
        own = woken();
        break;
      }
      w.cv.wait_for(lk, wake_comm != MPI_COMM_NULL ? std::max(cycle, park_nap) : cycle);
      w.pulse();
    }
    if (fast_broke.load()) return;  // run() leaves (announcing would start a round nobody finishes)
    lk.unlock();
    park_leave(own);
    lk.lock();
    if (!own) {
      submissions_seen = w.submitted;
      w.flush = w.stop = false;
      return;
    }
  }
  if (parked || w.cv.wait_until(lk, last + cycle, woken)) {
    const auto deadline = Clock::now() + cycle;
    uint64_t seen = w.submitted;
    w.gathering = true;  // submissions do not notify: the loop looks every gap
    while (!w.flush && !w.stop && Clock::now() < deadline) {
      w.cv.wait_for(lk, kBurstGap, [&] { return w.flush || w.stop; });
      if (w.submitted == seen) break;  // quiet for a gap: the burst is over
      seen = w.submitted;
    }
    w.gathering = false;
  }
  submissions_seen = w.submitted;
  w.flush = w.stop = false;  // one early cycle each (Impl::stop_requested keeps the stop state)
}

void CollectiveEngine::Impl::run() {
#ifdef PR_SET_TIMERSLACK
  prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // 1 us: the burst gap is tens of us (default slack: 50 us)
#endif
  try {
    auto last = Clock::now();
    while (true) {
      waker->pulse();
      wait_for_work(last);
      waker->pulse();
      if (fast_broke.load()) {
        std::lock_guard<std::mutex> lk(mu);
        throw DistributedError(broken);
      }
      last = Clock::now();
      if (cycle_once()) break;
      if (tick_from_end) last = Clock::now();
    }
    fail_all(CollectiveHandle::ErrorKind::Closed, "aimass.dist was shut down before this collective ran");
    std::lock_guard<std::mutex> lk(mu);
    clean_exit = true;
  } catch (const std::exception& e) {
    std::string msg = e.what();
    {
      std::lock_guard<std::mutex> lk(mu);
      broken = msg;
    }
    fail_all(CollectiveHandle::ErrorKind::Distributed, msg);
    note_peer_failure();  // MPI_Finalize may now block: bound it
  }
  {
    std::lock_guard<std::mutex> lk(mu);
    running = false;
  }
  {
    std::lock_guard<std::mutex> lk(waker->mu);
    waker->exited = true;
  }
  waker->exited_cv.notify_all();
}

void CollectiveEngine::Impl::fail_all(CollectiveHandle::ErrorKind kind, const std::string& msg) {
  std::vector<Pending> rest;
  {
    std::lock_guard<std::mutex> lk(mu);
    for (auto& p : incoming) rest.push_back(std::move(p));
    incoming.clear();
  }
  for (auto& kv : pending) rest.push_back(std::move(kv.second));
  pending.clear();
  for (auto& p : rest) finish(p, kind, msg);
}

CollectiveEngine::CollectiveEngine(std::shared_ptr<Communicator> comm, EngineOptions options)
    : comm_(std::move(comm)) {
  AIMASS_CHECK(comm_ != nullptr, ValueError, "CollectiveEngine needs a communicator");
  AIMASS_CHECK(options.timeout_s > 0, ValueError, "timeout must be > 0 seconds, got ", options.timeout_s);
  AIMASS_CHECK(options.cycle_time_s > 0, ValueError, "cycle time must be > 0, got ", options.cycle_time_s);
  impl_ = std::make_unique<Impl>(comm_, options);
  impl_->waker->timeout_s = options.timeout_s;
  impl_->waker->pulse();
  impl_->running = true;
  impl_->thread = std::thread([this] { impl_->run(); });
}

CollectiveEngine::~CollectiveEngine() {
  if (impl_->thread.joinable()) {
    shutdown();
  }
  if (impl_->posted_on_failure || impl_->thread.joinable()) {
    // MPI requests are still posted on buffers the Impl owns (or its thread is stuck):
    // leak it rather than let MPI write freed memory. Only after a peer failed.
    impl_.release();
  }
}

bool CollectiveEngine::broken() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return !impl_->broken.empty() || impl_->waker->stalled.load();
}

bool CollectiveEngine::shutdown() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (!impl_->stop_requested) {
      impl_->stop_requested = true;
      impl_->stop_since = Clock::now();
    }
  }
  impl_->waker->notify(&impl_->waker->stop);
  if (impl_->thread.joinable()) {
    // The thread gives up by itself within the timeout (every wait has the deadline); wait a
    // second more, then leave a stuck thread behind instead of blocking the process's exit.
    EngineWaker& w = *impl_->waker;
    std::unique_lock<std::mutex> lk(w.mu);
    const auto limit = std::chrono::duration<double>(impl_->opts.timeout_s + 2.0);
    const bool exited = w.exited_cv.wait_for(lk, limit, [&] { return w.exited; });
    lk.unlock();
    if (exited) {
      impl_->thread.join();
    } else {
      w.stalled = true;
      impl_->thread.detach();
      std::lock_guard<std::mutex> g(impl_->mu);
      if (impl_->broken.empty()) impl_->broken = "the collective engine did not stop within the timeout";
      return false;
    }
  }
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->clean_exit;
}

std::shared_ptr<CollectiveHandle> CollectiveEngine::submit(CollectiveRequest r) {
  AIMASS_CHECK(!r.name.empty(), ValueError, "collective name must not be empty");
  AIMASS_CHECK(!(r.dtype == DType::Bool && r.op == ReduceOp::Average &&
                 (r.kind == CollectiveKind::Allreduce || r.kind == CollectiveKind::ReduceScatter)),
               TypeError, collective_kind_name(r.kind), " '", r.name,
               "': the average of bool tensors is not defined; use op 'sum' (logical or) or 'min' (logical and), "
               "or convert to a number type first");
  for (int64_t d : r.shape) AIMASS_CHECK(d >= 0, ValueError, "'", r.name, "': negative dimension in shape");
  const int64_t n = numel_of(r.shape);
  if (r.kind != CollectiveKind::Barrier) {
    AIMASS_CHECK(n == 0 || r.input != nullptr, ValueError, "'", r.name, "': input is null");
  }
  if (r.wire != r.dtype) {
    AIMASS_CHECK(r.kind == CollectiveKind::Allreduce, ValueError, "'", r.name,
                 "': compression applies to allreduce only");
    AIMASS_CHECK(r.dtype == DType::F32 && (r.wire == DType::F16 || r.wire == DType::BF16), TypeError, "'", r.name,
                 "': compression to ", dtype_name(r.wire), " applies to float32 tensors, got ", dtype_name(r.dtype));
  }
  switch (r.kind) {
    case CollectiveKind::Allreduce:
      AIMASS_CHECK(n == 0 || r.output != nullptr, ValueError, "'", r.name, "': output is null");
      break;
    case CollectiveKind::Broadcast:
      AIMASS_CHECK(r.root >= 0 && r.root < comm_->size(), ValueError, "broadcast '", r.name, "': root=", r.root,
                   " is not a rank of this communicator (size ", comm_->size(), ")");
      AIMASS_CHECK(n == 0 || r.output != nullptr, ValueError, "'", r.name, "': output is null");
      break;
    case CollectiveKind::ReduceScatter:
      AIMASS_CHECK(!r.shape.empty(), ValueError, "reduce_scatter '", r.name,
                   "': the tensor needs at least one dimension (split along dimension 0)");
      AIMASS_CHECK(n * static_cast<int64_t>(dtype_size(r.dtype)) < INT_MAX, ValueError, "reduce_scatter '", r.name,
                   "': tensors over 2 GiB are not supported; split it");
      break;
    case CollectiveKind::Allgather:
      AIMASS_CHECK(n * static_cast<int64_t>(dtype_size(r.dtype)) < INT_MAX, ValueError, "allgather '", r.name,
                   "': tensors over 2 GiB are not supported; split it");
      break;
    case CollectiveKind::Barrier: break;
  }
  if (r.kind == CollectiveKind::Barrier || r.kind == CollectiveKind::Broadcast ||
      r.kind == CollectiveKind::Allgather) {
    r.op = ReduceOp::Sum;  // not part of these collectives' agreement
  }
  auto handle = std::make_shared<CollectiveHandle>();
  handle->dtype_ = r.dtype;
  if (impl_->size == 1 && impl_->try_alone(r, *handle)) return handle;  // one rank (fast_path.cc)
  impl_->eager_settle();  // this rank's eager broadcasts first (raises a mismatch a peer reported)
  if (r.blocking && impl_->try_fast(r, *handle)) return handle;  // done in this thread (fast_path.cc)
  handle->on_wait_ = [w = impl_->waker] { w->notify(&w->flush); };
  handle->watchdog_ = [w = impl_->waker] { return w->stall_message(); };
  Impl::Pending p;
  p.sig = signature(r);
  p.handle = handle;
  p.submitted = Clock::now();
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (!impl_->broken.empty()) throw DistributedError("aimass.dist cannot run collectives any more: " + impl_->broken);
    if (impl_->waker->stalled.load())
      throw DistributedError("aimass.dist cannot run collectives any more: the engine stalled (a peer rank died "
                             "or stopped)");
    if (impl_->stop_requested || !impl_->running) throw ClosedError("aimass.dist was shut down; call init() again");
    auto pz = impl_->poisoned.find(r.name);
    if (pz != impl_->poisoned.end()) {
      const bool fresh = seconds_between(pz->second.second, Clock::now()) < impl_->opts.timeout_s;
      std::string msg = pz->second.first;
      impl_->poisoned.erase(pz);
      if (fresh) throw DistributedError(msg);
    }
    AIMASS_CHECK(impl_->inflight.insert(r.name).second, ValueError, "a collective named '", r.name,
                 "' is already in flight on this rank; synchronize it first or use another name");
    impl_->ll_publish_busy();
    p.req = std::move(r);
    impl_->incoming.push_back(std::move(p));
  }
  {
    EngineWaker& w = *impl_->waker;
    bool wake;
    {
      std::lock_guard<std::mutex> lk(w.mu);
      ++w.submitted;
      wake = !w.gathering;
    }
    if (wake) w.cv.notify_one();
  }
  return handle;
}

void CollectiveEngine::set_fusion_threshold(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.fusion_threshold = bytes;
}

void CollectiveEngine::set_cycle_time(double seconds) {
  AIMASS_CHECK(seconds > 0, ValueError, "cycle time must be > 0 seconds, got ", seconds);
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.cycle_time_s = seconds;
}

void CollectiveEngine::set_shm_min_bytes(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.shm_min_bytes = bytes;
}

bool CollectiveEngine::shm_available() const { return impl_->shm_ok; }

bool CollectiveEngine::shm_maps_peers() const {
  // (across nodes, 2 x 2 ranks on the 2-vCPU VM, ResNet-50's 97.5 MiB of gradients as bucket views: one
  // bucket 71 ms in shared buckets against 50.5 ms in private huge pages, 25 MiB buckets 86 / 71 ms)
  return impl_->shm_ok && impl_->shm->maps_peers() && impl_->comm->cross_size() == 1;
}

std::string CollectiveEngine::algorithms() const { return impl_->algos.str(); }

EngineOptions CollectiveEngine::options() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->opts;
}

EngineStats CollectiveEngine::stats() const {
  EngineStats s;
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    s = impl_->st;
  }
  s.ll_collectives = impl_->ll_collectives.load(std::memory_order_relaxed);
  s.ll_mapped = impl_->ll_mapped.load(std::memory_order_relaxed);
  s.ll_staged = impl_->ll_staged.load(std::memory_order_relaxed);
  if (impl_->ll) s.ll_step_offs = impl_->ll->step_offs();
  s.ll_gather_pushed = impl_->ll_gather_pushed.load(std::memory_order_relaxed);
  s.ll_gather_mapped = impl_->ll_gather_mapped.load(std::memory_order_relaxed);
  s.ll_fallbacks = impl_->ll_fallbacks.load(std::memory_order_relaxed);
  s.hier_collectives = impl_->hier_collectives.load(std::memory_order_relaxed);
  s.hier_fallbacks = impl_->hier_fallbacks.load(std::memory_order_relaxed);
  s.hier_staged = impl_->hier_staged.load(std::memory_order_relaxed);
  return s;
}

}  // namespace aimass
