// Broadcast, allgather and reduce-scatter through the node's shared-memory segment (see
// shm_allreduce.h). They reuse the allreduce's staging rings and sequence counters, so any
// mix of collectives runs in one sequence numbering: chunk s of whatever collective uses
// staging slot s % kDepth, and a slot is only rewritten once every peer has read it.
//
//   broadcast       the root copies chunk c into its staging slot; every other rank copies
//                   it out (the root runs up to kDepth chunks ahead). Single copy: see shm_cma.cc.
//   exchange        one step posts a value per rank (its control line's `info`): allgather's
//                   row counts, without an MPI round.
//   allgather       each rank stages chunk c of its own rows while copying the peers'
//                   chunk c-1 out of their slots into the result.
//   reduce_scatter  each rank stages, per step, a piece of every peer's block into its slot;
//                   each rank reduces its own block from its input and the peers' pieces
//                   straight into its output (SIMD; average folded in).
// Every wait has the deadline of the allreduce (wait_counter), and a rank that fails marks
// itself aborted so its peers fail at once instead of waiting for the timeout.
#include <algorithm>
#include <cstring>

#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "comm/shm_allreduce.h"

namespace aimass {
namespace comm {

void ShmAllreduce::wait_peers(int which, uint64_t target) {
  for (int jj = 1; jj < lsize_; ++jj) wait_counter((lrank_ + jj) % lsize_, which, target);
}

void ShmAllreduce::mark(uint64_t s, bool staged, bool reduced, bool gathered) {
  Control* c = ctrl(lrank_);
  if (staged) publish(c->staged, s);
  if (reduced) publish(c->reduced, s);
  if (gathered) publish(c->gathered, s);
}

template <typename Fn>
void ShmAllreduce::guarded(Fn&& fn) {
  AIMASS_CHECK(available(), DistributedError,
               "aimass.dist: shared-memory path used without a segment (internal error)");
  try {
    fn();
  } catch (...) {
    abort_here();
    throw;
  }
}

template <typename Stage, typename Consume>
void ShmAllreduce::pipeline(int64_t nsteps, Stage&& stage, Consume&& consume) {
  const uint64_t base = seq_;
  for (int64_t t = 0; t <= nsteps; ++t) {
    if ((t & 15) == 0) pulse(Clock::now());
    if (t < nsteps) stage(t);
    if (t >= 1) consume(t - 1);
  }
  seq_ = base + static_cast<uint64_t>(nsteps);
  mark(seq_, true, true, true);
}

void ShmAllreduce::broadcast(void* data, int64_t bytes, int root) {
  AIMASS_CHECK(root >= 0 && root < lsize_, DistributedError, "aimass.dist: shared-memory broadcast root ", root,
               " is not a local rank (internal error)");
  pushed_ = false;
  if (bytes <= 0 || lsize_ == 1) return;
  if (cma_on_) return guarded([&] { broadcast_cma(data, bytes, root); });
  guarded([&] {
    const int64_t chunk = static_cast<int64_t>(this->chunk());
    const int64_t nchunks = (bytes + chunk - 1) / chunk;
    const uint64_t base = seq_;
    char* p = static_cast<char*>(data);
    const bool is_root = lrank_ == root;
    for (int64_t c = 0; c < nchunks; ++c) {
      if ((c & 15) == 0) pulse(Clock::now());
      const uint64_t s = base + static_cast<uint64_t>(c) + 1;
      const int64_t off = c * chunk, n = std::min(chunk, bytes - off);
      if (is_root) {
        if (s > static_cast<uint64_t>(kDepth)) wait_peers(1, s - kDepth);  // every peer read the slot
        comm::copy_bytes(staging(lrank_, s), p + off, static_cast<size_t>(n));
        mark(s, true, false, false);
      } else {
        wait_counter(root, 0, s);
        comm::copy_bytes(p + off, staging(root, s), static_cast<size_t>(n));
        mark(s, true, true, true);
      }
    }
    seq_ = base + static_cast<uint64_t>(nchunks);
    mark(seq_, true, true, true);
  });
}

std::vector<int64_t> ShmAllreduce::exchange(int64_t value, const void* buffer) {
  std::vector<int64_t> all(lsize_);
  guarded([&] {
    const uint64_t base = seq_, h = base + 1;
    // every peer finished the previous collective (so read the previous `info`) before it is rewritten
    wait_peers(1, base);
    ctrl(lrank_)->info.store(static_cast<uint64_t>(value), std::memory_order_relaxed);
    ctrl(lrank_)->addr.store(reinterpret_cast<uint64_t>(buffer), std::memory_order_relaxed);
    mark(h, true, false, false);
    wait_peers(0, h);
    for (int j = 0; j < lsize_; ++j) all[j] = static_cast<int64_t>(ctrl(j)->info.load(std::memory_order_relaxed));
    seq_ = h;
    exchange_seq_ = h;
    mark(h, true, true, true);
  });
  return all;
}

void ShmAllreduce::allgather(const void* in, const std::vector<int64_t>& rows, int64_t row_bytes, char* out) {
  const int L = lsize_, me = lrank_;
  AIMASS_CHECK(static_cast<int>(rows.size()) == L, DistributedError,
               "aimass.dist: shared-memory allgather needs one row count per local rank (internal error)");
  if (cma_on_ && exchange_seq_ == seq_) return guarded([&] { allgather_cma(in, rows, row_bytes, out); });
  guarded([&] {
    std::vector<int64_t> off(L + 1, 0);
    int64_t most = 0;
    for (int j = 0; j < L; ++j) {
      off[j + 1] = off[j] + rows[j] * row_bytes;
      most = std::max(most, rows[j] * row_bytes);
    }
    const int64_t chunk = static_cast<int64_t>(this->chunk());
    const int64_t nsteps = (most + chunk - 1) / chunk;
    const uint64_t base = seq_;
    const char* src = static_cast<const char*>(in);
    const int64_t mine = rows[me] * row_bytes;
    auto stage = [&](int64_t c) {
      const uint64_t s = base + static_cast<uint64_t>(c) + 1;
      const int64_t lo = c * chunk, n = std::min(chunk, mine - lo);
      if (s > static_cast<uint64_t>(kDepth)) wait_peers(1, s - kDepth);
      if (n > 0) {
        comm::copy_bytes(staging(me, s), src + lo, static_cast<size_t>(n));
        comm::copy_bytes(out + off[me] + lo, src + lo, static_cast<size_t>(n));
      }
      mark(s, true, false, false);
    };
    auto gather = [&](int64_t c) {
      const uint64_t s = base + static_cast<uint64_t>(c) + 1;
      const int64_t lo = c * chunk;
      for (int jj = 1; jj < L; ++jj) {
        const int j = (me + jj) % L;
        const int64_t n = std::min(chunk, rows[j] * row_bytes - lo);
        if (n <= 0) continue;
        wait_counter(j, 0, s);
        comm::copy_bytes(out + off[j] + lo, staging(j, s), static_cast<size_t>(n));
      }
      mark(s, false, true, true);
    };
    pipeline(nsteps, stage, gather);
  });
}

void ShmAllreduce::reduce_scatter(const void* in, const std::vector<int64_t>& counts, char* out, DType dtype,
                                  ReduceOp op, bool average, int world_size) {
  const int L = lsize_, me = lrank_;
  AIMASS_CHECK(static_cast<int>(counts.size()) == L, DistributedError,
               "aimass.dist: shared-memory reduce_scatter needs one count per local rank (internal error)");
  if (cma_on_) return guarded([&] { reduce_scatter_cma(in, counts, out, dtype, op, average, world_size); });
  guarded([&] {
    const size_t es = dtype_size(dtype);
    // per step, a piece of `e` elements of every block: L pieces fill one staging slot;
    // pieces are whole cache lines so no two ranks write one line
    const int64_t unit = std::max<int64_t>(1, 64 / static_cast<int64_t>(es));
    const int64_t e = std::max<int64_t>(unit, static_cast<int64_t>(this->chunk() / es) / L / unit * unit);
    std::vector<int64_t> displ(L + 1, 0);
    int64_t most = 0;
    for (int j = 0; j < L; ++j) {
      displ[j + 1] = displ[j] + counts[j];
      most = std::max(most, counts[j]);
    }
    const int64_t nsteps = (most + e - 1) / e;
    const uint64_t base = seq_;
    const char* src = static_cast<const char*>(in);
    std::vector<const char*> srcs(L);
    auto piece = [&](int j, int64_t t) { return std::max<int64_t>(0, std::min(e, counts[j] - t * e)); };
    auto stage = [&](int64_t t) {
      const uint64_t s = base + static_cast<uint64_t>(t) + 1;
      if (s > static_cast<uint64_t>(kDepth)) wait_peers(1, s - kDepth);
      char* slot = staging(me, s);
      for (int j = 0; j < L; ++j) {
        const int64_t n = piece(j, t);
        if (j == me || n == 0) continue;
        comm::copy_bytes(slot + j * e * es, src + (displ[j] + t * e) * es, static_cast<size_t>(n) * es);
      }
      mark(s, true, false, false);
    };
    auto reduce = [&](int64_t t) {
      const uint64_t s = base + static_cast<uint64_t>(t) + 1;
      const int64_t n = piece(me, t);
      if (n > 0) {
        wait_peers(0, s);
        for (int j = 0; j < L; ++j)
          srcs[j] = j == me ? src + (displ[me] + t * e) * es : staging(j, s) + me * e * es;
        reduce_into(dtype, op, srcs.data(), L, out + t * e * es, static_cast<size_t>(n), average, world_size);
      }
      mark(s, false, true, true);
    };
    pipeline(nsteps, stage, reduce);
  });
}

}  // namespace comm
}  // namespace aimass
