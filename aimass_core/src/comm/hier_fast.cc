// The caller-thread hierarchical allreduce: a blocking allreduce across two nodes runs in the
// caller's thread (no engine wake-up, no negotiation round over every rank), with the engine as
// fallback. Measured where a 1 MiB allreduce of 4 ranks as 2 x 2 went through the engine (normal
// scheduling, see docs/comm.md): 10-15 us to wake the engine, 100-160 us in the negotiation round,
// 5-15 us to wake the caller, of about 530 us in all.
//
// Agreement. Every rank counts its eligible calls (a blocking allreduce, no compression, of at least
// LLChannel::kCmaMin bytes: decided from the arguments alone, so ranks that make the same calls count
// alike). A call
//   1. arrives in the node's channel (LLChannel::exchange: the input and output posted by address);
//      the attempt completes on every local rank or aborts on every local rank (a local peer absent
//      past the fallback window, busy in its engine, or with another signature). A rank whose
//      engine has queued work arrives with a spoiled hash, so its node falls back at once;
//   2. local rank 0 of each node settles the call with its counterpart on the other node over MPI
//      point-to-point (a duplicate of the cross communicator), both sides alike: each sends
//      HDR(id, hash, local outcome) when it arrives and waits for the peer's message for that id;
//      both then hold the same two headers and take the same outcome: GO when both nodes completed
//      with the same signature, else CANCEL. A side whose node fell back sends its header and goes
//      on without waiting (the outcome can only be CANCEL). A side that waited past the fallback
//      window sends GIVEUP(id) and waits on (bounded by the engine timeout): the peer's engine
//      thread answers CANCEL(id) when the peer's caller has not reached that id (it runs that call
//      through the engine, or is late), and the peer's caller then falls back for that id without
//      sending a header (a mutex between the peer's caller and its engine thread: each id gets a
//      header or a CANCEL, never both). The later of the two finds the other's header waiting: one
//      message's latency, not a request and an answer. Local rank 0 checks for a CANCEL its engine
//      answered (or the path turned off) before the node's exchange and then spoils it, holding the
//      mutex from that check until its header is sent: a node whose local rank 0 sends HDR(ok) is a
//      node whose exchange completed on every rank, and one whose local rank 0 answered CANCEL is one
//      whose exchange failed on every rank. Each other local rank j settles the call the same way
//      with local rank j of the other node (HDR(id, hash, outcome) both ways, the same two outcomes and
//      signatures as local rank 0's, so the same decision; the id goes into the node's exchange, so
//      the local ranks' ids are equal), without waiting for local rank 0's word; it takes that word
//      only when its counterpart's header does not come (that node ran the call through the engine).
//      Every rank takes the same path;
//   3. GO: the data phase below; CANCEL: every rank submits the request to the engine, whose
//      negotiation matches names, raises mismatches and applies the deadlines.
// Waits past the decision (a side's for the peer's header after the window, the local ranks' for
// local rank 0's word, the data phase's) are bounded by the engine timeout and raise DistributedError (a dead or stopped
// peer; the engine is then broken). Ids that drifted apart (a rank that called a collective its
// peers never called) make every later attempt wait out the window; after kHierMaxTimeouts such
// attempts in a row a side turns the path off (its CANCELs carry the off flag), and so does every rank
// that hears of it: the engine takes every call from then on, as before this path existed.
//
// Data phase (L local ranks): each local rank reduces its slice (whole lines, as the engine's
// ShmAllreduce::run_cma) from every local input (the own input first, the peers' in 256 KiB pieces),
// allreduces it with the same slice of the other node (cross_pair_allreduce: the same two-node
// exchange as the engine's), and the node's ranks then gather the final slices. Up to hier_stage_max_bytes
// bytes through staging buffers (every rank copies the peers' parts of its input into its own shared
// buffer while its header is on its way; the peers reduce from their mappings of it, the final slices go
// through the same buffers; nobody touches another rank's own memory); larger ones through the kernel:
// the peers' inputs by process_vm_readv, then each rank writes its final slice into every local peer's
// output, posts that it did, and returns once every local peer posted the same (each then read this
// rank's input and wrote its output: nothing reads this rank's buffers after that; where the peers'
// memory is not writable, each copies the peers' final slices out and waits until they copied its own).
// The operand order is the engine's hierarchical path's, so the bits are the same on every rank and the
// same as that path's.
#include "aimass/comm_kernels.h"
#include "comm/cma.h"
#include "comm/engine_impl.h"

namespace aimass {

namespace {
constexpr int kHdrTag = 0x41c6;   // agreement messages on the duplicate cross communicator
constexpr int kDataTag = 0x41c7;  // the cross step's slices
constexpr int kHierMaxTimeouts = 3;
enum : uint64_t { kHdr = 1, kGiveUp = 2, kCancel = 4 };
struct Msg {
  uint64_t type, id, hash, flag;  // flag: HDR: the node completed its local attempt; CANCEL: path off
};
// Phase words in the node's channel, per local attempt a: a staged attempt's ranks post base + kWordIn
// once their staging buffer holds the peers' parts of their input, local rank 0 base + kWordGo or
// base + kWordCancel, every rank base + kWordFinal once its slice is final; kWordOff: the path is off.
constexpr uint64_t kWordIn = 1, kWordGo = 2, kWordCancel = 3, kWordFinal = 4;
constexpr uint64_t kWordOff = UINT64_MAX;
uint64_t word_base(uint64_t attempt) { return (attempt + 1) * 8; }
// The node's exchange carries the attempt's id, so that its local ranks agree on it
uint64_t hier_id_hash(uint64_t hash, uint64_t id) { return hash ^ (id * 0x9E3779B97F4A7C15ull); }
}  // namespace

void CollectiveEngine::Impl::hier_init() {
  // Collective over the communicator: every rank must agree whether the path exists.
  int ok = 1;
  if (const char* v = std::getenv("AIMASS_HIER_CALLER")) ok = std::strcmp(v, "0") != 0;
  if (comm->cross_size() != 2 || comm->local_size() < 2 || !shm_ok) ok = 0;
  int sizes[2] = {comm->local_size(), -comm->local_size()};  // MIN of both: equal everywhere iff -min(-x) == min(x)
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, mpi, &req), "MPI_Iallreduce(hier)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, sizes, 2, MPI_INT, MPI_MIN, mpi, &req), "MPI_Iallreduce(hier sizes)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  if (!ok || sizes[0] != -sizes[1]) return;  // (every rank alike)
  auto h = std::make_unique<Hier>();
  h->local = std::make_unique<Communicator>(comm->local_comm());  // (the node's ranks: one node, cross_size 1)
  h->ch = std::make_unique<comm::LLChannel>(*h->local, 4096, opts.timeout_s);
  int mine = h->ch->available() && h->ch->cma_available() ? 1 : 0;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, &mine, 1, MPI_INT, MPI_MIN, mpi, &req), "MPI_Iallreduce(hier channel)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  check_mpi(MPI_Comm_dup(comm->cross_comm(), &h->xc), "MPI_Comm_dup(cross)");  // (collective on every cross comm)
  MPI_Comm_set_errhandler(h->xc, MPI_ERRORS_RETURN);
  if (!mine) {
    MPI_Comm_free(&h->xc);
    return;
  }
  h->pair = comm->local_rank() == 0;
  // Staged up to opts.hier_stage_max_bytes (2 MiB by default, AIMASS_HIER_STAGE): each rank keeps a
  // staging buffer as large as the largest such allreduce. Measured on the 2-vCPU VM (4 ranks as 2 x 2,
  // alternating blocks in one job, staged against the push): 256 KiB - 2 MiB 1.17-1.32x faster, 3 MiB
  // 0.89x, 4 - 16 MiB 0.74-0.77x (numpy's arrays from 4 MiB sit on huge pages, where process_vm_readv
  // runs at 22-25 GB/s; with 4 KiB pages 4 MiB was even, 8 / 16 MiB 0.94 / 0.86x: past the caches the
  // staging copies' extra memory traffic costs more than the kernel's page walk).
  h->stage_max = opts.hier_stage_max_bytes;
  if (const char* v = std::getenv("AIMASS_HIER_STAGE_MAP")) h->stage_map = std::strcmp(v, "0") != 0;  // (tests)
  hier = std::move(h);
}

bool CollectiveEngine::Impl::hier_allreduce(FastCollective& c) {
  if (!hier || c.kind != CollectiveKind::Allreduce) return false;
  Hier& h = *hier;
  const size_t es = dtype_size(c.dtype);
  int64_t n = 1;
  for (int d = 0; d < c.ndim; ++d) n *= c.shape[d];
  const size_t nbytes = static_cast<size_t>(n) * es;
  // eligible: decided from the arguments alone (every rank making this call counts it)
  if (nbytes < comm::LLChannel::kCmaMin || c.input == nullptr || c.output == nullptr ||
      !algos.pick(comm::AlgoKind::Allreduce, nbytes).shm)  // (the agreed table: shm / cma rows only)
    return false;
  std::lock_guard<std::mutex> cl(h.call_mu);
  comm::LLChannel& ch = *h.ch;
  if (h.off.load()) {
    if (h.pair) ch.signal(kWordOff);  // (turned off by the engine thread: the node hears it now)
    return false;
  }
  double deadline, fallback;
  bool veto;
  {
    std::lock_guard<std::mutex> lk(mu);
    deadline = opts.timeout_s;
    fallback = opts.ll_fallback_s;
    if (!broken.empty() || waker->stalled.load(std::memory_order_relaxed) || stop_requested || !running)
      return false;  // the engine path raises
    if (nbytes < opts.shm_min_bytes) return false;  // (set alike on every rank: set_shm_min_bytes)
    // queued work first (and a name that failed on the other ranks): this rank still takes part, with a
    // spoiled hash, so that its peers fall back at once and the ids stay aligned
    veto = !inflight.empty() || !incoming.empty() || (!poisoned.empty() && poisoned.count(std::string(c.name)));
  }
  if (!h.pair && ch.wait_signal(0, 0, 0, "") == kWordOff) {  // local rank 0 heard the path is off
    h.off = true;
    return false;
  }
  const uint64_t hash = comm::ll_signature_hash(c.kind, c.dtype, c.dtype, c.op, 0, c.name, c.shape, c.ndim);
  // The staging buffer, posted in the exchange: grown to a power of two (at least 1 MiB) when too small;
  // none (every rank then pushes through the kernel) when off, too large, or not to be had
  if (nbytes <= h.stage_max && (!h.stage || h.stage->size() < nbytes)) {
    if (h.stage) h.retired.push_back(std::move(h.stage));  // (a peer may still copy the last call's slice out)
    size_t want = size_t(1) << 20;
    while (want < nbytes) want <<= 1;
    try {
      h.stage = std::make_unique<SharedHostBuffer>(want);
    } catch (const IOError&) {  // (no memfd or no memory: this call and later ones push)
      h.stage_max = 0;
    }
  }
  ch.set_stage(nbytes <= h.stage_max ? h.stage->data() : nullptr, nbytes);
  // the staged copy-in once the exchange completed and this rank sent its header: only where every local
  // rank posted a staging buffer (the same slots on every rank, so the same decision)
  bool staged = false;
  auto stage_in = [&] {
    for (int j = 0; j < ch.size(); ++j)
      if (ch.posted_stage(j).ino == 0) return;
    staged = true;
    hier_stage_in(h, c, n);
  };
  // Every local rank numbers its attempts (the id of its pair's headers); the id goes into the node's
  // exchange, so a completed exchange means every local rank holds the same id.
  // A rank that vetoed (or local rank 0 with a dead id) spoils its hash; an exchange where every rank
  // spoiled alike completes but counts as failed on every rank (each of them knows it spoiled).
  bool completed = false, local_ok = false, go = false, post_off = false;
  try {
    if (h.pair) {
      // h.mu from before the exchange until the header is sent: the engine thread cannot CANCEL this id
      // in between, so a node whose local rank 0 sends HDR(ok) is a node whose every rank does
      std::unique_lock<std::mutex> lk(h.mu);
      const uint64_t id = ++h.calls;
      hier_pump(h, id);
      // answered CANCEL for this id already (the peer waited in vain), or the path is off: the node's
      // exchange fails (a spoiled hash), so its other ranks' headers say so too
      const bool dead_id = h.cancelled >= id || h.off.load();
      const uint64_t xh = hier_id_hash(hash, id);
      // (dead id: a hash no other rank posts, so the exchange never completes)
      completed = ch.exchange(dead_id ? ~xh ^ 1 : veto ? ~xh : xh, c.input, nbytes, 0, fallback, true, c.output) ==
                  comm::LLChannel::Result::Complete;
      local_ok = completed && !veto && !dead_id;
      if (dead_id) {
        h.peer.erase(h.peer.begin(), h.peer.upper_bound(id));
        post_off = h.off.load();
      } else {
        go = hier_pair_step(h, id, hash, local_ok, fallback, deadline, stage_in);
        post_off = h.off.load();  // (go, from both headers, stands for this id: the peer took it alike)
      }
      lk.unlock();
      if (local_ok && !(post_off && !go)) ch.signal(word_base(ch.attempt()) + (go ? kWordGo : kWordCancel));
      if (post_off && !go) {
        ch.signal(kWordOff);  // (the node's other ranks: now, or before their next attempt)
        post_off = false;
      }
    } else {
      const uint64_t id = ++h.calls;
      const uint64_t xh = hier_id_hash(hash, id);
      completed = ch.exchange(veto ? ~xh : xh, c.input, nbytes, 0, fallback, true, c.output) ==
                  comm::LLChannel::Result::Complete;
      local_ok = completed && !veto;
      go = hier_peer_step(h, id, hash, local_ok, deadline, stage_in);
    }
  } catch (const DistributedError& e) {  // a peer died or stopped: the engine cannot go on either
    if (completed) ch.done();
    fast_path_broke(e.what());
    throw;
  }
  // every local rank arrived in this attempt: none still reads a buffer this rank outgrew
  if (completed) h.retired.clear();
  if (!go) {
    if (completed) ch.done();  // (nobody read anything)
    hier_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  try {
    hier_data(h, c, n, deadline, staged);
  } catch (const DistributedError& e) {
    c.peers_may_write = true;  // a receive of the cross step may stay posted into the output
    fast_path_broke(e.what());
    throw;
  }
  if (post_off) ch.signal(kWordOff);  // (after the data phase: every local peer read our final word)
  hier_collectives.fetch_add(1, std::memory_order_relaxed);
  if (staged) hier_staged.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// Local rank 0's agreement with its counterpart on the other node (see the top of the file). Both
// sides run the same protocol; the caller holds h.mu for the whole attempt (the engine thread's
// answers skip while it is taken).
bool CollectiveEngine::Impl::hier_pair_step(Hier& h, uint64_t id, uint64_t hash, bool local_ok, double fallback,
                                            double deadline, const std::function<void()>& sent) {
  hier_send(h, kHdr, id, hash, local_ok ? 1 : 0);
  if (!local_ok) {  // the outcome is CANCEL whatever the peer posted; its caller reads our header
    h.peer.erase(h.peer.begin(), h.peer.upper_bound(id));
    return false;
  }
  sent();
  comm::ll_wait::Backoff backoff;
  bool gave_up = false;
  while (true) {
    auto it = h.peer.find(id);
    if (it != h.peer.end()) {
      const Hier::Posted p = it->second;
      h.peer.erase(h.peer.begin(), h.peer.upper_bound(id));
      const bool go = p.type == kHdr && p.ok && p.hash == hash;
      // a window that passed in vain (the peer's engine answered for a caller that did not come)
      h.timeouts = go ? 0 : gave_up && p.type == kCancel ? h.timeouts + 1 : h.timeouts;
      if (h.timeouts >= kHierMaxTimeouts) h.off = true;
      return go;
    }
    const double waited = backoff.elapsed();
    if (!gave_up && waited > fallback) {
      hier_send(h, kGiveUp, id, 0, 0);  // the peer's engine answers when its caller is elsewhere
      gave_up = true;
    }
    if (waited > deadline)
      throw DistributedError(detail::concat(
          "aimass.dist: hierarchical allreduce: the other node's rank did not answer within ", deadline,
          " s: a peer rank has died or stopped calling aimass"));
    backoff.pause(waited);
    hier_pump(h, id);
  }
}

// A node peer (local rank j > 0): settles the call with local rank j of the other node, both sides
// alike: each sends HDR(id, hash, local outcome) and takes the outcome from both headers, as local
// rank 0 does (the same two outcomes and signatures, so the same decision; see the top of the file).
// The header of a counterpart that never comes (its node ran the call through the engine, or its
// local rank 0 answered CANCEL for the id) is replaced by local rank 0's word for the attempt.
bool CollectiveEngine::Impl::hier_peer_step(Hier& h, uint64_t id, uint64_t hash, bool local_ok, double deadline,
                                            const std::function<void()>& sent) {
  comm::LLChannel& ch = *h.ch;
  hier_send(h, kHdr, id, hash, local_ok ? 1 : 0);
  if (!local_ok) {  // CANCEL whatever the counterpart posted (local rank 0 takes it too)
    hier_pump(h, id + 1);
    h.peer.erase(h.peer.begin(), h.peer.upper_bound(id));
    return false;
  }
  sent();
  const uint64_t base = word_base(ch.attempt());
  comm::ll_wait::Backoff backoff;
  while (true) {
    hier_pump(h, id);
    auto it = h.peer.find(id);
    if (it != h.peer.end()) {
      const Hier::Posted p = it->second;
      h.peer.erase(h.peer.begin(), h.peer.upper_bound(id));
      return p.type == kHdr && p.ok && p.hash == hash;
    }
    const uint64_t w = ch.wait_signal(0, 0, 0, "");
    if (w == kWordOff) {
      h.off = true;
      return false;
    }
    if (w >= base + kWordGo) return w != base + kWordCancel;  // (Go, or already its slice's Final)
    const double waited = backoff.elapsed();
    if (waited > deadline)
      throw DistributedError(detail::concat(
          "aimass.dist: hierarchical allreduce (the node's agreement): neither the other node's rank nor local "
          "rank 0 answered within ", deadline, " s: a peer rank has died or stopped calling aimass"));
    backoff.pause(waited);
  }
}

// Under h.mu (local rank 0): the agreement messages the peer sent so far, for ids from keep_from on, into h.peer /
// h.giveup (older ones were settled already; a message with the off flag turns the path off here too).
void CollectiveEngine::Impl::hier_pump(Hier& h, uint64_t keep_from) {
  const int peer = 1 - comm->cross_rank();
  Msg m{};
  int flag = 0;
  while (true) {
    check_mpi(MPI_Iprobe(peer, kHdrTag, h.xc, &flag, MPI_STATUS_IGNORE), "MPI_Iprobe(hierarchical agreement)");
    if (!flag) return;
    check_mpi(MPI_Recv(&m, sizeof m, MPI_BYTE, peer, kHdrTag, h.xc, MPI_STATUS_IGNORE),
              "MPI_Recv(hierarchical agreement)");
    if (m.type == kCancel && m.flag) h.off = true;
    if (m.id < keep_from) continue;
    if (m.type == kGiveUp) {
      h.giveup = std::max(h.giveup, m.id);
    } else {
      h.peer[m.id] = Hier::Posted{m.type, m.hash, m.flag != 0};
    }
  }
}

void CollectiveEngine::Impl::hier_send(Hier& h, uint64_t type, uint64_t id, uint64_t hash, uint64_t flag) {
  Msg m{type, id, hash, flag};
  MPI_Request req;
  check_mpi(MPI_Isend(&m, sizeof m, MPI_BYTE, 1 - comm->cross_rank(), kHdrTag, h.xc, &req),
            "MPI_Isend(hierarchical agreement)");
  wait_mpi(&req, 1e-3, opts.timeout_s, "hierarchical allreduce (agreement message)", &waker->beat);
}

// The engine thread of local rank 0, once per cycle: a peer that gave up waiting for this rank's
// header of an attempt this rank's caller has not reached (it runs that call through the engine, or
// another call) gets CANCEL for it, and this rank's own attempt with that id falls back without
// waiting. Both count toward turning the path off (ids that drifted apart cost a window per call).
void CollectiveEngine::Impl::hier_engine_answer() {
  Hier& h = *hier;
  std::unique_lock<std::mutex> lk(h.mu, std::try_to_lock);
  if (!lk.owns_lock()) return;  // the caller is in an attempt: it answers
  hier_pump(h, h.calls + 1);
  if (h.giveup > h.calls && h.giveup > h.cancelled) {
    if (++h.timeouts >= kHierMaxTimeouts) h.off = true;
    hier_send(h, kCancel, h.giveup, 0, h.off.load() ? 1 : 0);
    h.cancelled = h.giveup;
  }
}

// After the node's exchange completed and this rank sent its header (whatever the outcome: a cancelled
// attempt only wasted the copy): the peers' parts of this rank's input into its staging buffer, at
// their offsets in the buffer, then base + kWordIn. Safe to overwrite: every local peer arrived in this
// attempt, so it finished reading the buffer in the last one.
void CollectiveEngine::Impl::hier_stage_in(Hier& h, const FastCollective& c, int64_t n) {
  comm::LLChannel& ch = *h.ch;
  const size_t es = dtype_size(c.dtype);
  const int L = ch.size(), me = ch.rank();
  const char* in = static_cast<const char*>(c.input);
  for (int j = 0; j < L; ++j) {
    if (j == me) continue;
    int64_t b, e;
    comm::line_slice(n, es, L, j, &b, &e);
    if (e > b)
      comm::copy_bytes(static_cast<char*>(h.stage->data()) + b * static_cast<int64_t>(es),
                       in + b * static_cast<int64_t>(es), static_cast<size_t>(e - b) * es);
  }
  ch.signal(word_base(ch.attempt()) + kWordIn);
}

void CollectiveEngine::Impl::hier_data(Hier& h, FastCollective& c, int64_t count, double deadline, bool staged) {
  comm::LLChannel& ch = *h.ch;
  comm::ReaderRelease release(ch, deadline);
  const int L = ch.size(), me = ch.rank();
  const size_t es = dtype_size(c.dtype);
  const bool average = c.op == ReduceOp::Average;
  const ReduceOp op = average ? ReduceOp::Sum : c.op;
  const uint64_t base = word_base(ch.attempt());
  char* out = static_cast<char*>(c.output);
  const char* in = static_cast<const char*>(c.input);
  auto slice_of = [&](int j, int64_t* b, int64_t* e) { comm::line_slice(count, es, L, j, b, e); };
  int64_t b, e;
  slice_of(me, &b, &e);
  // Staged (every local rank posted a staging buffer, and copied the peers' parts of its input into it
  // before it posted base + kWordIn, hier_stage_in): the peers' parts are read in this process's
  // mappings of their staging buffers (where one cannot be mapped, through the kernel), the final slice
  // goes into the own staging buffer, and each rank copies the peers' final slices from theirs into its
  // output; nobody reads or writes another rank's own buffers. Plain copies: measured on this VM,
  // 512 KiB / 2 / 8 MiB took 51 / 220 / 860 us by process_vm_readv (256 KiB pieces) and 19 / 50 / 267 us
  // by memcpy from a shared mapping.
  const char* mapped[comm::LLChannel::kMaxRanks] = {};
  if (staged) {
    for (int jj = 1; jj < L; ++jj) {
      const int j = (me + jj) % L;
      try {
        ch.wait_signal(j, base + kWordIn, deadline, "hierarchical allreduce (a local peer's staged input)");
      } catch (const DistributedError&) {
        release.lost(j);
        throw;
      }
      if (e > b && h.stage_map) mapped[j] = ch.map_stage(j, static_cast<size_t>(b) * es, static_cast<size_t>(e - b) * es);
    }
  }
  // 1. reduce-scatter: my slice of every local input, L2-sized pieces, the own input first
  const int64_t step = static_cast<int64_t>((size_t(256) << 10) / es);
  const size_t slot = static_cast<size_t>(step) * es;
  if (h.tmp.size() < static_cast<size_t>(L) * slot) h.tmp.resize(static_cast<size_t>(L) * slot);
  const char* srcs[comm::LLChannel::kMaxRanks];
  for (int64_t lo = b; lo < e; lo += step) {
    const int64_t hi = std::min(e, lo + step);
    const size_t bytes = static_cast<size_t>(hi - lo) * es;
    srcs[0] = in + lo * static_cast<int64_t>(es);
    for (int j = 0, k = 1; j < L; ++j) {
      if (j == me) continue;
      if (mapped[j]) {
        srcs[k++] = mapped[j] + (lo - b) * static_cast<int64_t>(es);
        continue;
      }
      char* dst = h.tmp.data() + static_cast<size_t>(j) * slot;
      try {
        if (staged) ch.read_stage(j, static_cast<size_t>(lo) * es, dst, bytes);
        else ch.read(j, static_cast<size_t>(lo) * es, dst, bytes);
      } catch (const DistributedError&) {  // its process is gone
        release.lost(j);
        throw;
      }
      srcs[k++] = dst;
    }
    comm::reduce_into(c.dtype, op, srcs, L, out + lo * static_cast<int64_t>(es), static_cast<size_t>(hi - lo), false,
                      size);
  }
  // 2. the slice with the other node's same slice (deadline: the engine timeout; a posted receive into
  // xbuf or the output outlives a failure, see hier_allreduce)
  if (e > b) {
    comm::cross_pair_allreduce(h.xc, kDataTag, comm->cross_rank(), h.xbuf, out + b * static_cast<int64_t>(es), e - b,
                               c.dtype, c.op, [&](MPI_Request* req, const char* what) {
                                 wait_mpi(req, 1.0, deadline, what, &waker->beat);
                               });
    if (average) comm::divide(c.dtype, out + b * static_cast<int64_t>(es), static_cast<size_t>(e - b), size);
  }
  // 3. allgather. Staged: my final slice into my staging buffer, one word, and every peer's final slice
  // from its staging buffer once its word is there
  if (staged) {
    ch.begin_output_writes();  // (the mappings' idle count)
    if (e > b)
      comm::copy_bytes(static_cast<char*>(h.stage->data()) + b * static_cast<int64_t>(es),
                       out + b * static_cast<int64_t>(es), static_cast<size_t>(e - b) * es);
    ch.signal(base + kWordFinal);  // my slice is final in my staging buffer; I read every peer's staged input
    for (int jj = 1; jj < L; ++jj) {
      const int j = (me + jj) % L;
      int64_t bj, ej;
      slice_of(j, &bj, &ej);
      try {
        ch.wait_signal(j, base + kWordFinal, deadline, "hierarchical allreduce (a local slice)");
        if (ej <= bj) continue;
        const size_t off = static_cast<size_t>(bj) * es, len = static_cast<size_t>(ej - bj) * es;
        if (const char* p = h.stage_map ? ch.map_stage(j, off, len) : nullptr) comm::copy_bytes(out + off, p, len);
        else ch.read_stage(j, off, out + off, len);
      } catch (const DistributedError&) {
        release.lost(j);
        throw;
      }
    }
    release.finish_unread();  // (nobody read this rank's buffers)
    return;
  }
  // By push: my final slice into every local peer's output while it is in this core's
  // cache (as the one-node single copy pushes), then one word: a peer's word says it read my input and
  // wrote my output, so after the last wait no peer touches this rank's buffers and nobody waits for
  // readers. (Pulling each peer's slice after its word, then waiting for the readers: bench ratio to
  // flat MPI 1 MiB 0.75-1.02, 4 MiB 0.90-1.18, against 1.01-1.64 / 1.03-1.78 pushed; docs/comm.md.)
  // Without the push (peers' memory not writable: AIMASS_SHM_CMA_PUSH=0, a ptrace restriction): every
  // local peer's final slice from its output after its word, then wait until every peer read mine.
  const bool push = ch.push_available();
  if (push) {
    ch.begin_output_writes();
    for (int jj = 1; jj < L && e > b; ++jj) {
      const int j = (me + jj) % L;
      try {
        ch.write_output(j, static_cast<size_t>(b) * es, out + b * static_cast<int64_t>(es),
                        static_cast<size_t>(e - b) * es);
      } catch (const DistributedError&) {  // its process is gone
        release.lost(j);
        throw;
      }
    }
  }
  ch.signal(base + kWordFinal);  // my slice is final (pushed: in every local output); I read every local input
  for (int jj = 1; jj < L; ++jj) {
    const int j = (me + jj) % L;
    int64_t bj, ej;
    slice_of(j, &bj, &ej);
    if (!push && ej <= bj) continue;  // (pushed: every peer's word, which also says it is done with mine)
    try {
      ch.wait_signal(j, base + kWordFinal, deadline, "hierarchical allreduce (a local slice)");
      if (!push)
        ch.read_output(j, static_cast<size_t>(bj) * es, out + bj * static_cast<int64_t>(es),
                       static_cast<size_t>(ej - bj) * es);
    } catch (const DistributedError&) {
      // j did not advance for a whole deadline (stopped or dead) or its process is gone: the error path
      // does not wait another deadline for j to finish reading this rank's buffers, as the one-node push
      // gives up on a stopped reader after one (the output stays alive: peers_may_write; a j that
      // resumes later finds its cross-node partner gone and raises too)
      release.lost(j);
      throw;
    }
  }
  if (push) {
    release.finish_unread();
    return;
  }
  if (!release.finish())
    throw DistributedError(detail::concat("aimass.dist: hierarchical allreduce '", c.name,
                                          "': a local peer did not finish reading this rank's buffers within ",
                                          deadline, " s: a peer rank has died or stopped calling aimass"));
}

}  // namespace aimass
