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
#include <vector>

#include "aimass/error.h"
#include "comm/cma.h"
#include "comm/host_regions.h"
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
  if (push_tmp_.size() < static_cast<size_t>(L) * piece + 128) push_tmp_.resize(static_cast<size_t>(L) * piece + 128);
  const char* src = static_cast<const char*>(in);
  // the peers' pieces at the same offset within their 64-byte lines as this rank's input, so the reduce
  // kernel, which starts each output on a whole line, loads whole lines from both
  const uintptr_t t0 = (reinterpret_cast<uintptr_t>(push_tmp_.data()) + 63) / 64 * 64;
  char* tmp = reinterpret_cast<char*>(t0 + reinterpret_cast<uintptr_t>(src) % 64);
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
  // every peer's buffers in shared host buffers, mapped here: the pieces reduced with loads and stores in
  // every rank's buffers (reduce_mapped_piece), no kernel copy; else through the kernel below. The same bits.
  push_mapped_ = false;
  if (map_ok_) {
    const size_t nbytes = static_cast<size_t>(count) * es;
    const char* mins[kMaxRanks];
    char* mouts[kMaxRanks];
    bool all = true;
    peer_maps_.next_run();
    for (int j = 0; j < L && all; ++j) {
      if (j == me) {
        mins[j] = src;
        mouts[j] = dst;
        continue;
      }
      const RegionRef* refs = posted_regions(j);
      mins[j] = peer_maps_.translate(pid[j], refs[0], rin[j], nbytes);
      mouts[j] = peer_maps_.translate(pid[j], refs[1], rout[j], nbytes);
      all = mins[j] != nullptr && mouts[j] != nullptr;
    }
    if (all) {
      const char* pin[kMaxRanks];
      char* pout[kMaxRanks];
      for (;;) {
        const int64_t k = static_cast<int64_t>(claims.fetch_add(1, std::memory_order_relaxed) - base);
        if (k >= npieces) break;
        const int64_t lo = k * step;
        const size_t n = static_cast<size_t>(std::min(step, count - lo)), off = static_cast<size_t>(lo) * es;
        for (int j = 0; j < L; ++j) {
          pin[j] = mins[j] + off;
          pout[j] = mouts[j] + off;
        }
        reduce_mapped_piece(dtype, op, me, L, pin, pout, n, average, L, tmp + static_cast<size_t>(me) * piece, srcs);
      }
      push_mapped_ = true;
      return;
    }
  }
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

void LLChannel::stage_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count,
                                double deadline_s) {
  AIMASS_CHECK(stage_ != nullptr, DistributedError,
               "aimass.dist: staged allreduce without a staging area (internal error)");
  stage_->set_timeout(deadline_s);
  const std::vector<ShmSegment> segs{{static_cast<const char*>(in), static_cast<char*>(out), count, average}};
  stage_->run(segs, count, dtype, op, size_, {}, stage_lead(dtype_size(dtype)));
}

namespace {
// The exchange's `rows` of a large allreduce: the vote in the low byte, and in the next byte where the
// rank's output starts within its 64-byte line, plus 1 (0: not posted; AIMASS_LL_STAGE_ALIGN=0).
constexpr int64_t kVoteMask = 0xff;
constexpr int kAlignShift = 8;
}  // namespace

// The staged run's lead (ShmAllreduce::run): when every rank's output starts at the same offset within
// a 64-byte line (numpy's large arrays start 16 bytes into a page on every rank), that offset in
// elements; else 0. From the completed attempt's slots: the same on every rank.
int64_t LLChannel::stage_lead(size_t es) const {
  const int64_t code = (rows(0) >> kAlignShift) & 0xff;
  for (int j = 1; j < size_; ++j)
    if (((rows(j) >> kAlignShift) & 0xff) != code) return 0;
  if (code == 0) return 0;
  const size_t off = static_cast<size_t>(code - 1);
  return off % es == 0 ? static_cast<int64_t>(off / es) : 0;
}

namespace {
int size_class(size_t bytes, int classes) {
  int c = 0;
  while (c + 1 < classes && (bytes >> (c + 1)) != 0) ++c;
  return c;
}
// votes posted as the exchange's `rows`
// (kVoteMapped: push, and no exploration: the output lives in a shared host buffer that the peers map)
constexpr int64_t kVoteStaged = 0, kVotePush = 1, kVoteNever = 2, kVoteAlways = 3, kVoteMapped = 4;
constexpr double kStageMargin = 1.1;
}  // namespace

int64_t LLChannel::stage_vote(size_t bytes, const void* out) const {
  const int64_t where =
      stage_align_ && out ? static_cast<int64_t>(reinterpret_cast<uintptr_t>(out) % 64 + 1) << kAlignShift : 0;
  // an output in a shared host buffer that the peers map: the push, which reduces it in their mappings (a
  // staged run would copy it through the segment and wait at each chunk for a descheduled peer)
  RegionRef ref;
  if (map_ok_ && out && staged_env_ != 1 && find_shared_region(out, bytes, &ref)) return where | kVoteMapped;
  return where | vote(bytes);
}

int64_t LLChannel::vote(size_t bytes) const {
  if (!stage_ || staged_env_ == 0) return kVoteNever;
  if (staged_env_ == 1 || !push_ok_) return kVoteAlways;
  // not timed yet: staged first, then the push; then staged when 1.1x faster (the medians of the last 5
  // runs forget a stalled staged run; under contention the staged run loses by 3-4x, past any margin;
  // at 1.25 a 16 MiB staged 1.30 ms against a push 1.63 ms chose the push, whose steady state was 2.1 ms)
  return timings_.prefers_staged(size_class(bytes, kClasses), kStageMargin) ? kVoteStaged : kVotePush;
}

bool LLChannel::agree_staged() {
  bool never = false, always = false, push = false, mapped = false;
  for (int j = 0; j < size_; ++j) {
    const int64_t v = rows(j) & kVoteMask;
    never |= v == kVoteNever;
    always |= v == kVoteAlways;
    push |= v == kVotePush || v == kVoteMapped;
    mapped |= v == kVoteMapped;
  }
  const uint64_t k = large_calls_++;
  if (never) staged_now_ = false;
  else if (always) staged_now_ = true;
  else if (mapped) staged_now_ = false;  // never explored: a staged run would copy a mapped buffer through the segment
  else staged_now_ = (k % kExplore >= kExplore - kExploreBurst) ? push : !push;  // (explore: the way not preferred)
  // Staged, no peer reads this rank's buffers (they read its staged copies in the segment): nothing
  // to wait for after the run, neither on success nor after a failure (a dead peer never clears its
  // reading word, so that wait would add a second deadline to the staged run's own).
  if (staged_now_) by_address_ = false;
  return staged_now_;
}

void LLChannel::large_allreduce(DType dtype, ReduceOp op, bool average, const void* in, void* out, int64_t count,
                                double deadline_s) {
  // The timing starts when the attempt completed (its last arrival), not when this rank got here: a rank
  // that was off its CPU while its peer claimed every piece (two ranks on one CPU, see step_off_from)
  // comes here late and finds the work done, and would time the push at a fraction of what it cost.
  const Clock::time_point now = Clock::now();
  int64_t last = 0;
  for (int j = 0; j < size_; ++j) last = std::max(last, slot(j, attempt_)->arrived_ns);
  const Clock::time_point completed{std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(last))};
  timing_ = std::min(now, completed);
  timed_bytes_ = static_cast<size_t>(count) * dtype_size(dtype);
  push_mapped_ = false;  // (set by a push that reduced in the peers' mappings; a staged run never does)
  if (staged_now_) stage_allreduce(dtype, op, average, in, out, count, deadline_s);
  else push_allreduce(dtype, op, average, in, out, count);
}

// The time counts from the attempt's completion (large_allreduce) to the end of the closing wait
// (wait_readers()): the push's last claim comes well before its peers finished theirs, the staged run
// ends when this rank gathered its last chunk.
void LLChannel::note_large_allreduce() const {
  if (timed_bytes_ == 0) return;
  post_cpu();  // where this rank is when it leaves: the next exchange's waiter compares it (step_off_from)
  const double spb =
      std::chrono::duration<double>(Clock::now() - timing_).count() / static_cast<double>(timed_bytes_);
  timings_.note(staged_now_ ? timings_.kStaged : timings_.kSingleCopy, size_class(timed_bytes_, kClasses), spb);
  timed_bytes_ = 0;
}

}  // namespace comm
}  // namespace aimass
