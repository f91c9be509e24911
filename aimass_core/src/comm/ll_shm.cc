// Low-latency shared-memory channel (see ll_shm.h).
#include "comm/ll_shm.h"
#include "aimass/comm_kernels.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <new>
#include <thread>

#include "aimass/error.h"
#include "comm/cma.h"
#include "comm/cpu_share.h"
#include "comm/shm_allreduce.h"
#include "comm/shm_segment.h"
#include "runtime/env_switch.h"

namespace aimass {
namespace comm {

namespace {
constexpr double kBusyGraceS = 1e-3;
using ll_wait::Backoff;
using ll_wait::cpu_relax;
}  // namespace

size_t LLChannel::stage_offset(int size, size_t slot_bytes) {
  const size_t slot = (slot_bytes + 127) / 128 * 128;
  const size_t end = kHeadBytes + 128 * static_cast<size_t>(size) + static_cast<size_t>(size) * 2 * (128 + slot) +
                     sizeof(EagerCtl) * static_cast<size_t>(size) +
                     kRing * (sizeof(EagerEntry) + eager_bytes_for(slot_bytes));
  return (end + 4095) / 4096 * 4096;
}

// The staged allreduce's chunk (every rank's slices of it together): 512 KiB at 2 ranks (a 256 KiB
// slice per rank and step, so a step's staged, reduced and gathered data stay in the 1 MiB L2 of a
// core), smaller with many ranks so the area ((size + 1) x 4 chunks) stays within 16 MiB.
size_t LLChannel::stage_chunk(int size) {
  const size_t c = size_t(512) << 10;
  const size_t cap = (size_t(16) << 20) / (static_cast<size_t>(size + 1) * ShmAllreduce::kDepth);
  return std::max<size_t>(64u << 10, std::min(c, cap) / 4096 * 4096);
}

size_t LLChannel::segment_bytes(int size, size_t slot_bytes) {
  return stage_offset(size, slot_bytes) + ShmAllreduce::segment_bytes(size, stage_chunk(size));
}

void LLChannel::attach(void* memory, size_t slot_bytes) {
  base_ = static_cast<char*>(memory);
  slot_bytes_ = (slot_bytes + 127) / 128 * 128;
  eager_bytes_ = eager_bytes_for(slot_bytes);
  full_ = (uint64_t(1) << size_) - 1;
  if (const char* v = std::getenv("AIMASS_LL_STAGED")) {
    const std::string e(v);
    AIMASS_CHECK(e == "0" || e == "1" || e == "auto", ValueError, "AIMASS_LL_STAGED must be 0, 1 or auto, got '", e,
                 "'");
    staged_env_ = e == "auto" ? -1 : e == "1" ? 1 : 0;
  }
  stage_align_ = runtime::env_switch_on("AIMASS_LL_STAGE_ALIGN");
  stage_ = std::make_unique<ShmAllreduce>(rank_, size_, base_ + stage_offset(size_, slot_bytes), stage_chunk(size_),
                                          60.0);
}

LLChannel::LLChannel(int rank, int size, void* memory, size_t slot_bytes) : rank_(rank), size_(size) {
  AIMASS_CHECK(size >= 1 && size <= kMaxRanks && rank >= 0 && rank < size, ValueError, "LLChannel: rank ", rank,
               " of ", size, " is out of range (at most ", kMaxRanks, " ranks)");
  AIMASS_CHECK(memory != nullptr && reinterpret_cast<uintptr_t>(memory) % 128 == 0, ValueError,
               "LLChannel: memory must be non-null and 128-byte aligned");
  attach(memory, slot_bytes);
  post_cpu();  // (before it, the zero-filled word would read as CPU 0)
  ctl(rank_)->pid.store(static_cast<int64_t>(getpid()), std::memory_order_relaxed);  // (allow_cma_for_tests)
}

LLChannel::LLChannel(const Communicator& comm, size_t slot_bytes, double timeout_s)
    : rank_(comm.rank()), size_(comm.size()), timeout_s_(timeout_s) {
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory words need lock-free atomics");
  MPI_Comm world = comm.comm();
  auto allreduce_min = [&](void* v, MPI_Datatype t) {
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, v, 1, t, MPI_MIN, world, &req), "MPI_Iallreduce(ll)");
    wait_mpi(&req, 1.0, timeout_s, "low-latency channel set-up");
  };
  int ok = (comm.cross_size() == 1 && comm.local_size() == size_ && size_ > 1 && size_ <= kMaxRanks &&
            slot_bytes > 0)
               ? 1
               : 0;
  allreduce_min(&ok, MPI_INT);
  if (!ok) return;
  unsigned long long agreed = slot_bytes;  // every rank must lay the segment out alike
  allreduce_min(&agreed, MPI_UNSIGNED_LONG_LONG);
  slot_bytes = static_cast<size_t>(agreed);
  const size_t bytes = segment_bytes(size_, slot_bytes);

  struct {
    int ok;
    char name[60];
  } msg{};
  const bool creator = rank_ == 0;
  void* p = MAP_FAILED;
  if (creator) {
    p = create_shm_segment("aimass-ll", bytes, msg.name, sizeof(msg.name));
    msg.ok = p != MAP_FAILED ? 1 : 0;  // the pages are zero: step 0, nobody reading, no engine busy
  }
  auto cleanup = [&] {
    if (creator && msg.ok) shm_unlink(msg.name);
    if (p != MAP_FAILED) munmap(p, bytes);
  };
  try {
    MPI_Request req;
    check_mpi(MPI_Ibcast(&msg, static_cast<int>(sizeof(msg)), MPI_BYTE, 0, world, &req), "MPI_Ibcast(ll)");
    wait_mpi(&req, 1.0, timeout_s, "low-latency channel set-up");
    if (!creator && msg.ok) p = open_shm_segment(msg.name, bytes);
    int mine = p != MAP_FAILED ? 1 : 0;
    allreduce_min(&mine, MPI_INT);  // after this every rank has mapped it (or given up)
    if (creator && msg.ok) shm_unlink(msg.name);
    if (!mine) {
      if (p != MAP_FAILED) munmap(p, bytes);
      return;
    }
  } catch (...) {
    cleanup();
    throw;
  }
  attach(p, slot_bytes);
  map_bytes_ = bytes;
  owned_ = true;
  post_cpu();  // (before it, the zero-filled word would read as CPU 0)
  // Single copy needs process_vm_readv on every peer (same user, no ptrace restriction): each
  // rank reads every peer's probe word; all must manage (AIMASS_SHM_CMA=0 turns it off).
  probe_ = 0x11c0ffee0000ull + static_cast<uint64_t>(rank_);
  ctl(rank_)->pid.store(static_cast<int64_t>(getpid()), std::memory_order_relaxed);
  ctl(rank_)->probe.store(reinterpret_cast<uint64_t>(&probe_), std::memory_order_seq_cst);
  int posted = 1;
  allreduce_min(&posted, MPI_INT);  // every rank published its probe
  const char* env = std::getenv("AIMASS_SHM_CMA");
  int cma = env && std::string(env) == "0" ? 0 : 1;
  for (int j = 0; j < size_ && cma; ++j)
    if (j != rank_ && !cma_probe(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)),
                                 ctl(j)->probe.load(std::memory_order_seq_cst), 0x11c0ffee0000ull + static_cast<uint64_t>(j)))
      cma = 0;
  allreduce_min(&cma, MPI_INT);  // also: every read probe is done
  cma_ok_ = cma != 0;
  // two ranks that share a CPU step apart (step_off_from); never where the ranks outnumber the CPUs
  step_off_ok_ = runtime::env_switch_on("AIMASS_LL_STEP_OFF") && std::thread::hardware_concurrency() >= 2 &&
                 !cpu_share(comm.local_size()).oversubscribed();
  // the single-copy allreduce also writes the peers' memory: each rank writes every peer's probe
  // word with the value it holds (AIMASS_SHM_CMA_PUSH=0: off)
  const char* penv = std::getenv("AIMASS_SHM_CMA_PUSH");
  int push = cma_ok_ && !(penv && std::string(penv) == "0") ? 1 : 0;
  for (int j = 0; j < size_ && push; ++j)
    if (j != rank_ && !cma_probe_write(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)),
                                       ctl(j)->probe.load(std::memory_order_seq_cst),
                                       0x11c0ffee0000ull + static_cast<uint64_t>(j)))
      push = 0;
  allreduce_min(&push, MPI_INT);  // also: every write probe is done
  push_ok_ = push != 0;
}

LLChannel::~LLChannel() {
  stage_.reset();
  if (base_ && owned_) munmap(base_, map_bytes_);
}

LLChannel::Result LLChannel::exchange(uint64_t hash, const void* data, size_t bytes, int64_t rows,
                                      double fallback_s, bool by_address, void* out) {
  by_address_ = by_address && cma_ok_ && bytes >= kCmaMin;
  AIMASS_CHECK(by_address_ || bytes <= slot_bytes_, ValueError, "LLChannel: ", bytes, " bytes exceed the slot (",
               slot_bytes_, ")");
  std::atomic<uint64_t>& st = step();
  Control* me = ctl(rank_);
  const uint64_t bit = uint64_t(1) << rank_;
  Backoff backoff;  // (an exchange whose peers are there never reads the clock)
  backoff.spin = spin_;
  const double& waited = backoff.waited;
  auto tick = [&] { backoff.pause(backoff.elapsed()); };
  // Two ranks (see "Two ranks" in ll_shm.h): a waiting rank completes from its peer's posted slot, and a
  // rank whose last exchange completed posts its slot for the next attempt before it looks at the step.
  const bool pair = size_ == 2;
  const int peer = 1 - rank_;
  const bool predict = pair && last_complete_;
  last_complete_ = false;

  // ---- arrive
  uint64_t written = UINT64_MAX;  // the attempt whose slot holds our payload
  // Writes this rank's slot for attempt a (posted last); false when a peer still reads the slot's
  // previous attempt after the fallback window (then nothing is posted: the engine runs it).
  auto post = [&](uint64_t a) {
    me->reading.store(a + 1, std::memory_order_seq_cst);  // (announces us to writers of attempt a + 2)
    // a peer may still read its slot of attempt a - 2 (same parity as ours now), unless a - 1
    // completed: every peer arrived in it, so it had left a - 2 (and reading was set to a)
    if (a >= 2 && !(completed_ != UINT64_MAX && completed_ + 1 == a)) {
      for (int j = 0; j < size_; ++j) {
        if (j == rank_) continue;
        while (ctl(j)->reading.load(std::memory_order_seq_cst) == a - 1) {
          tick();
          if (waited > fallback_s) {
            me->reading.store(0, std::memory_order_seq_cst);
            by_address_ = false;
            return false;
          }
        }
      }
    }
    Header* h = slot(rank_, a);
    h->hash = hash;
    h->bytes = bytes;
    h->rows = rows;
    h->addr = by_address_ ? reinterpret_cast<uint64_t>(data) : 0;
    h->out = reinterpret_cast<uint64_t>(out);
    if (out != nullptr) {  // a large allreduce: where the vote's timing starts, and this rank's CPU
      h->arrived_ns = std::chrono::duration_cast<std::chrono::nanoseconds>(Clock::now().time_since_epoch()).count();
      post_cpu();
    }
    if (bytes && !by_address_) comm::copy_bytes(h->data(), data, bytes);
    // a single-copy allreduce: where its input and output live when in a shared host buffer (the unused
    // payload area; ino 0: not), so that the peers can reduce in their mappings (push_allreduce)
    // (and the hierarchical allreduce's staging buffer, set_stage, whatever map_ok_)
    if (by_address_ && out != nullptr && bytes > kInline) {
      RegionRef* refs = reinterpret_cast<RegionRef*>(h->data());
      if (map_ok_) {
        find_shared_region(data, bytes, &refs[0]);
        find_shared_region(out, bytes, &refs[1]);
      }
      if (slot_bytes_ >= (kStageRef + 1) * sizeof(RegionRef) &&
          (stage_p_ == nullptr || !find_shared_region(stage_p_, stage_n_, &refs[kStageRef])))
        refs[kStageRef] = RegionRef{};
    }
    h->posted.store(a + 1, std::memory_order_release);  // last: a pair's waiting peer completes on it
    written = a;
    return true;
  };
  uint64_t w, a = 0;
  if (predict) {
    // The next attempt is most likely completed_ + 1, then closed complete or opened by the peer: post
    // for it and swap the step without reading it first (one transfer of its line instead of two), while
    // the peer's slot for it is on its way here.
    a = completed_ + 1;
    __builtin_prefetch(slot(peer, a), 0, 3);
    if (!post(a)) return Result::Fallback;
    w = (completed_ << 16) | full_;
  } else {
    w = st.load(std::memory_order_seq_cst);
  }
  while (true) {
    if (pair && !closed(w) && completed_ != UINT64_MAX && (w >> 16) == completed_) {
      // the peer's arrival in the attempt this rank completed from the peer's slot is still on its way
      tick();
      if (waited > fallback_s) {
        if (written != UINT64_MAX) {
          // take back the post: the peer completes attempt `written` from it only once the step closed
          slot(rank_, written)->posted.store(0, std::memory_order_seq_cst);
          if ((st.load(std::memory_order_seq_cst) >> 16) != completed_) {  // it closed meanwhile: go on
            slot(rank_, written)->posted.store(written + 1, std::memory_order_release);
            w = st.load(std::memory_order_seq_cst);
            continue;
          }
        }
        me->reading.store(0, std::memory_order_seq_cst);
        by_address_ = false;
        return Result::Fallback;  // the peer stopped between its post and its arrival: the engine decides
      }
      w = st.load(std::memory_order_seq_cst);
      continue;
    }
    a = closed(w) ? (w >> 16) + 1 : (w >> 16);
    const uint64_t next = closed(w) ? (a << 16) | bit : (w | bit);
    if (written != a && !post(a)) return Result::Fallback;
    if (closed(w)) {  // record how the attempt we leave behind ended, for members that missed it
      outcome(w >> 16).store(((w >> 16) << 1) | ((w & kAborted) ? 1 : 0), std::memory_order_seq_cst);
    }
    if (arrival_hook_) arrival_hook_();
    if (st.compare_exchange_weak(w, next, std::memory_order_seq_cst)) break;
  }
  attempt_ = a;
  note_cpu();
  backoff.spin = spin_;

  // ---- wait until complete or aborted
  double busy_since = -1;
  bool looked = out == nullptr;  // a large allreduce looks once whether a missing peer shares our CPU
  while (true) {
    // a pair: the peer posted its slot for this attempt, so it arrives in it (it leaves an attempt it
    // posted for only after taking the post back while the attempt was not yet open, and only this rank
    // could abort it now, which it no longer will). (seq_cst: ordered after a take-back that preceded
    // this attempt's opening; a plain load on x86.)
    if (pair && slot(peer, a)->posted.load(std::memory_order_seq_cst) == a + 1) break;
    w = st.load(std::memory_order_seq_cst);
    if ((w >> 16) != a) {  // it closed and the next attempt started before we looked
      const uint64_t o = outcome(a).load(std::memory_order_seq_cst);
      if ((o >> 1) != a) {  // cannot happen: at most a few attempts pass while a member waits
        me->reading.store(0, std::memory_order_seq_cst);
        throw DistributedError("aimass.dist: low-latency channel lost an attempt's outcome (internal error)");
      }
      if (o & 1) {
        me->reading.store(0, std::memory_order_seq_cst);
        return Result::Fallback;
      }
      break;  // complete
    }
    if (w & kAborted) {
      me->reading.store(0, std::memory_order_seq_cst);
      return Result::Fallback;
    }
    const uint64_t mask = w & kMaskBits;
    if (mask == full_) break;
    bool abort = false, busy = false;
    for (int j = 0; j < size_ && !abort; ++j) {
      if (j == rank_) continue;
      if (mask & (uint64_t(1) << j)) {
        if (slot(j, a)->hash != hash) abort = true;
      } else if (ctl(j)->busy.load(std::memory_order_seq_cst) != 0) {
        busy = true;
      }
    }
    // A missing peer whose engine stays busy for the grace period waits there (maybe for this
    // very collective, or for something this rank has not sent yet): go to the engine too. A
    // shorter spell is a peer still finishing its previous engine collective.
    if (!busy) {
      busy_since = -1;
    } else if (busy_since < 0) {
      busy_since = waited;
    } else if (waited - busy_since > kBusyGraceS) {
      abort = true;
    }
    if (waited > fallback_s) abort = true;
    if (!abort && !looked) {
      looked = true;
      for (int j = 0; j < size_; ++j) {
        if (j == rank_ || (mask & (uint64_t(1) << j))) continue;
        if (step_off_from(j)) {
          backoff.spin = true;  // now on another CPU than that peer
          break;
        }
        if (ctl(j)->cpu.load(std::memory_order_relaxed) == sched_getcpu()) backoff.spin = false;  // (stayed)
      }
    }
    if (abort) {
      // fails only when w changed (someone arrived or aborted): look again
      if (st.compare_exchange_strong(w, w | kAborted, std::memory_order_seq_cst)) {
        me->reading.store(0, std::memory_order_seq_cst);
        return Result::Fallback;
      }
      continue;
    }
    tick();
  }
  // complete: every rank sees the same slots, so every rank decides alike
  completed_ = a;
  for (int j = 0; j < size_; ++j) {
    if (slot(j, a)->hash != hash) {
      me->reading.store(0, std::memory_order_seq_cst);
      return Result::Fallback;
    }
  }
  last_complete_ = true;
  return Result::Complete;
}

void LLChannel::read(int j, size_t offset, void* dst, size_t n) const {
  const Header* h = slot(j, attempt_);
  if (n == 0) return;
  if (!h->addr) {
    comm::copy_bytes(dst, h->data() + offset, n);
    return;
  }
  iovec l{dst, n};
  iovec r{reinterpret_cast<void*>(h->addr + offset), n};
  cma_read(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)), &l, &r, 1, "low-latency collective",
           "rank", j);
}

bool LLChannel::wait_readers(double deadline_s, uint32_t lost) const {
  if (!by_address_) {
    note_large_allreduce();  // (a staged allreduce without the push posts nothing by address)
    return true;
  }
  Backoff backoff;
  bool looked = timed_bytes_ == 0;  // a large allreduce looks once whether a peer still at it shares our CPU
  for (int j = 0; j < size_; ++j) {
    if (j == rank_ || (lost >> j & 1u)) continue;
    while (ctl(j)->reading.load(std::memory_order_seq_cst) == attempt_ + 1) {  // j reads attempt_'s slots
      if (!looked) {
        looked = true;
        // a peer still at it on this very CPU, which we could not leave: do not spin it away from there
        if (!step_off_from(j) && ctl(j)->cpu.load(std::memory_order_relaxed) == sched_getcpu()) backoff.spin = false;
      }
      const double waited = backoff.elapsed();
      // past a millisecond, a peer whose process is gone fails the wait at once (it never clears its word;
      // the mapped push makes no syscall that would see ESRCH): where the cma probe showed its pid valid here
      const pid_t pid = static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed));
      const bool gone = waited > 1e-3 && cma_ok_ && pid > 0 && pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH;
      if (waited > deadline_s || gone) {
        timed_bytes_ = 0;
        return false;
      }
      backoff.pause(waited);
    }
  }
  note_large_allreduce();  // (the staged-or-push choice: ll_push.cc)
  return true;
}

void LLChannel::post_cpu() const {
  const int64_t cpu = sched_getcpu();
  std::atomic<int64_t>& mine = ctl(rank_)->cpu;
  if (mine.load(std::memory_order_relaxed) != cpu) mine.store(cpu, std::memory_order_relaxed);
}

int LLChannel::step_off(int cpu) {
  if (cpu < 0 || cpu >= CPU_SETSIZE || sched_getcpu() != cpu) return -1;
  cpu_set_t mask;
  if (sched_getaffinity(0, sizeof(mask), &mask) != 0 || CPU_COUNT(&mask) < 2 || !CPU_ISSET(cpu, &mask)) return -1;
  cpu_set_t others = mask;
  CPU_CLR(cpu, &others);
  if (sched_setaffinity(0, sizeof(others), &others) != 0) return -1;  // (the kernel moves us off `cpu` here)
  const int now = sched_getcpu();
  sched_setaffinity(0, sizeof(mask), &mask);  // nothing stays pinned: the balancer may place us anew later
  return now;
}

int LLChannel::runnable_threads() {
  const int fd = open("/proc/loadavg", O_RDONLY | O_CLOEXEC);
  if (fd < 0) return -1;
  char buf[128];
  const ssize_t k = ::read(fd, buf, sizeof(buf) - 1);
  close(fd);
  if (k <= 0) return -1;
  buf[k] = '\0';
  const char* p = buf;  // "0.52 0.58 0.59 3/467 12345": the running count before the slash
  for (int field = 0; field < 3 && p; ++field) {
    p = std::strchr(p, ' ');
    if (p) ++p;
  }
  if (!p) return -1;
  char* end = nullptr;
  const long v = std::strtol(p, &end, 10);
  return end != p && *end == '/' && v >= 0 ? static_cast<int>(v) : -1;
}

bool LLChannel::step_off_from(int j) const {
  if (!step_off_ok_) return false;
  const int64_t cpu = ctl(j)->cpu.load(std::memory_order_relaxed);
  if (cpu < 0 || cpu >= CPU_SETSIZE || cpu != sched_getcpu()) return false;
  if (step_off_idle_only_) {  // (only once the peer is seen on our CPU: a file read, ~5 us)
    const int busy = runnable_threads();
    if (busy < 0 || busy > size_) return false;
  }
  if (step_off(static_cast<int>(cpu)) < 0) return false;
  step_offs_.fetch_add(1, std::memory_order_relaxed);
  post_cpu();
  return true;
}

void LLChannel::note_cpu() {
  if ((++exchanges_ & 15) != 1) return;  // every 16th call: whether a peer last arrived from our CPU
  const int64_t cpu = sched_getcpu();    // (each look pulls the peers' lines, so not every time)
  Control* me = ctl(rank_);
  if (me->cpu.load(std::memory_order_relaxed) != cpu) me->cpu.store(cpu, std::memory_order_relaxed);
  spin_ = true;
  for (int j = 0; j < size_; ++j)
    if (j != rank_ && ctl(j)->cpu.load(std::memory_order_relaxed) == cpu) spin_ = false;
}

void LLChannel::read_output(int j, size_t offset, void* dst, size_t n) const {
  if (n == 0) return;
  const Header* h = slot(j, attempt_);
  iovec l{dst, n};
  iovec r{reinterpret_cast<void*>(h->out + offset), n};
  cma_read(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)), &l, &r, 1, "low-latency collective",
           "rank", j);
}

const char* LLChannel::map_stage(int j, size_t offset, size_t n) {
  const RegionRef& ref = posted_stage(j);
  if (ref.ino == 0) return nullptr;
  return peer_maps_.translate(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)), ref, ref.base + offset,
                              n);
}

void LLChannel::read_stage(int j, size_t offset, void* dst, size_t n) const {
  if (n == 0) return;
  iovec l{dst, n};
  iovec r{reinterpret_cast<void*>(posted_stage(j).base + offset), n};
  cma_read(static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed)), &l, &r, 1, "low-latency collective",
           "rank", j);
}

bool LLChannel::write_output(int j, size_t offset, const void* src, size_t n, bool streaming) {
  if (n == 0) return false;
  const Header* h = slot(j, attempt_);
  const pid_t pid = static_cast<pid_t>(ctl(j)->pid.load(std::memory_order_relaxed));
  if (map_ok_) {
    if (char* p = peer_maps_.translate(pid, posted_regions(j)[1], h->out + offset, n)) {
      if (streaming) copy_streaming(p, src, n);
      else comm::copy_bytes(p, src, n);
      return true;
    }
  }
  iovec l{const_cast<void*>(src), n};
  iovec r{reinterpret_cast<void*>(h->out + offset), n};
  cma_write(pid, &l, &r, 1, "low-latency collective", "rank", j);
  return false;
}

uint64_t LLChannel::wait_signal(int j, uint64_t v, double deadline_s, const char* what) const {
  Backoff backoff;
  backoff.spin = spin_;
  while (true) {
    const uint64_t got = ctl(j)->signal.load(std::memory_order_seq_cst);
    if (got >= v) return got;
    const double waited = backoff.elapsed();
    if (waited > deadline_s)
      throw DistributedError(detail::concat("aimass.dist: ", what, ": local rank ", j, " did not advance within ",
                                            deadline_s, " s: a peer rank has died or stopped calling aimass"));
    backoff.pause(waited);
  }
}

void LLChannel::done() { ctl(rank_)->reading.store(0, std::memory_order_seq_cst); }

}  // namespace comm
}  // namespace aimass
