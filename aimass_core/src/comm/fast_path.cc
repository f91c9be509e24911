// The engine's fast path: a blocking collective small enough for the low-latency channel
// (comm/ll_shm.h) runs in the caller's thread when this rank's engine and every peer's are
// idle. Anything irregular (a peer busy in its engine, slow, stopped or dead; arguments
// that differ) aborts the attempt on every rank and the request goes through the engine's
// negotiation, which reports mismatches and applies the deadlines.
#include <cstdlib>

#include "comm/engine_impl.h"

namespace aimass {

namespace comm {

void ll_options_from_env(EngineOptions& o) {
  if (const char* v = std::getenv("AIMASS_LL_MAX_BYTES")) {
    char* end = nullptr;
    long long b = std::strtoll(v, &end, 10);
    AIMASS_CHECK(end != v && b >= 0 && b <= (64ll << 20), ValueError,
                 "AIMASS_LL_MAX_BYTES must be a byte count in [0, 64 MiB] (0 disables the low-latency channel), "
                 "got '", v, "'");
    o.ll_max_bytes = static_cast<size_t>(b);
  }
  if (const char* v = std::getenv("AIMASS_LL_FALLBACK_MS")) {
    char* end = nullptr;
    double ms = std::strtod(v, &end);
    AIMASS_CHECK(end != v && ms > 0 && ms <= 60000, ValueError,
                 "AIMASS_LL_FALLBACK_MS must be a number of milliseconds in (0, 60000], got '", v, "'");
    o.ll_fallback_s = ms / 1000.0;
  }
}

namespace {
struct Fnv {
  uint64_t h = 1469598103934665603ull;
  void bytes(const void* p, size_t n) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    for (size_t i = 0; i < n; ++i) h = (h ^ c[i]) * 1099511628211ull;
  }
  void i64(int64_t v) { bytes(&v, sizeof v); }
};
}  // namespace

uint64_t ll_signature_hash(const CollectiveRequest& r) {
  Fnv f;
  f.bytes(r.name.data(), r.name.size());
  f.i64(-1);  // ends the name
  f.i64(static_cast<int64_t>(r.kind));
  f.i64(static_cast<int64_t>(r.dtype));
  f.i64(static_cast<int64_t>(r.wire));
  f.i64(static_cast<int64_t>(r.op));
  f.i64(r.kind == CollectiveKind::Broadcast ? r.root : 0);
  f.i64(static_cast<int64_t>(r.shape.size()));
  for (size_t i = r.kind == CollectiveKind::Allgather ? 1 : 0; i < r.shape.size(); ++i) f.i64(r.shape[i]);
  return f.h;
}

}  // namespace comm

void CollectiveEngine::Impl::ll_init() {
  // collective even when disabled here: LLChannel's constructor agrees across ranks
  ll = std::make_unique<comm::LLChannel>(*comm, opts.ll_max_bytes, opts.timeout_s);
  if (!ll->available()) ll.reset();
}

// The largest single-copy broadcast/allgather payload per rank the caller's thread runs (one
// process_vm_readv per peer). Bigger ones go to the engine, whose single-copy paths read in
// L2-sized chunks: measured here (2 ranks, loaded 2-core VM) the caller's thread won at 1 MiB
// (0.96x/1.01x mpi4py against 0.28x/0.16x through the engine), the engine at 16 MiB (2.5-3x
// against 1.0-1.2x); the 4 MiB boundary between them is not tuned.
constexpr size_t kByAddressMaxBytes = size_t(4) << 20;

bool CollectiveEngine::Impl::try_fast(const CollectiveRequest& r, CollectiveHandle& h) {
  if (!ll || r.wire != r.dtype) return false;
  const size_t es = dtype_size(r.dtype);
  const int64_t n = numel_of(r.shape);
  const size_t nbytes = static_cast<size_t>(n) * es;
  // Broadcast and allgather of kCmaMin bytes or more are single-copy where the kernel allows it
  // (peers read our input itself): the slot does not bound them, only kByAddressMaxBytes.
  const bool by_address = (r.kind == CollectiveKind::Broadcast || r.kind == CollectiveKind::Allgather) &&
                          ll->cma_available() && nbytes >= comm::LLChannel::kCmaMin;
  if (nbytes > (by_address ? kByAddressMaxBytes : ll->slot_bytes())) return false;
  const void* post = r.input;
  size_t post_bytes = nbytes;
  int64_t rows = 0;
  switch (r.kind) {
    case CollectiveKind::Broadcast:
      if (rank != r.root) post_bytes = 0;
      break;
    case CollectiveKind::Allgather: rows = r.shape.empty() ? 1 : r.shape[0]; break;
    case CollectiveKind::Barrier: post_bytes = 0; break;
    default: break;
  }
  std::unique_lock<std::mutex> fl(fast_mu, std::try_to_lock);
  if (!fl.owns_lock()) return false;  // another thread of this rank is in the channel
  double deadline;
  {
    std::lock_guard<std::mutex> lk(mu);
    deadline = opts.timeout_s;
    // queued work first (and every error the engine path reports: broken, stopped, poisoned)
    if (opts.ll_max_bytes == 0 || (!by_address && nbytes > opts.ll_max_bytes) || !inflight.empty() || !incoming.empty() || !broken.empty() ||
        waker->stalled.load() || stop_requested || !running || poisoned.count(r.name))
      return false;
  }
  const double fallback = opts.ll_fallback_s;
  if (ll->exchange(comm::ll_signature_hash(r), post, post_bytes, rows, fallback, by_address) !=
      comm::LLChannel::Result::Complete) {
    std::lock_guard<std::mutex> lk(mu);
    ++st.ll_fallbacks;
    return false;
  }
  struct Release {  // the peers may reuse our slot once we stop reading theirs, and our input
    comm::LLChannel* c;  // once they stopped reading it (bounded: on the error path only)
    double deadline;
    bool armed = true;
    ~Release() {
      if (!armed) return;
      c->done();
      c->wait_readers(deadline);
    }
  } release{ll.get(), deadline};
  const int L = size;
  const ReduceOp op = r.op == ReduceOp::Average ? ReduceOp::Sum : r.op;
  const char* srcs[comm::LLChannel::kMaxRanks];
  switch (r.kind) {
    case CollectiveKind::Allreduce:
      if (n > 0) {
        for (int j = 0; j < L; ++j) srcs[j] = ll->payload(j);  // rank order: the same bits on every rank
        comm::reduce_sources(r.dtype, op, srcs, L, static_cast<char*>(r.output), static_cast<size_t>(n));
        if (r.op == ReduceOp::Average) comm::divide(r.dtype, static_cast<char*>(r.output), static_cast<size_t>(n), L);
      }
      break;
    case CollectiveKind::Broadcast:
      if (nbytes > 0) {
        if (rank == r.root) {
          if (r.output != r.input) std::memcpy(r.output, r.input, nbytes);
        } else {
          ll->read(r.root, 0, r.output, nbytes);
        }
      }
      break;
    case CollectiveKind::Allgather: {
      int64_t row = static_cast<int64_t>(es);
      for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
      int64_t total_rows = 0;
      for (int j = 0; j < L; ++j) {
        AIMASS_CHECK(static_cast<int64_t>(ll->bytes(j)) == ll->rows(j) * row, DistributedError,
                     "aimass.dist: low-latency allgather '", r.name, "': rank ", j, " posted ", ll->bytes(j),
                     " bytes for ", ll->rows(j), " rows (internal error)");
        total_rows += ll->rows(j);
      }
      h.result_.resize(static_cast<size_t>(total_rows * row));
      size_t at = 0;
      for (int j = 0; j < L; ++j) {  // this rank's own rows straight from its input
        if (j == rank) {
          if (nbytes) std::memcpy(h.result_.data() + at, r.input, nbytes);
        } else {
          ll->read(j, 0, h.result_.data() + at, ll->bytes(j));
        }
        at += ll->bytes(j);
      }
      h.result_shape_ = r.shape.empty() ? std::vector<int64_t>{total_rows} : r.shape;
      h.result_shape_[0] = total_rows;
      break;
    }
    case CollectiveKind::ReduceScatter: {  // the engine's split: dimension 0 in near-equal blocks
      const int64_t n0 = r.shape[0];
      int64_t row = 1;
      for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
      int64_t off = 0, mine = 0;
      for (int i = 0; i <= rank; ++i) {
        const int64_t c = (n0 / L + (i < n0 % L ? 1 : 0)) * row;
        if (i < rank) off += c;
        else mine = c;
      }
      h.result_shape_ = r.shape;
      h.result_shape_[0] = row == 0 ? n0 / L + (rank < n0 % L ? 1 : 0) : mine / row;
      h.result_.resize(static_cast<size_t>(mine) * es + 1);
      if (mine > 0) {
        for (int j = 0; j < L; ++j) srcs[j] = ll->payload(j) + static_cast<size_t>(off) * es;
        comm::reduce_sources(r.dtype, op, srcs, L, reinterpret_cast<char*>(h.result_.data()),
                             static_cast<size_t>(mine));
        if (r.op == ReduceOp::Average)
          comm::divide(r.dtype, reinterpret_cast<char*>(h.result_.data()), static_cast<size_t>(mine), L);
      }
      break;
    }
    case CollectiveKind::Barrier: break;
  }
  release.armed = false;
  ll->done();
  if (!ll->wait_readers(deadline))  // our input must stay as it is until every peer has read it
    throw DistributedError(detail::concat("aimass.dist: ", collective_kind_name(r.kind), " '", r.name,
                                          "': a peer rank did not finish reading this rank's data within ", deadline,
                                          " s: it has died or stopped (raise AIMASS_COMM_TIMEOUT if it is only slow)"));
  {
    std::lock_guard<std::mutex> lk(mu);
    ++st.ll_collectives;
  }
  h.finish(CollectiveHandle::ErrorKind::None, "");
  return true;
}

void CollectiveEngine::set_ll_max_bytes(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.ll_max_bytes = bytes;
}

size_t CollectiveEngine::ll_slot_bytes() const { return impl_->ll ? impl_->ll->slot_bytes() : 0; }

}  // namespace aimass
