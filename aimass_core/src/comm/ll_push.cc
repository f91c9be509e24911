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
  // in place into the own output when the own input comes first in rank order (with two ranks
  // a op b is b op a bit for bit), else into the own tmp slot, then copied
  const bool own_first = L == 2 || me == 0;
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
    if (own_first) {  // in place the kernels never overwrite a source unread: the own input is srcs[0]
      srcs[0] = src + off;
      for (int j = 0, i = 1; j < L; ++j)
        if (j != me) srcs[i++] = tmp + static_cast<size_t>(j) * piece;
      reduce_into(dtype, op, srcs, L, dst + off, n, average, L);
    } else {
      for (int j = 0; j < L; ++j) srcs[j] = j == me ? src + off : tmp + static_cast<size_t>(j) * piece;
      char* res = tmp + static_cast<size_t>(me) * piece;
      reduce_into(dtype, op, srcs, L, res, n, average, L);
      std::memcpy(dst + off, res, nb);
    }
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
