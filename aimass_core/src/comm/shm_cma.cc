// Single-copy ("cma") mode of the shared-memory collectives (see shm_allreduce.h and
// algorithms.h). Each local rank posts the addresses of its buffers (the control line's
// `addr`, or for a fused allreduce an address table in its staging slot) and the peers read
// them with process_vm_readv (Linux cross-memory attach, what Open MPI's smsc/cma does), so
// every byte is copied once, by the rank that needs it, and no rank waits for a peer to be
// scheduled to stage data (robust when ranks outnumber idle cores).
//
//   allreduce       reduce-scatter: each rank reads its slice of every peer's input in
//                   L2-sized chunks into a private buffer and reduces them with its own input
//                   into its output (SIMD; average folded in); on one node each reduced chunk is
//                   then pushed, still in the L2, into every peer's output (process_vm_writev);
//                   across nodes (or AIMASS_SHM_CMA_PUSH=0) the allgather pulls instead: each
//                   rank reads every peer's reduced slice straight from that peer's output.
//   broadcast       the peers read the root's buffer; with claimed pieces (push allowed) the root
//                   also writes the pieces of each receiver's copy that the receiver has not
//                   taken yet.
//   allgather       each rank reads every peer's input (addresses posted by exchange()).
//   reduce_scatter  each rank reads its block of every peer's input and reduces it.
//
// A rank returns only when every peer has finished reading its buffers (counters with the
// deadline). A dead peer makes process_vm_readv fail at once (ESRCH); a stopped one is caught by
// the counter waits' deadline.
#include <sys/uio.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "comm/cma.h"
#include "comm/host_regions.h"
#include "comm/shm_allreduce.h"

namespace aimass {
namespace comm {

namespace {
constexpr size_t kCmaChunk = 256u << 10;  // per peer: the pieces of one step stay in the L2
static_assert(sizeof(RegionRef) == kRegionRefWords * sizeof(uint64_t), "RegionRef is posted as words");
constexpr size_t kMappedBlock = 32u << 10;  // run_mapped's sub-blocks: 8 pages prefetched ahead per buffer

// fn(segment index, element offset inside it, element offset in the concatenation, n) for every
// part of [lo, hi) of the concatenation of segments starting at starts[i] (starts.back(): the total)
template <typename Fn>
void for_pieces(const std::vector<int64_t>& starts, int64_t lo, int64_t hi, Fn&& fn) {
  const size_t nseg = starts.size() - 1;
  size_t idx = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin()) - 1;
  while (lo < hi && idx < nseg) {
    const int64_t n = std::min(hi, starts[idx + 1]) - lo;
    if (n > 0) {
      fn(idx, lo - starts[idx], lo, n);
      lo += n;
    }
    ++idx;
  }
}

void add_iov(std::vector<iovec>& l, std::vector<iovec>& r, char* local, uint64_t remote, size_t n) {
  if (n == 0) return;
  l.push_back({local, n});
  r.push_back({reinterpret_cast<void*>(remote), n});
}

// The iovecs of [lo, hi) of the concatenation: the remote side from column col of a peer's address
// table (0: inputs, 1: outputs), the local side at local(segment, offset in it, offset in the concatenation).
template <typename Local>
void piece_iov(std::vector<iovec>& lv, std::vector<iovec>& rv, const std::vector<int64_t>& starts, const uint64_t* t,
               int col, int64_t lo, int64_t hi, size_t es, Local&& local) {
  lv.clear();
  rv.clear();
  for_pieces(starts, lo, hi, [&](size_t g, int64_t at, int64_t x, int64_t n) {
    add_iov(lv, rv, local(g, at, x), t[2 * g + col] + static_cast<uint64_t>(at) * es, static_cast<size_t>(n) * es);
  });
}
}  // namespace

// In sub-blocks, each preceded by a prefetch of the first line of every page of the next one in every
// buffer: shared memory comes in 4 KiB pages here (shmem THP is off by default), and the hardware prefetchers
// stop at each page boundary, so a plain pass streams at ~2/3 of the speed it has on huge pages (25 MiB
// a + b -> c, one thread: 3.4-3.5 ms min on a memfd against 2.3-2.7 ms on THP memory, 2.3-2.5 ms on the memfd
// with these prefetches). The elements are reduced exactly as in one call.
void reduce_mapped_piece(DType dtype, ReduceOp op, int me, int L, const char* const* ins, char* const* outs, size_t n,
                         bool average, int world, char* res, const char** srcs) {
  const size_t es = dtype_size(dtype), sub = kMappedBlock / es;
  auto pages_ahead = [&](size_t o, size_t nb) {
    for (size_t q = 0; q < nb; q += 4096)
      for (int j = 0; j < L; ++j) {
        __builtin_prefetch(ins[j] + o + q, 0, 3);
        __builtin_prefetch(outs[j] + o + q, 1, 3);
      }
  };
  for (size_t s = 0; s < n; s += sub) {
    const size_t m = std::min(sub, n - s), o = s * es, nb = m * es;
    if (s + m < n) pages_ahead(o + nb, std::min(sub, n - s - m) * es);
    if (L == 2) {  // the own input first, as reduce_rank_order does with two ranks; both outputs in the pass
      srcs[0] = ins[me] + o;
      srcs[1] = ins[1 - me] + o;
      reduce_into(dtype, op, srcs, 2, outs[me] + o, m, average, world, outs[1 - me] + o);
      continue;
    }
    reduce_rank_order(dtype, op, me, L, ins[me] + o, [&](int j) { return ins[j] + o; }, outs[me] + o, m, average,
                      world, res + o, srcs);
    for (int jj = 1; jj < L; ++jj) {
      const int j = (me + jj) % L;
      comm::copy_bytes(outs[j] + o, outs[me] + o, nb);
    }
  }
}

bool ShmAllreduce::probe_cma(int j) {
  return cma_probe(static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed)),
                   ctrl(j)->addr.load(std::memory_order_acquire), 0x5eed0000u + static_cast<uint64_t>(j));
}

void ShmAllreduce::cma_read(int j, iovec* local, iovec* remote, size_t n) {
  comm::cma_read(static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed)), local, remote, n,
                 "shared-memory collective", "local rank", j);
}

void ShmAllreduce::cma_write(int j, iovec* local, iovec* remote, size_t n) {
  comm::cma_write(static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed)), local, remote, n,
                  "shared-memory collective", "local rank", j);
}

// The end of a single-copy collective at sequence h: this rank marks counter `which` (1: it read
// what it needed of the peers' inputs and wrote its pieces; 2: it copied every reduced slice out),
// waits until every peer marked it too (then no peer touches this rank's buffers any more, so they
// may change once this returns), and moves every counter to h.
void ShmAllreduce::finish_cma(uint64_t h, int which) {
  mark(h, false, which == 1, which == 2);
  wait_peers(which, h);
  seq_ = h;
  mark(h, true, true, true);
}

void ShmAllreduce::run_cma(const std::vector<ShmSegment>& segs, int64_t count, DType dtype, ReduceOp op,
                           int world_size, const std::function<void(void*, int64_t)>& cross_reduce) {
  const int L = lsize_, me = lrank_;
  const size_t es = dtype_size(dtype);
  const uint64_t base = seq_, h = base + 1;
  const size_t nseg = segs.size();
  std::vector<int64_t> starts(nseg + 1, 0);
  for (size_t i = 0; i < nseg; ++i) starts[i + 1] = starts[i] + segs[i].count;
  AIMASS_CHECK(starts.back() == count, DistributedError, "aimass.dist: segment sizes do not add up (internal error)");
  // peers write the outputs (push_ok_): on one node from the moment the table is posted (push mode:
  // each reduced piece goes straight into every output), across nodes each final slice after its
  // cross-node step (below)
  pushed_ = push_ok_;
  const bool push = push_ok_ && !cross_reduce;
  // post the address table: (in, out) per segment, in this rank's staging slot for h
  if (h > static_cast<uint64_t>(kDepth)) wait_peers(1, h - kDepth);
  uint64_t* table = reinterpret_cast<uint64_t*>(staging(me, h));
  for (size_t i = 0; i < nseg; ++i) {
    table[2 * i] = reinterpret_cast<uint64_t>(segs[i].in);
    table[2 * i + 1] = reinterpret_cast<uint64_t>(segs[i].out);
  }
  // after it, where each buffer lives when it is in one of this process's shared buffers (ino 0: not)
  if (map_ok_ && push && steal_ok_ && refs_fit(nseg)) {
    RegionRef* refs = reinterpret_cast<RegionRef*>(table + 2 * nseg);
    const size_t es = dtype_size(dtype);
    for (size_t i = 0; i < nseg; ++i) {
      const size_t n = static_cast<size_t>(segs[i].count) * es;
      find_shared_region(segs[i].in, n, &refs[2 * i]);
      find_shared_region(segs[i].out, n, &refs[2 * i + 1]);
    }
  }
  mark(h, true, false, false);
  wait_peers(0, h);
  if (push && steal_ok_) return run_cma_steal(segs, starts, count, dtype, op, world_size, h);
  auto peer_table = [&](int j) { return reinterpret_cast<const uint64_t*>(staging(j, h)); };
  // fn(segment index, element offset inside it, element offset in the concatenation, n)
  auto pieces = [&](int64_t lo, int64_t hi, auto&& fn) { for_pieces(starts, lo, hi, fn); };
  // whole-line slices of the concatenation, one per local rank
  auto slice_of = [&](int j, int64_t* b, int64_t* e) { line_slice(count, es, L, j, b, e); };
  int64_t b, e;
  slice_of(me, &b, &e);
  const int64_t step = static_cast<int64_t>(std::min<size_t>(chunk(), kCmaChunk) / es);
  tmp_.resize(static_cast<size_t>(L) * static_cast<size_t>(step) * es);
  // push mode (decided above, when the table was posted): each reduced chunk goes from the own
  // output, still in the L2, straight into every peer's output
  std::vector<iovec> lv, rv;
  std::vector<const char*> srcs(L);
  // Across nodes, each part of my slice of 1 MiB or more (a tensor's share) takes its own cross-node
  // step in place; the smaller parts are reduced straight into xbuf_ (contiguous, on huge pages), which
  // one more step exchanges in one go, and copied into their tensors after it. Both nodes see the same
  // batch and slices, so they make the same steps in the same order. Measured on 2 x 2 ranks, old and new
  // ways alternating in one job: reducing into the tensors and packing the slice into a 4 KiB-page vector
  // afterwards took ResNet-50's 161 gradients fused 1.24-1.26x as long as packing it into xbuf_ while
  // reducing, and that 1.38x as long as the parts of 1 MiB in place (25 MiB bucket views: 1.26x); every
  // part in place, or from 64 / 256 KiB, measured alike within the noise (0.93-1.10x).
  constexpr int64_t kOwnStepMin = int64_t(1) << 20;
  auto own_step = [&](int64_t n) { return n * static_cast<int64_t>(es) >= kOwnStepMin; };
  size_t packed = 0;
  if (cross_reduce) pieces(b, e, [&](size_t, int64_t, int64_t, int64_t n) { packed += own_step(n) ? 0 : 1; });
  char* xbuf = nullptr;
  std::vector<int64_t> xbase;  // per segment: its element `at` is xbuf element xbase[g] + at (INT64_MIN: not packed)
  if (packed > 1) {
    xbuf = grow_huge(xbuf_, static_cast<size_t>(e - b) * es);
    xbase.assign(nseg, INT64_MIN);
    int64_t cur = 0;
    pieces(b, e, [&](size_t g, int64_t at, int64_t, int64_t n) {
      if (own_step(n)) return;
      xbase[g] = cur - at;
      cur += n;
    });
  }
  auto in_xbuf = [&](size_t g) { return xbuf && xbase[g] != INT64_MIN; };
  auto dst_of = [&](size_t g, int64_t at) {
    return in_xbuf(g) ? xbuf + (xbase[g] + at) * static_cast<int64_t>(es) : segs[g].out + at * es;
  };
  // 1. reduce-scatter: my slice of every peer's input, chunk by chunk, into my output
  for (int64_t lo = b; lo < e; lo += step) {
    pulse(Clock::now());
    const int64_t hi = std::min(e, lo + step);
    for (int j = 0; j < L; ++j) {
      if (j == me) continue;
      const uint64_t* t = peer_table(j);
      char* dst = tmp_.data() + static_cast<size_t>(j) * static_cast<size_t>(step) * es;
      piece_iov(lv, rv, starts, t, 0, lo, hi, es, [&](size_t, int64_t, int64_t x) { return dst + (x - lo) * es; });
      cma_read(j, lv.data(), rv.data(), lv.size());
    }
    pieces(lo, hi, [&](size_t g, int64_t at, int64_t x, int64_t n) {
      const ShmSegment& sg = segs[g];
      // the own input first: in place (in == out) the kernels then never overwrite a source unread
      srcs[0] = sg.in + at * es;
      for (int j = 0, k = 1; j < L; ++j)
        if (j != me) srcs[k++] = tmp_.data() + static_cast<size_t>(j) * static_cast<size_t>(step) * es + (x - lo) * es;
      // across nodes the average comes after the cross-node sum
      reduce_into(dtype, op, srcs.data(), L, dst_of(g, at), static_cast<size_t>(n), sg.average && !cross_reduce,
                  world_size);
    });
    if (!push) continue;
    for (int jj = 1; jj < L; ++jj) {  // the reduced chunk, still in the L2, into every peer's output
      const int j = (me + jj) % L;
      const uint64_t* t = peer_table(j);
      piece_iov(lv, rv, starts, t, 1, lo, hi, es, [&](size_t g, int64_t at, int64_t) { return segs[g].out + at * es; });
      cma_write(j, lv.data(), rv.data(), lv.size());
    }
  }
  if (push) {
    // every peer read my input and wrote its reduced slices into my output
    finish_cma(h, 1);
    return;
  }
  if (cross_reduce && e > b) {
    // the node's sum of my slice, allreduced with the same slice of the other nodes: each large share in
    // place, then the small ones in xbuf_ (the same steps in the same order on both nodes)
    int64_t in_buf = 0;
    pieces(b, e, [&](size_t g, int64_t at, int64_t, int64_t n) {
      if (in_xbuf(g)) in_buf += n;
      else cross_reduce(segs[g].out + at * es, n);
    });
    if (xbuf) {
      cross_reduce(xbuf, in_buf);
      pieces(b, e, [&](size_t g, int64_t at, int64_t, int64_t n) {
        if (in_xbuf(g)) comm::copy_bytes(segs[g].out + at * es, dst_of(g, at), static_cast<size_t>(n) * es);
      });
    }
    pieces(b, e, [&](size_t g, int64_t at, int64_t, int64_t n) {
      if (segs[g].average) divide(dtype, segs[g].out + at * es, static_cast<size_t>(n), world_size);
    });
  }
  // elements [lo, hi) of the concatenation from this rank's outputs into peer j's (write) or from j's
  // into this rank's, a few MiB per call: the heartbeat keeps beating
  auto copy_outputs = [&](int j, int64_t lo, int64_t hi, bool write) {
    const uint64_t* t = peer_table(j);
    for (int64_t at = lo; at < hi; at += 4 * step) {
      pulse(Clock::now());
      piece_iov(lv, rv, starts, t, 1, at, std::min(hi, at + 4 * step), es,
                [&](size_t g, int64_t o, int64_t) { return segs[g].out + o * es; });
      if (write) cma_write(j, lv.data(), rv.data(), lv.size());
      else cma_read(j, lv.data(), rv.data(), lv.size());
    }
  };
  if (pushed_) {  // (across nodes: push mode returned above)
    // 2. allgather by push: my final slice, still in this core's cache, into every peer's output (the
    // caller-thread path's gather, hier_fast.cc); a peer's counter 1 then says it read my input and
    // wrote my output
    for (int jj = 1; jj < L && e > b; ++jj) copy_outputs((me + jj) % L, b, e, true);
    finish_cma(h, 1);
    return;
  }
  mark(h, false, true, false);  // my slice is final, and I read every peer's input
  // 2. allgather: every peer's reduced slice from its output into mine (after it read my input there)
  for (int jj = 1; jj < L; ++jj) {
    const int j = (me + jj) % L;
    int64_t bj, ej;
    slice_of(j, &bj, &ej);
    if (ej <= bj) continue;
    wait_counter(j, 1, h);
    copy_outputs(j, bj, ej, false);
  }
  finish_cma(h, 2);  // every peer copied my slice out: my buffers may change again
}

// Push mode with pieces handed out dynamically: a piece (L2-sized, whole cache lines) of the
// concatenation goes to whichever rank claims it first with a fetch_add on the shared claim counter;
// the claimer reads that piece of every peer's input, reduces it, and writes the result into every
// rank's output. A rank that is descheduled, or slower, leaves its share to the others instead of
// holding every rank at the final wait (the fixed slices of run_cma). In place is safe: one rank
// reads and writes a piece, all its inputs before any output. Every rank reduces in rank order, so
// the bits do not depend on who claimed a piece (with two ranks the own input comes first: a + b is
// b + a bit for bit). The counter only grows: every rank knows where this collective's claims start
// (claim_base_), and a rank claims only after every peer posted this collective's table, i.e. after
// every peer's last, failed claim of the previous collective (each claiming rank makes exactly one).
void ShmAllreduce::run_cma_steal(const std::vector<ShmSegment>& segs, const std::vector<int64_t>& starts,
                                 int64_t count, DType dtype, ReduceOp op, int world_size, uint64_t h) {
  const int L = lsize_, me = lrank_;
  const size_t es = dtype_size(dtype);
  auto peer_table = [&](int j) { return reinterpret_cast<const uint64_t*>(staging(j, h)); };
  auto pieces = [&](int64_t lo, int64_t hi, auto&& fn) { for_pieces(starts, lo, hi, fn); };
  // whole cache lines per piece (chunk() is a multiple of 4 KiB)
  const int64_t step = static_cast<int64_t>(std::min<size_t>(chunk(), kCmaChunk) / es);
  const int64_t npieces = (count + step - 1) / step;
  const size_t slot = static_cast<size_t>(step) * es;
  tmp_.resize(static_cast<size_t>(L) * slot);
  char* res = tmp_.data() + static_cast<size_t>(me) * slot;  // own slot: the reduced piece (L > 2)
  std::atomic<uint64_t>& claims = ctrl(0)->claims;
  claim_base_.resize(static_cast<size_t>(L), 0);
  const uint64_t base = claim_base_[0];
  claim_base_[0] = base + static_cast<uint64_t>(npieces) + static_cast<uint64_t>(L);
  if (map_ok_ && refs_fit(segs.size())) {
    peer_maps_.next_run();
    // every peer's buffers mapped here: plain loads and stores (run_mapped); else the kernel copies below
    const size_t nseg = segs.size();
    std::vector<std::vector<const char*>> ins(static_cast<size_t>(L), std::vector<const char*>(nseg));
    std::vector<std::vector<char*>> outs(static_cast<size_t>(L), std::vector<char*>(nseg));
    bool all = true;
    for (int j = 0; j < L && all; ++j) {
      if (j == me) continue;
      const uint64_t* t = peer_table(j);
      const RegionRef* refs = reinterpret_cast<const RegionRef*>(t + 2 * nseg);
      const pid_t pid = static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed));
      for (size_t g = 0; g < nseg && all; ++g) {
        const size_t n = static_cast<size_t>(segs[g].count) * es;
        ins[j][g] = peer_maps_.translate(pid, refs[2 * g], t[2 * g], n);
        outs[j][g] = peer_maps_.translate(pid, refs[2 * g + 1], t[2 * g + 1], n);
        all = ins[j][g] != nullptr && outs[j][g] != nullptr;
      }
    }
    if (all) return run_mapped(segs, starts, count, dtype, op, world_size, base, ins, outs, h);
  }
  std::vector<iovec> lv, rv;
  std::vector<const char*> srcs(L);
  for (;;) {
    const int64_t k = static_cast<int64_t>(claims.fetch_add(1, std::memory_order_relaxed) - base);
    if (k >= npieces) break;
    pulse(Clock::now());
    const int64_t lo = k * step, hi = std::min(count, lo + step);
    for (int j = 0; j < L; ++j) {
      if (j == me) continue;
      const uint64_t* t = peer_table(j);
      char* dst = tmp_.data() + static_cast<size_t>(j) * slot;
      piece_iov(lv, rv, starts, t, 0, lo, hi, es, [&](size_t, int64_t, int64_t x) { return dst + (x - lo) * es; });
      cma_read(j, lv.data(), rv.data(), lv.size());
    }
    pieces(lo, hi, [&](size_t g, int64_t at, int64_t x, int64_t n) {
      const ShmSegment& sg = segs[g];
      const size_t off = static_cast<size_t>(x - lo) * es;
      reduce_rank_order(dtype, op, me, L, sg.in + at * es,
                        [&](int j) { return tmp_.data() + static_cast<size_t>(j) * slot + off; }, sg.out + at * es,
                        static_cast<size_t>(n), sg.average, world_size, res + off, srcs.data());
    });
    for (int jj = 1; jj < L; ++jj) {  // the reduced piece, still in the L2, into every peer's output
      const int j = (me + jj) % L;
      const uint64_t* t = peer_table(j);
      piece_iov(lv, rv, starts, t, 1, lo, hi, es, [&](size_t g, int64_t at, int64_t) { return segs[g].out + at * es; });
      cma_write(j, lv.data(), rv.data(), lv.size());
    }
  }
  // every piece is claimed; once every peer finished its claims, every output is complete (and
  // every input read)
  finish_cma(h, 1);
}

// run_cma_steal with every peer's buffers mapped into this process (shared host buffers, host_regions.h):
// the claimed piece is reduced straight from every rank's input into every rank's output with loads and
// stores. With two ranks one pass does it (reduce_into's second destination is the peer's output: each
// piece is read once from each input and written once into each output, the fewest bytes an allreduce
// between two private buffers can move); with more, the piece is reduced in rank order into the own output
// (through `res` where the own input is not first) and copied from there, still in the L2, into each
// peer's. The operands and kernels are run_cma_steal's, so are the bits. In place is safe as there: one
// rank reads and writes a piece, and the kernels read every source of an element before writing it.
void ShmAllreduce::run_mapped(const std::vector<ShmSegment>& segs, const std::vector<int64_t>& starts,
                              int64_t count, DType dtype, ReduceOp op, int world_size, uint64_t base,
                              const std::vector<std::vector<const char*>>& ins,
                              const std::vector<std::vector<char*>>& outs, uint64_t h) {
  const int L = lsize_, me = lrank_;
  const size_t es = dtype_size(dtype);
  const int64_t step = static_cast<int64_t>(std::min<size_t>(chunk(), kCmaChunk) / es);
  const int64_t npieces = (count + step - 1) / step;
  tmp_.resize(static_cast<size_t>(step) * es);
  char* res = tmp_.data();
  std::atomic<uint64_t>& claims = ctrl(0)->claims;
  std::vector<const char*> srcs(L), pin(L);
  std::vector<char*> pout(L);
  for (;;) {
    const int64_t k = static_cast<int64_t>(claims.fetch_add(1, std::memory_order_relaxed) - base);
    if (k >= npieces) break;
    pulse(Clock::now());
    const int64_t lo = k * step, hi = std::min(count, lo + step);
    for_pieces(starts, lo, hi, [&](size_t g, int64_t at, int64_t x, int64_t n) {
      const ShmSegment& sg = segs[g];
      const size_t o = static_cast<size_t>(at) * es;
      for (int j = 0; j < L; ++j) {
        pin[j] = (j == me ? sg.in : ins[j][g]) + o;
        pout[j] = (j == me ? sg.out : outs[j][g]) + o;
      }
      reduce_mapped_piece(dtype, op, me, L, pin.data(), pout.data(), static_cast<size_t>(n), sg.average, world_size,
                          res + static_cast<size_t>(x - lo) * es, srcs.data());
    });
  }
  mapped_ = true;
  // every piece is claimed; once every peer finished its claims (its stores are released with its mark),
  // every output is complete and every input read
  finish_cma(h, 1);
}

// Broadcast with claimed pieces: receiver j's copy is cut into chunk-sized pieces handed out by j's claim
// counter; j pulls pieces from the root's buffer (process_vm_readv) while the root pushes the pieces
// nobody claimed yet into j's buffer (process_vm_writev), so two cores copy instead of one and a
// descheduled side leaves its share to the other. The root visits the receivers round-robin.
void ShmAllreduce::broadcast_cma_steal(void* data, int64_t bytes, int root) {
  const int L = lsize_, me = lrank_;
  const uint64_t base = seq_, h = base + 1;
  char* p = static_cast<char*>(data);
  const int64_t step = static_cast<int64_t>(chunk());  // whole pages
  const int64_t npieces = (bytes + step - 1) / step;
  claim_base_.resize(static_cast<size_t>(L), 0);
  std::vector<uint64_t> first(static_cast<size_t>(L));
  for (int j = 0; j < L; ++j) {  // every counter: the receiver and the root claim (one failed claim each)
    first[j] = claim_base_[j];
    if (j != root) claim_base_[j] += static_cast<uint64_t>(npieces) + 2;
  }
  wait_peers(1, base);  // every peer read the previous collective's address
  ctrl(me)->addr.store(reinterpret_cast<uint64_t>(data), std::memory_order_relaxed);
  pushed_ = me != root;  // once posted, a receiver's buffer may be written by the root
  mark(h, true, false, false);
  // every rank posted: each finished the previous collective (its last claims included)
  wait_peers(0, h);
  auto piece = [&](int64_t k, iovec* l, iovec* r, uint64_t remote) {
    const int64_t off = k * step;
    *l = {p + off, static_cast<size_t>(std::min(step, bytes - off))};
    *r = {reinterpret_cast<void*>(remote + static_cast<uint64_t>(off)), l->iov_len};
  };
  if (me == root) {
    std::vector<char> open(static_cast<size_t>(L), 1);
    open[me] = 0;
    for (int left = L - 1; left > 0;) {
      for (int j = 0; j < L; ++j) {
        if (!open[j]) continue;
        const int64_t k = static_cast<int64_t>(ctrl(j)->claims.fetch_add(1, std::memory_order_relaxed) - first[j]);
        if (k >= npieces) {
          open[j] = 0;
          --left;
          continue;
        }
        pulse(Clock::now());
        iovec l, r;
        piece(k, &l, &r, ctrl(j)->addr.load(std::memory_order_relaxed));
        cma_write(j, &l, &r, 1);
      }
    }
    mark(h, false, false, true);  // every piece the root took is in its receiver's buffer
    wait_peers(1, h);             // every receiver finished reading the root's buffer
  } else {
    const uint64_t src = ctrl(root)->addr.load(std::memory_order_relaxed);
    for (;;) {
      const int64_t k = static_cast<int64_t>(ctrl(me)->claims.fetch_add(1, std::memory_order_relaxed) - first[me]);
      if (k >= npieces) break;
      pulse(Clock::now());
      iovec l, r;
      piece(k, &l, &r, src);
      cma_read(root, &l, &r, 1);
    }
    mark(h, false, true, false);  // done reading the root's buffer
    wait_counter(root, 2, h);     // the root's pieces are in this buffer
  }
  seq_ = h;
  mark(h, true, true, true);
}

void ShmAllreduce::broadcast_cma(void* data, int64_t bytes, int root) {
  if (steal_ok_) return broadcast_cma_steal(data, bytes, root);
  const uint64_t base = seq_, h = base + 1;
  char* p = static_cast<char*>(data);
  if (lrank_ == root) {
    wait_peers(1, base);  // every peer read the previous collective's address
    ctrl(lrank_)->addr.store(reinterpret_cast<uint64_t>(data), std::memory_order_relaxed);
    mark(h, true, false, false);
    wait_peers(1, h);
  } else {
    wait_counter(root, 0, h);
    const uint64_t src = ctrl(root)->addr.load(std::memory_order_relaxed);
    const int64_t step = static_cast<int64_t>(std::max<size_t>(chunk(), 1u << 20));
    for (int64_t off = 0; off < bytes; off += step) {
      pulse(Clock::now());
      iovec l{p + off, static_cast<size_t>(std::min(step, bytes - off))};
      iovec r{reinterpret_cast<void*>(src + static_cast<uint64_t>(off)), l.iov_len};
      cma_read(root, &l, &r, 1);
    }
  }
  seq_ = h;
  mark(h, true, true, true);
}

void ShmAllreduce::allgather_cma(const void* in, const std::vector<int64_t>& rows, int64_t row_bytes, char* out) {
  const int L = lsize_, me = lrank_;
  const uint64_t h = seq_;  // the exchange() step posted every rank's input address
  int64_t at = 0;
  const int64_t step = static_cast<int64_t>(std::max<size_t>(chunk(), 1u << 20));
  for (int j = 0; j < L; ++j) {
    const int64_t n = rows[j] * row_bytes;
    if (j == me) {
      if (n > 0) comm::copy_bytes(out + at, in, static_cast<size_t>(n));
    } else {
      const uint64_t src = ctrl(j)->addr.load(std::memory_order_relaxed);
      for (int64_t off = 0; off < n; off += step) {
        pulse(Clock::now());
        iovec l{out + at + off, static_cast<size_t>(std::min(step, n - off))};
        iovec r{reinterpret_cast<void*>(src + static_cast<uint64_t>(off)), l.iov_len};
        cma_read(j, &l, &r, 1);
      }
    }
    at += n;
  }
  finish_cma(h + 1, 1);  // every peer read my input
}

void ShmAllreduce::reduce_scatter_cma(const void* in, const std::vector<int64_t>& counts, char* out, DType dtype,
                                      ReduceOp op, bool average, int world_size) {
  const int L = lsize_, me = lrank_;
  const size_t es = dtype_size(dtype);
  const uint64_t base = seq_, h = base + 1;
  wait_peers(1, base);
  ctrl(me)->addr.store(reinterpret_cast<uint64_t>(in), std::memory_order_relaxed);
  mark(h, true, false, false);
  wait_peers(0, h);
  int64_t start = 0;
  for (int j = 0; j < me; ++j) start += counts[j];
  const int64_t step = static_cast<int64_t>(std::min<size_t>(chunk(), kCmaChunk) / es);
  tmp_.resize(static_cast<size_t>(L) * static_cast<size_t>(step) * es);
  std::vector<const char*> srcs(L);
  const char* src = static_cast<const char*>(in);
  for (int64_t lo = 0; lo < counts[me]; lo += step) {
    pulse(Clock::now());
    const int64_t n = std::min(step, counts[me] - lo);
    srcs[0] = src + (start + lo) * es;
    for (int j = 0, k = 1; j < L; ++j) {
      if (j == me) continue;
      char* dst = tmp_.data() + static_cast<size_t>(j) * static_cast<size_t>(step) * es;
      iovec l{dst, static_cast<size_t>(n) * es};
      iovec r{reinterpret_cast<void*>(ctrl(j)->addr.load(std::memory_order_relaxed) +
                                      static_cast<uint64_t>(start + lo) * es),
              l.iov_len};
      cma_read(j, &l, &r, 1);
      srcs[k++] = dst;
    }
    reduce_into(dtype, op, srcs.data(), L, out + lo * es, static_cast<size_t>(n), average, world_size);
  }
  finish_cma(h, 1);  // every peer read its block of my input
}

}  // namespace comm
}  // namespace aimass
