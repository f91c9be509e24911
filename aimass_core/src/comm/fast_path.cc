// The engine's fast path: a blocking collective small enough for the low-latency channel
// (comm/ll_shm.h) runs in the caller's thread when this rank's engine and every peer's are
// idle. Anything irregular (a peer busy in its engine, slow, stopped or dead; arguments
// that differ) aborts the attempt on every rank and the request goes through the engine's
// negotiation, which reports mismatches and applies the deadlines.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <thread>

#include "comm/cpu_share.h"
#include "aimass/shared_host.h"
#include "comm/engine_impl.h"
#include "aimass/comm_kernels.h"

namespace aimass {

namespace comm {

namespace {
// Environment variable `name` as a byte count (digits only) into *out; unset: *out stays. ValueError saying
// what it must be (`rule`: the range and its meaning) when it is not one.
void env_bytes(const char* name, size_t* out, const char* rule, long long max = (1ll << 50)) {
  const char* v = std::getenv(name);
  if (!v) return;
  char* end = nullptr;
  const long long b = std::strtoll(v, &end, 10);
  AIMASS_CHECK(end != v && *end == '\0' && b >= 0 && b <= max, ValueError, name, " must be a byte count ", rule,
               ", got '", v, "'");
  *out = static_cast<size_t>(b);
}
}  // namespace

void ll_options_from_env(EngineOptions& o) {
  env_bytes("AIMASS_LL_MAX_BYTES", &o.ll_max_bytes, "in [0, 64 MiB] (0 disables the low-latency channel)",
            64ll << 20);
  if (const char* v = std::getenv("AIMASS_LL_FALLBACK_MS")) {
    char* end = nullptr;
    double ms = std::strtod(v, &end);
    AIMASS_CHECK(end != v && ms > 0 && ms <= 60000, ValueError,
                 "AIMASS_LL_FALLBACK_MS must be a number of milliseconds in (0, 60000], got '", v, "'");
    o.ll_fallback_s = ms / 1000.0;
  }
  size_t eager_copy = 0;  // (checked here; the channel reads it)
  env_bytes("AIMASS_LL_EAGER_COPY_MAX_BYTES", &eager_copy,
            ">= 0 (the largest blocking broadcast whose root copies it into the eager ring; larger ones are read "
            "from the root's buffer)");
  env_bytes("AIMASS_LL_PUSH_MAX_BYTES", &o.ll_push_max_bytes,
            ">= 0 (0: allreduces above the low-latency slot go to the engine)");
  env_bytes("AIMASS_HIER_STAGE", &o.hier_stage_max_bytes,
            ">= 0 (the largest hierarchical allreduce whose node steps go through staging buffers; 0: none)");
  env_bytes("AIMASS_LL_GATHER_PUSH_MIN_BYTES", &o.ll_gather_push_min_bytes,
            ">= 0 (the smallest blocking allgather result whose ranks write their rows into every rank's result)");
}

namespace {
// Word-at-a-time mixing (the same binary on every rank, so every rank hashes alike): the name
// costs a multiply per 8 bytes instead of one per byte.
struct Mix {
  uint64_t h = 0x9e3779b97f4a7c15ull;
  void u64(uint64_t v) {
    h ^= v;
    h *= 0xff51afd7ed558ccdull;
    h ^= h >> 32;
  }
  void bytes(const char* p, size_t n) {
    for (; n >= 8; p += 8, n -= 8) {
      uint64_t v;
      std::memcpy(&v, p, 8);
      u64(v);
    }
    uint64_t v = 0;
    std::memcpy(&v, p, n);
    u64(v ^ (uint64_t(n) << 56));
  }
};
}  // namespace

uint64_t ll_signature_hash(CollectiveKind kind, DType dtype, DType wire, ReduceOp op, int root,
                           std::string_view name, const int64_t* shape, int ndim) {
  Mix f;
  f.bytes(name.data(), name.size());  // (ends with the length: no name is a prefix of another's mix)
  f.u64(static_cast<uint64_t>(kind) | static_cast<uint64_t>(dtype) << 8 | static_cast<uint64_t>(wire) << 16 |
        static_cast<uint64_t>(op) << 24 | static_cast<uint64_t>(static_cast<uint32_t>(ndim)) << 32);
  f.u64(kind == CollectiveKind::Broadcast ? static_cast<uint64_t>(root) : 0);
  for (int i = kind == CollectiveKind::Allgather ? 1 : 0; i < ndim; ++i) f.u64(static_cast<uint64_t>(shape[i]));
  return f.h;
}

}  // namespace comm

// Blocking broadcasts up to this size are copied into the eager ring by the root (which returns at
// once); larger ones, up to kByAddressMaxBroadcastBytes, are posted by address in the same stream and
// read by the receivers straight from the root's buffer, the root waiting for their acknowledgements.
// A copy through the ring moves every line between the cores twice (the root's write takes it, the
// receiver's read takes it back), a read of the root's buffer only once, or not at all when the
// receiver still holds it (measured, 2 ranks, AMD EPYC VM, loaded, same run: 32 KiB 15.3 us through
// the ring against 5.8 us for mpi4py's single-copy Bcast; see docs/comm.md "Eager broadcast").
constexpr size_t kEagerCopyMaxBytes = size_t(4) << 10;

void CollectiveEngine::Impl::ll_init() {
  // collective even when disabled here: LLChannel's constructor agrees across ranks
  ll = std::make_unique<comm::LLChannel>(*comm, opts.ll_max_bytes, opts.timeout_s);
  if (!ll->available()) {
    ll.reset();
    return;
  }
  // every rank must take the single-copy allreduce for the same sizes: the smallest bound wins
  unsigned long long push_max = ll->large_available() ? opts.ll_push_max_bytes : 0;
  MPI_Request req;
  check_mpi(MPI_Iallreduce(MPI_IN_PLACE, &push_max, 1, MPI_UNSIGNED_LONG_LONG, MPI_MIN, mpi, &req),
            "MPI_Iallreduce(ll push)");
  wait_mpi(&req, 1.0, opts.timeout_s, "aimass.dist.init()");
  ll_push_max = static_cast<size_t>(push_max);
  // the push reduces shared host buffers in the peers' mappings where the segment's probe found that every
  // local rank maps every other's (agreed at shm_init, which runs first)
  ll->set_maps_peers(shm_ok && shm->maps_peers());
  // (validated by ll_options_from_env; the root alone decides, so no agreement is needed)
  // More ranks on the machine than CPUs (comm::cpu_share): a root that waits for its receivers waits for them to be
  // scheduled, while a copy into the ring lets it return at once (measured, 3 ranks on 2 cores,
  // same run: 8-64 KiB 0.5-1.8 us copied against 12-20 us read from the root, mpi4py 16-24 us), so
  // every broadcast the ring holds is copied there.
  eager_copy_max = comm::cpu_share(comm->local_size()).oversubscribed() ? ll->eager_max() : kEagerCopyMaxBytes;
  if (const char* v = std::getenv("AIMASS_LL_EAGER_COPY_MAX_BYTES")) eager_copy_max = std::strtoull(v, nullptr, 10);
}

// The handle path (CollectiveEngine::submit with blocking = true): the result of an allgather /
// reduce_scatter goes to the handle.
FastCollective CollectiveEngine::Impl::fast_of(const CollectiveRequest& r, CollectiveHandle& h) {
  FastCollective c;
  c.kind = r.kind;
  c.op = r.op;
  c.dtype = r.dtype;
  c.root = r.root;
  c.name = r.name;
  c.shape = r.shape.data();
  c.ndim = static_cast<int>(r.shape.size());
  c.input = r.input;
  c.output = r.output;
  if (r.kind == CollectiveKind::Allgather || r.kind == CollectiveKind::ReduceScatter) {
    c.output = nullptr;
    c.alloc = [](void* ctx, size_t bytes) -> void* {
      auto* hh = static_cast<CollectiveHandle*>(ctx);
      hh->result_.resize(bytes + 1);  // (+1: never a null pointer)
      return hh->result_.data();
    };
    c.alloc_ctx = &h;
  }
  return c;
}

// h done with c's result (an allgather / reduce_scatter's shape: c.result_rows in dimension 0)
void CollectiveEngine::Impl::finish_fast(const CollectiveRequest& r, const FastCollective& c, CollectiveHandle& h) {
  if (r.kind == CollectiveKind::Allgather || r.kind == CollectiveKind::ReduceScatter) {
    h.result_shape_ = r.shape.empty() ? std::vector<int64_t>{c.result_rows} : r.shape;
    h.result_shape_[0] = c.result_rows;
  }
  h.finish(CollectiveHandle::ErrorKind::None, "");
}

// One rank: every collective's result is this rank's own data (allreduce: the input, rounded through
// the wire type when compressed, as the engine's fused path does; broadcast: the root's, its own;
// allgather / reduce_scatter: the input's rows, all of them). The engine's round trip for it cost 22-65 us
// a call (blocking 1 KiB allreduce 22-29 us, async + synchronize 60 us, broadcast 53-67 us, allgather
// 60-65 us; mpi4py's Allreduce 0.5 us), and every gradient of DistributedOptimizer paid it.
bool CollectiveEngine::Impl::alone(FastCollective& c, DType wire) {
  {
    std::lock_guard<std::mutex> lk(mu);
    if (!running || stop_requested || !broken.empty()) return false;
  }
  int64_t n = 1;
  for (int d = 0; d < c.ndim; ++d) n *= c.shape[d];
  const size_t bytes = static_cast<size_t>(n) * dtype_size(c.dtype);
  switch (c.kind) {
    case CollectiveKind::Barrier: return true;
    case CollectiveKind::Allgather:
    case CollectiveKind::ReduceScatter: {
      c.result_rows = c.ndim > 0 ? c.shape[0] : 1;  // (a 0-d allgather: one row per rank)
      void* out = c.output != nullptr && c.capacity >= bytes ? c.output : c.alloc(c.alloc_ctx, bytes);
      if (bytes) comm::copy_bytes(out, c.input, bytes);  // (average over one rank: the value itself)
      return true;
    }
    case CollectiveKind::Allreduce:
    case CollectiveKind::Broadcast:
      if (wire != c.dtype) {  // compressed float32: the value as the wire carries it
        const comm::Half h = wire == DType::F16 ? comm::Half::F16 : comm::Half::BF16;
        constexpr size_t kBlock = 4096;  // (through a stack block, as scale_half: no temp as large as the tensor)
        uint16_t tmp[kBlock];
        const auto* in = static_cast<const float*>(c.input);
        auto* out = static_cast<float*>(c.output);
        for (size_t i = 0; i < static_cast<size_t>(n); i += kBlock) {
          const size_t m = std::min(kBlock, static_cast<size_t>(n) - i);
          comm::f32_to_half(h, in + i, tmp, m);
          comm::half_to_f32(h, tmp, out + i, m);
        }
      } else if (bytes && c.output != c.input) {
        std::memmove(c.output, c.input, bytes);
      }
      return true;
  }
  return false;
}

bool CollectiveEngine::Impl::try_alone(const CollectiveRequest& r, CollectiveHandle& h) {
  FastCollective c = fast_of(r, h);
  if (!alone(c, r.wire)) return false;
  finish_fast(r, c, h);
  return true;
}

bool CollectiveEngine::Impl::try_fast(const CollectiveRequest& r, CollectiveHandle& h) {
  if ((!ll && !(hier && r.kind == CollectiveKind::Allreduce)) || r.wire != r.dtype) return false;
  FastCollective c = fast_of(r, h);
  try {
    if (!(ll ? fast(c) : hier_allreduce(c))) return false;
  } catch (const DistributedError& e) {
    if (!c.peers_may_write) throw;
    // a late peer may still write the output: the handle reports the error and keeps the
    // caller's arrays alive (buffers_in_use), as after an engine data phase cut off mid-push
    {
      std::lock_guard<std::mutex> lk(h.mu_);
      h.buffers_in_use_ = true;
    }
    h.finish(CollectiveHandle::ErrorKind::Distributed, e.what());
    return true;
  }
  finish_fast(r, c, h);
  return true;
}

bool CollectiveEngine::run_fast(FastCollective& c) {
  Impl& m = *impl_;
  if ((m.size > 1 && !m.ll && !m.hier) || c.name.empty() || c.ndim < 0 || (c.ndim > 0 && c.shape == nullptr))
    return false;
  for (int d = 0; d < c.ndim; ++d)
    if (c.shape[d] < 0) return false;
  switch (c.kind) {  // what submit() refuses goes there, to be refused with its message
    case CollectiveKind::Allreduce:
    case CollectiveKind::ReduceScatter:
      if (c.dtype == DType::Bool && c.op == ReduceOp::Average) return false;
      if (c.kind == CollectiveKind::ReduceScatter && c.ndim == 0) return false;
      break;
    case CollectiveKind::Broadcast:
      if (c.root < 0 || c.root >= m.size) return false;
      c.op = ReduceOp::Sum;
      break;
    case CollectiveKind::Allgather:
    case CollectiveKind::Barrier: c.op = ReduceOp::Sum; break;
  }
  if (m.size == 1) return m.alone(c, c.dtype);
  if (!m.ll) return m.hier_allreduce(c);  // across two nodes (hier_fast.cc)
  return m.fast(c);
}

// The largest single-copy broadcast/allgather payload per rank the caller's thread runs. Bigger ones
// go to the engine, whose single-copy paths read in L2-sized chunks. Broadcast: measured here (2 ranks,
// loaded 2-core VM) the caller's thread won at 1 MiB (0.96x/1.01x mpi4py against 0.28x/0.16x through
// the engine), the engine at 16 MiB while only the receivers copied; since the root writes pieces too
// (eager_serve), up to 1 GiB as the allgather (2 ranks, 12 alternating jobs, ms: 8 MiB 0.22-0.31
// against 0.31-0.39 through the engine, 16 MiB 0.62-0.87 against 0.63-0.96, 32 / 128 MiB level; the
// engine's 16 MiB also took 1.5-1.7 ms in 2 of 6 earlier jobs, mpi4py 1.2-1.3 ms). Allgather: the
// caller's thread won at every size to 64 MiB gathered (quiet, 16 MiB: 1.0-1.1 ms against 2.6 ms
// through the engine and 1.1-1.3 ms for mpi4py): every rank copies anyway, and the engine's
// round trip and chunked reads only add to it. Up to 16 MiB per rank at first: past that a fresh
// result array cost more in page faults than the engine's recycled blocks saved; since the lean
// lane's results come from the same recycled blocks (huge pages from 4 MiB, bind_comm.cc), the
// caller's thread won there too (2 ranks, loaded VM, same run: 64 MiB gathered 23 ms against 42 ms
// through the engine and 32 ms for mpi4py; 128 MiB 57 / 106 / 44 ms). Past 64 MiB per rank as well
// (loaded, same run, median of 5 rounds: 256 MiB gathered 81 ms against 130 ms through the engine and
// 93 ms for mpi4py, 512 MiB 143 / 257 / 147 ms): up to 1 GiB per rank, as the allreduce.
constexpr size_t kByAddressMaxBroadcastBytes = size_t(1) << 30;
constexpr size_t kByAddressMaxAllgatherBytes = size_t(1) << 30;
// An allgather whose result is at least as large as the last-level cache (and at least 16 MiB; 32 MiB
// when sysfs does not say) copies this rank's own rows with streaming stores: the result cannot stay
// cached anyway, and the stores skip reading each destination line first (a third of that copy's
// memory traffic, while the peer's rows come in through the kernel at the same time). Measured (two
// processes on this 2-core VM, memcpy / streaming copy of the own half + process_vm_readv of the
// other, median of 25, same run): 32 MiB gathered 2.93 / 2.67 ms, 64 MiB 6.4 / 5.2 ms, 256 MiB
// 24.6 / 19.5 ms; at 16 MiB even (1.08 / 1.12 ms), at 4 MiB the streaming copy lost (0.155 / 0.221 ms:
// the plain copy's lines stay in the L3 for the next call).
size_t stream_min_bytes() {
  // (sysfs, not sysconf(_SC_LEVEL3_CACHE_SIZE): glibc reads the CPU's total from cpuid, 320 MiB on
  // this VM whose sysfs and lscpu say 32 MiB shared by its cores)
  static const size_t v = [] {
    size_t l3 = 0;
    if (std::FILE* f = std::fopen("/sys/devices/system/cpu/cpu0/cache/index3/size", "r")) {
      unsigned long long k = 0;
      char unit = 0;
      if (std::fscanf(f, "%llu%c", &k, &unit) >= 1)
        l3 = static_cast<size_t>(k) << (unit == 'K' ? 10 : unit == 'M' ? 20 : 0);
      std::fclose(f);
    }
    return l3 > 0 ? std::max(l3, size_t(16) << 20) : size_t(32) << 20;
  }();
  return v;
}
// An allgather of equal parts whose result is at least opts.ll_gather_push_min_bytes (128 MiB) is
// pushed: each rank copies its rows into its own result in 1 MiB pieces (streaming stores, as above) and writes each piece, still in
// the L2, into every peer's result (process_vm_writev), so its input is read from memory once, where
// the pull reads every part twice (the owner's copy and the peers' process_vm_readv). Measured (two
// processes on this 2-core VM, streaming copy + pull against the push, median of 25, same run): 64 MiB
// gathered 5.17 / 5.15 ms (even), 256 MiB 19.5 / 16.7 ms.
constexpr size_t kGatherPushPiece = size_t(1) << 20;
// Allreduces of more than this many bytes take the single-copy push (up to ll_push_max) even when
// the slot would hold them (see fast()).
constexpr size_t kPushMinBytes = size_t(256) << 10;

// A peer that never acknowledged an eager broadcast within the deadline has died or stopped: the
// engine cannot go on either (as when the caller-thread path finds a peer gone, below).
void CollectiveEngine::Impl::eager_settle_or_break(double deadline, uint64_t lag) {
  try {
    ll->settle(deadline, lag);
  } catch (const DistributedError& e) {
    if (ll->peer_lost()) fast_path_broke(e.what());
    throw;
  }
}

// The caller-thread path found a peer dead or stopped: later calls raise at once, the background
// thread leaves at its next wait, and MPI_Finalize is bounded.
void CollectiveEngine::Impl::fast_path_broke(const char* what) {
  {
    std::lock_guard<std::mutex> lk(mu);
    if (broken.empty()) broken = what;
  }
  fast_broke.store(true);
  waker->notify(&waker->flush);
  note_peer_failure();
}

void CollectiveEngine::Impl::eager_settle() {
  if (!ll) return;
  std::lock_guard<std::mutex> el(eager_mu);
  if (ll->settled()) return;
  eager_settle_or_break(opts.timeout_s, 0);  // (fixed at construction: no lock needed to read it)
}

// A blocking broadcast's turn in the eager stream (ll_shm.h): true when it completed there.
bool CollectiveEngine::Impl::eager_broadcast(FastCollective& c, size_t nbytes) {
  std::lock_guard<std::mutex> el(eager_mu);
  // (the timeout and the fallback window are fixed at construction: no lock needed to read them)
  const double deadline = opts.timeout_s, fallback = opts.ll_fallback_s;
  bool post = false;
  if (rank == c.root) {  // whether this root may post: only it needs the engine's state
    std::lock_guard<std::mutex> lk(mu);
    post = opts.ll_max_bytes != 0 && broken.empty() && !waker->stalled.load(std::memory_order_relaxed) &&
           !stop_requested && running && (poisoned.empty() || !poisoned.count(std::string(c.name)));
  }
  eager_settle_or_break(deadline, comm::LLChannel::ring_lag());
  auto fill = [](comm::LLChannel::EagerSig& sig, const void* ctx) {
    const auto& f = *static_cast<const FastCollective*>(ctx);
    sig.set(f.dtype, f.root, f.name, f.shape, f.ndim);
  };
  const uint64_t hash = comm::ll_signature_hash(c.kind, c.dtype, c.dtype, c.op, c.root, c.name, c.shape, c.ndim);
  comm::LLChannel::Eager got;
  if (rank == c.root) {
    // (from 128 KiB only when the root may write its pieces into the receivers' outputs: a lone
    // reader measured slower here than the channel's exchange, 256 KiB-2 MiB: 0.82-0.84x of its speed)
    const bool by_address = nbytes > eager_copy_max && nbytes <= kByAddressMaxBroadcastBytes &&
                            ll->cma_available() && (nbytes < (size_t(128) << 10) || ll->push_available());
    got = ll->eager_root(hash, c.input, nbytes, post && (nbytes == 0 || c.input != nullptr), fill, &c, by_address);
    if (got == comm::LLChannel::Eager::Done && nbytes && c.output != c.input)
      comm::copy_bytes(c.output, c.input, nbytes);
    if (got == comm::LLChannel::Eager::Done && by_address) {
      try {  // the receivers read our input: it must not change before every one acknowledged
        ll->eager_serve(deadline);  // (meanwhile, write pieces of large ones into their outputs)
        eager_settle_or_break(deadline, 0);
      } catch (const DistributedError& e) {
        ll->eager_abandon();
        if (ll->peer_lost()) fast_path_broke(e.what());
        throw;
      }
    }
  } else {
    try {
      got = ll->eager_receive(hash, c.root, c.output, nbytes, fill, &c, fallback);
    } catch (const DistributedError& e) {
      if (ll->peer_lost()) fast_path_broke(e.what());  // (a single-copy read found the root gone)
      c.peers_may_write = ll->eager_output_posted();  // a stopped root may still write its pieces
      throw;
    }
  }
  if (got != comm::LLChannel::Eager::Done) return false;
  ll_collectives.fetch_add(1, std::memory_order_relaxed);
  return true;
}

bool CollectiveEngine::Impl::fast(FastCollective& c) {
  const size_t es = dtype_size(c.dtype);
  int64_t n = c.kind == CollectiveKind::Barrier ? 0 : 1;  // (a barrier has no data)
  for (int d = 0; d < c.ndim && n; ++d) n *= c.shape[d];
  const size_t nbytes = static_cast<size_t>(n) * es;
  // every blocking broadcast (of the engine's own thread) takes its turn in the eager stream,
  // whatever its size (the stream stays aligned across ranks); other collectives first settle it
  if (c.kind == CollectiveKind::Broadcast && (nbytes == 0 || c.output != nullptr) &&
      std::this_thread::get_id() == eager_thread) {
    if (eager_broadcast(c, nbytes)) return true;
  } else {
    eager_settle();
  }
  // Broadcast and allgather of kCmaMin bytes or more are single-copy where the kernel allows it
  // (peers read our input itself): the slot does not bound them, only kByAddressMax*Bytes.
  // Allreduces larger than the slot too, up to ll_push_max (agreed): the claimed-piece push
  // (LLChannel::push_allreduce). Every rank decides alike (agreed bounds, the same size).
  // From kPushMinBytes the push beats the slot even though the slot holds it (measured, 2 ranks:
  // 512 KiB 0.08-0.09 ms against 0.26 ms through the slot, 1 MiB 0.15-0.18 against 0.54; below,
  // with both ranks on their own cores, the slot won: 256 KiB 0.038 against 0.049 ms).
  const bool push = c.kind == CollectiveKind::Allreduce && nbytes > std::min(ll->slot_bytes(), kPushMinBytes) &&
                    nbytes >= comm::LLChannel::kCmaMin && nbytes <= ll_push_max;
  // (without the push, i.e. without process_vm_writev, large allreduces are all staged: nothing by address)
  const bool by_address = (push && ll->push_available()) ||
                          ((c.kind == CollectiveKind::Broadcast || c.kind == CollectiveKind::Allgather) &&
                           ll->cma_available() && nbytes >= comm::LLChannel::kCmaMin);
  const size_t by_address_max = c.kind == CollectiveKind::Allgather ? kByAddressMaxAllgatherBytes
                                                                    : kByAddressMaxBroadcastBytes;
  if (nbytes > (push ? ll_push_max : by_address ? by_address_max : ll->slot_bytes())) return false;
  if (n > 0 && (c.input == nullptr ||
                ((c.kind == CollectiveKind::Allreduce || c.kind == CollectiveKind::Broadcast) && c.output == nullptr)))
    return false;
  const void* post = c.input;
  size_t post_bytes = nbytes;
  int64_t rows = 0;
  switch (c.kind) {
    case CollectiveKind::Broadcast:
      if (rank != c.root) post_bytes = 0;
      break;
    case CollectiveKind::Allgather: rows = c.ndim == 0 ? 1 : c.shape[0]; break;
    case CollectiveKind::Barrier: post_bytes = 0; break;
    case CollectiveKind::Allreduce:
      if (push && !by_address) post_bytes = 0;  // staged: the peers never read this rank's buffers
      break;
    default: break;
  }
  std::unique_lock<std::mutex> fl(fast_mu, std::try_to_lock);
  if (!fl.owns_lock()) return false;  // another thread of this rank is in the channel
  double deadline, fallback;
  {
    std::lock_guard<std::mutex> lk(mu);
    deadline = opts.timeout_s;
    fallback = opts.ll_fallback_s;
    // queued work first (and every error the engine path reports: broken, stopped, poisoned)
    if (opts.ll_max_bytes == 0 || (!by_address && !push && nbytes > opts.ll_max_bytes) || !inflight.empty() ||
        !incoming.empty() || !broken.empty() || waker->stalled.load(std::memory_order_relaxed) || stop_requested ||
        !running || (!poisoned.empty() && poisoned.count(std::string(c.name))))
      return false;
  }
  if (push) rows = ll->stage_vote(nbytes, c.output);  // staged or push (ll_shm.h; under fast_mu: the timings are its)
  // a large allgather posts its result beside its input when it holds every rank's part (the lean lane's
  // recycled block, sized for equal parts): the ranks then write their rows into it (kGatherPushPiece).
  // Also at any size when that block is a shared host buffer the peers map (the lean lane's results where
  // ll_maps_peers()): they write their rows into it with plain stores, no kernel copy (stats
  // ll_gather_mapped). Measured (2 ranks, quiet, same runs, mpi4py Allgather into a preallocated array):
  // 1 MiB gathered 0.03 ms against 0.07, 4 MiB 0.12-0.14 against 0.23-0.33, 16 MiB 1.25-1.41 against
  // 1.6-2.1, 64 MiB 5.3-6.4 against 8.1-9.0; the pull took 1.37-1.57 ms at 16 MiB against 1.18-1.38.
  const bool gather_post = c.kind == CollectiveKind::Allgather && by_address && ll->push_available() &&
                           c.output != nullptr && nbytes > 0 && c.capacity == nbytes * static_cast<size_t>(size) &&
                           (c.capacity >= opts.ll_gather_push_min_bytes ||  // (fixed at construction)
                            (ll->maps_peers() && in_shared_host_buffer(c.output, c.capacity)));
  const uint64_t hash = comm::ll_signature_hash(c.kind, c.dtype, c.dtype, c.op, c.root, c.name, c.shape, c.ndim);
  if (ll->exchange(hash, post, post_bytes, rows, fallback, by_address,
                   push || gather_post ? c.output : nullptr) != comm::LLChannel::Result::Complete) {
    ll_fallbacks.fetch_add(1, std::memory_order_relaxed);
    return false;
  }
  // pushed when every rank posted its result and the parts are equal: what every rank sees in the same
  // slots, so every rank decides alike (a rank on the handle path posts none: every rank pulls)
  // (not this rank's size bound: a rank whose bound differs posts nothing, and every rank pulls; a rank
  // that posted nothing itself pulls without looking at its peers' slots)
  bool gather_push = gather_post;
  for (int j = 0; j < size && gather_push; ++j)
    gather_push = ll->posted_output(j) && ll->bytes(j) == ll->bytes(0) && ll->bytes(0) > 0;
  // from now on the peers write this rank's output (the push; the staged allreduce writes its own)
  c.peers_may_write = (push && !ll->agree_staged()) || gather_push;
  try {
    fast_data(c, nbytes, deadline, push, gather_push);
  } catch (const DistributedError& e) {  // a peer died or stopped: the engine cannot go on either
    fast_path_broke(e.what());
    throw;
  }
  ll_collectives.fetch_add(1, std::memory_order_relaxed);
  return true;
}

// The data phase of a completed attempt: every rank reads the same slots in rank order.
void CollectiveEngine::Impl::fast_data(FastCollective& c, size_t nbytes, double deadline, bool push,
                                       bool gather_push) {
  comm::ReaderRelease release(*ll, deadline);
  const size_t es = dtype_size(c.dtype);
  const int64_t n = static_cast<int64_t>(nbytes / es);
  const int L = size;
  const ReduceOp op = c.op == ReduceOp::Average ? ReduceOp::Sum : c.op;
  const char* srcs[comm::LLChannel::kMaxRanks];
  auto result = [&](size_t bytes) -> char* {  // allgather / reduce_scatter result memory
    if (c.output && bytes == c.capacity) return static_cast<char*>(c.output);
    AIMASS_CHECK(c.alloc != nullptr, DistributedError, "aimass.dist: ", collective_kind_name(c.kind), " '", c.name,
                 "': the result needs ", bytes, " bytes, the caller gave ", c.capacity, " (internal error)");
    return static_cast<char*>(c.alloc(c.alloc_ctx, bytes));
  };
  switch (c.kind) {
    case CollectiveKind::Allreduce:
      if (push) {  // staged or the push, as agree_staged() chose (see ll_shm.h)
        ll->large_allreduce(c.dtype, op, c.op == ReduceOp::Average, c.input, c.output, n, deadline);
        if (ll->last_push_mapped()) ll_mapped.fetch_add(1, std::memory_order_relaxed);
        if (!c.peers_may_write) ll_staged.fetch_add(1, std::memory_order_relaxed);
      } else if (n > 0) {
        for (int j = 0; j < L; ++j) srcs[j] = ll->payload(j);  // rank order: the same bits on every rank
        comm::reduce_sources(c.dtype, op, srcs, L, static_cast<char*>(c.output), static_cast<size_t>(n));
        if (c.op == ReduceOp::Average) comm::divide(c.dtype, static_cast<char*>(c.output), static_cast<size_t>(n), L);
      }
      break;
    case CollectiveKind::Broadcast:
      if (nbytes > 0) {
        if (rank == c.root) {
          if (c.output != c.input) comm::copy_bytes(c.output, c.input, nbytes);
        } else {
          ll->read(c.root, 0, c.output, nbytes);
        }
      }
      break;
    case CollectiveKind::Allgather: {
      int64_t row = static_cast<int64_t>(es);
      for (int d = 1; d < c.ndim; ++d) row *= c.shape[d];
      int64_t total_rows = 0;
      for (int j = 0; j < L; ++j) {
        AIMASS_CHECK(static_cast<int64_t>(ll->bytes(j)) == ll->rows(j) * row, DistributedError,
                     "aimass.dist: low-latency allgather '", c.name, "': rank ", j, " posted ", ll->bytes(j),
                     " bytes for ", ll->rows(j), " rows (internal error)");
        total_rows += ll->rows(j);
      }
      char* out = result(static_cast<size_t>(total_rows * row));
      c.result_rows = total_rows;
      if (gather_push) {  // our rows into our result and, piece by piece from the L2, into every peer's
        AIMASS_CHECK(out == c.output, DistributedError, "aimass.dist: allgather '", c.name,
                     "': the pushed result is not the posted one (internal error)");
        const size_t at = nbytes * static_cast<size_t>(rank);
        const char* in = static_cast<const char*>(c.input);
        // Streaming stores (own rows and the peers') once the ranks' results together fill the L3: the lines
        // cannot all stay cached, and a plain store first reads its line, which may sit in a peer's cache.
        // Measured (2 ranks, mapped results, same runs): 16 MiB gathered 1.25-1.41 ms against 1.28-1.60 with
        // plain stores; 4 MiB plain 0.12-0.14 ms against 0.20-0.22 streaming.
        const bool stream = c.capacity * static_cast<size_t>(L) >= stream_min_bytes();
        bool mapped = true;
        ll->begin_output_writes();
        for (size_t off = 0; off < nbytes; off += kGatherPushPiece) {
          const size_t k = std::min(kGatherPushPiece, nbytes - off);
          if (stream) comm::copy_streaming(out + at + off, in + off, k);
          else comm::copy_bytes(out + at + off, in + off, k);
          for (int jj = 1; jj < L; ++jj) mapped &= ll->write_output((rank + jj) % L, at + off, in + off, k, stream);
        }
        ll_gather_pushed.fetch_add(1, std::memory_order_relaxed);
        if (mapped) ll_gather_mapped.fetch_add(1, std::memory_order_relaxed);
        break;  // (the release below waits until every peer wrote its rows into ours)
      }
      size_t at = 0;
      const bool stream = static_cast<size_t>(total_rows * row) >= stream_min_bytes();
      for (int j = 0; j < L; ++j) {  // this rank's own rows straight from its input
        if (j == rank) {
          if (nbytes && stream) comm::copy_streaming(out + at, c.input, nbytes);
          else if (nbytes) comm::copy_bytes(out + at, c.input, nbytes);
        } else {
          ll->read(j, 0, out + at, ll->bytes(j));
        }
        at += ll->bytes(j);
      }
      break;
    }
    case CollectiveKind::ReduceScatter: {  // the engine's split: dimension 0 in near-equal blocks
      const int64_t n0 = c.shape[0];
      int64_t row = 1;
      for (int d = 1; d < c.ndim; ++d) row *= c.shape[d];
      int64_t off = 0, mine = 0;
      for (int i = 0; i <= rank; ++i) {
        const int64_t k = (n0 / L + (i < n0 % L ? 1 : 0)) * row;
        if (i < rank) off += k;
        else mine = k;
      }
      c.result_rows = n0 / L + (rank < n0 % L ? 1 : 0);
      char* out = result(static_cast<size_t>(mine) * es);
      if (mine > 0) {
        for (int j = 0; j < L; ++j) srcs[j] = ll->payload(j) + static_cast<size_t>(off) * es;
        comm::reduce_sources(c.dtype, op, srcs, L, out, static_cast<size_t>(mine));
        if (c.op == ReduceOp::Average) comm::divide(c.dtype, out, static_cast<size_t>(mine), L);
      }
      break;
    }
    case CollectiveKind::Barrier: break;
  }
  if (!release.finish())  // our input must stay as it is until every peer has read it
    throw DistributedError(detail::concat("aimass.dist: ", collective_kind_name(c.kind), " '", c.name,
                                          "': a peer rank did not finish reading this rank's data within ", deadline,
                                          " s: it has died or stopped (raise AIMASS_COMM_TIMEOUT if it is only slow)"));
}

void CollectiveEngine::set_ll_max_bytes(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.ll_max_bytes = bytes;
}

size_t CollectiveEngine::ll_slot_bytes() const { return impl_->ll ? impl_->ll->slot_bytes() : 0; }
bool CollectiveEngine::ll_maps_peers() const { return impl_->ll && impl_->ll->maps_peers(); }

}  // namespace aimass
