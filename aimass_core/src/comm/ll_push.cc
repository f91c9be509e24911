// The low-latency channel's single-copy allreduce (see LLChannel::push_allreduce in ll_shm.h).
//
// Why in the caller's thread: through the engine a 16 MiB allreduce pays a thread hand-off, a
// negotiation round and the wake-up of the waiting caller on every rank (on a 2-core machine
// the engine thread and the caller also compete for the core), for a data phase that is the
// same claimed-piece push as the engine's (comm/shm_cma.cc, run_cma_steal). Here the channel's
// exchange() is the agreement (same signature on every rank, every engine idle), the posted
// addresses are the address table, and its done()/wait_readers() the closing barrier.
#include <sys/uio.h>

#include <algorithm>
#include <cstring>

#include "aimass/error.h"
#include "comm/cma.h"
#include "comm/ll_shm.h"
#include "comm/shm_allreduce.h"

namespace aimass {
namespace comm {

void LLChannel::push_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count) {
  const int L = size_, me = rank_;
  const size_t es = dtype_size(dtype);
  const size_t piece = push_piece_bytes(static_cast<size_t>(count) * es, L);  // bytes per peer in push_tmp_
  const int64_t step = static_cast<int64_t>(piece / es);
  const int64_t npieces = (count + step - 1) / step;
  if (push_tmp_.size() < static_cast<size_t>(L) * piece) push_tmp_.resize(static_cast<size_t>(L) * piece);
  char* tmp = push_tmp_.data();
  const char* src = static_cast<const char*>(in);
  char* dst = static_cast<char*>(out);
  pid_t pid[kMaxRanks];
  uint64_t rin[kMaxRanks], rout[kMaxRanks];
  for (int j = 0; j < L; ++j) {
    const Header* h = slot(j, attempt_);
    pid[j] = static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed));
    rin[j] = h->addr;
    rout[j] = h->out;
    AIMASS_CHECK(j == me || (rin[j] != 0 && rout[j] != 0), DistributedError,
                 "aimass.dist: single-copy allreduce: rank ", j, " posted no buffers (internal error)");
  }
  // Every rank makes exactly one failed claim per allreduce, and none claims before every rank
  // arrived in this attempt (so finished the previous one): the next allreduce's claims start here.
  std::atomic<uint64_t>& claims = ctl(0)->claims;
  const uint64_t base = push_base_;
  push_base_ = base + static_cast<uint64_t>(npieces) + static_cast<uint64_t>(L);
  const char* srcs[kMaxRanks];
  for (;;) {
    const int64_t k = static_cast<int64_t>(claims.fetch_add(1, std::memory_order_relaxed) - base);
    if (k >= npieces) break;
    const int64_t lo = k * step;
    const size_t n = static_cast<size_t>(std::min(step, count - lo)), nb = n * es, off = static_cast<size_t>(lo) * es;
    for (int j = 0; j < L; ++j) {  // the piece of every peer's input, into the L2
      if (j == me) continue;
      iovec l{tmp + static_cast<size_t>(j) * piece, nb};
      iovec r{reinterpret_cast<void*>(rin[j] + off), nb};
      cma_read(pid[j], &l, &r, 1, "single-copy allreduce", "rank", j);
    }
    // in rank order, into the own output (or through the own tmp slot): the same bits on every rank
    reduce_rank_order(dtype, op, me, L, src + off, [&](int j) { return tmp + static_cast<size_t>(j) * piece; },
                      dst + off, n, average, L, tmp + static_cast<size_t>(me) * piece, srcs);
    for (int jj = 1; jj < L; ++jj) {  // the reduced piece, still in the L2, into every peer's output
      const int j = (me + jj) % L;
      iovec l{dst + off, nb};
      iovec r{reinterpret_cast<void*>(rout[j] + off), nb};
      cma_write(pid[j], &l, &r, 1, "single-copy allreduce", "rank", j);
    }
  }
}

}  // namespace comm
}  // namespace aimass
