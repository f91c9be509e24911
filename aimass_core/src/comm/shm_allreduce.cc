// Chunked, pipelined intra-node allreduce through shared memory (see shm_allreduce.h).
#include "comm/shm_allreduce.h"
#include "comm/cpu_share.h"
#include "aimass/parallel.h"

#include <fcntl.h>
#include <sched.h>
#include <sys/mman.h>
#include <linux/futex.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cerrno>
#include <climits>
#include <csignal>
#include <ctime>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <new>
#include <thread>
#include <type_traits>

#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "aimass/shared_host.h"
#include "comm/cma.h"
#include "comm/shm_segment.h"

namespace aimass {
namespace comm {

ElemOp elem_op(ReduceOp op) {
  return op == ReduceOp::Min ? ElemOp::Min : op == ReduceOp::Max ? ElemOp::Max
       : op == ReduceOp::Product ? ElemOp::Prod : ElemOp::Sum;
}

namespace {
template <typename T>
void reduce_typed(ReduceOp op, const char* const* srcs, int k, char* dst_bytes, size_t n);

// dst may be one of the sources past the first (the staged run writes a slice back over a staged copy):
// reduce_typed below overwrites dst with the first source before it reads the others, so here blocks go
// through a small buffer instead (the same operations in the same order).
template <typename T>
bool reduce_typed_aliased(ReduceOp op, const char* const* srcs, int k, char* dst, size_t n) {
  bool aliased = false;
  for (int j = 1; j < k; ++j) aliased |= srcs[j] == dst;
  if (!aliased) return false;
  constexpr size_t kBlock = 1024;
  T tmp[kBlock];
  std::vector<const char*> at(static_cast<size_t>(k));
  const size_t es = sizeof(T);
  for (size_t i = 0; i < n; i += kBlock) {
    const size_t m = std::min(kBlock, n - i);
    for (int j = 0; j < k; ++j) at[j] = srcs[j] + i * es;
    reduce_typed<T>(op, at.data(), k, reinterpret_cast<char*>(tmp), m);
    comm::copy_bytes(dst + i * es, tmp, m * es);
  }
  return true;
}

template <typename T>
void reduce_typed(ReduceOp op, const char* const* srcs, int k, char* dst_bytes, size_t n) {
  if (k > 1 && reduce_typed_aliased<T>(op, srcs, k, dst_bytes, n)) return;
  T* dst = reinterpret_cast<T*>(dst_bytes);
  const T* s0 = reinterpret_cast<const T*>(srcs[0]);
  if (static_cast<const void*>(s0) != static_cast<void*>(dst)) std::memcpy(dst, s0, n * sizeof(T));
  for (int j = 1; j < k; ++j) {
    const T* s = reinterpret_cast<const T*>(srcs[j]);
    if (op == ReduceOp::Min) {
      for (size_t i = 0; i < n; ++i) dst[i] = s[i] < dst[i] ? s[i] : dst[i];
    } else if (op == ReduceOp::Max) {
      for (size_t i = 0; i < n; ++i) dst[i] = s[i] > dst[i] ? s[i] : dst[i];
    } else if constexpr (std::is_integral_v<T>) {
      // integers wrap around like MPI's and torch's (computed unsigned: no signed overflow);
      // uint64_t so that 8/16-bit products do not promote to a signed int
      const bool prod = op == ReduceOp::Product;
      for (size_t i = 0; i < n; ++i) {
        const uint64_t x = static_cast<uint64_t>(dst[i]), y = static_cast<uint64_t>(s[i]);
        dst[i] = static_cast<T>(prod ? x * y : x + y);
      }
    } else if (op == ReduceOp::Product) {
      for (size_t i = 0; i < n; ++i) dst[i] *= s[i];
    } else {
      for (size_t i = 0; i < n; ++i) dst[i] += s[i];
    }
  }
}

}  // namespace

void reduce_sources(DType dtype, ReduceOp op, const char* const* srcs, int k, char* dst, size_t n) {
  switch (dtype) {
    case DType::F32:
      reduce_f32(elem_op(op), reinterpret_cast<const float* const*>(srcs), k, reinterpret_cast<float*>(dst), n);
      break;
    case DType::F64:
      reduce_f64(elem_op(op), reinterpret_cast<const double* const*>(srcs), k, reinterpret_cast<double*>(dst), n);
      break;
    case DType::I32: reduce_typed<int32_t>(op, srcs, k, dst, n); break;
    case DType::I64: reduce_typed<int64_t>(op, srcs, k, dst, n); break;
    case DType::I16: reduce_typed<int16_t>(op, srcs, k, dst, n); break;
    case DType::I8: reduce_typed<int8_t>(op, srcs, k, dst, n); break;
    case DType::U8: reduce_typed<uint8_t>(op, srcs, k, dst, n); break;
    case DType::Bool:  // values are 0/1: or = max, and = min
      reduce_typed<uint8_t>(op == ReduceOp::Min || op == ReduceOp::Product ? ReduceOp::Min : ReduceOp::Max, srcs, k,
                            dst, n);
      break;
    case DType::F16:
    case DType::BF16:  // all sources accumulate in fp32 and round once (more exact than the MPI path's pairs)
      reduce_half_sources(dtype == DType::F16 ? Half::F16 : Half::BF16, elem_op(op),
                          reinterpret_cast<const uint16_t* const*>(srcs), k, reinterpret_cast<uint16_t*>(dst), n);
      break;
    default: throw DistributedError("aimass.dist: shared-memory path got an unsupported dtype (internal error)");
  }
}

namespace {
template <typename T>
void divide_typed(char* data, size_t n, int world) {
  T* o = reinterpret_cast<T*>(data);
  for (size_t i = 0; i < n; ++i) o[i] = static_cast<T>(o[i] / world);
}

}  // namespace

// The same arithmetic as the MPI path's average (sum, then divide by the world size).
void divide(DType dtype, char* data, size_t n, int world) {
  switch (dtype) {
    case DType::F32: {
      float* o = reinterpret_cast<float*>(data);
      const float s = 1.0f / static_cast<float>(world);
      for (size_t i = 0; i < n; ++i) o[i] *= s;
      break;
    }
    case DType::F64: {
      double* o = reinterpret_cast<double*>(data);
      for (size_t i = 0; i < n; ++i) o[i] /= world;
      break;
    }
    case DType::I32: {
      int32_t* o = reinterpret_cast<int32_t*>(data);
      for (size_t i = 0; i < n; ++i) o[i] /= world;
      break;
    }
    case DType::I64: {
      int64_t* o = reinterpret_cast<int64_t*>(data);
      for (size_t i = 0; i < n; ++i) o[i] /= world;
      break;
    }
    case DType::I16: divide_typed<int16_t>(data, n, world); break;
    case DType::I8: divide_typed<int8_t>(data, n, world); break;
    case DType::U8: divide_typed<uint8_t>(data, n, world); break;
    case DType::F16:
    case DType::BF16:
      scale_half(dtype == DType::F16 ? Half::F16 : Half::BF16, reinterpret_cast<uint16_t*>(data), n,
                 1.0f / static_cast<float>(world));
      break;
    default: break;
  }
}

void reduce_into(DType dtype, ReduceOp op, const char* const* srcs, int k, char* dst, size_t n, bool average,
                 int world, char* dst2) {
  if (dtype == DType::F32) {
    reduce_f32(elem_op(op), reinterpret_cast<const float* const*>(srcs), k, reinterpret_cast<float*>(dst), n,
               reinterpret_cast<float*>(dst2), average ? 1.0f / static_cast<float>(world) : 1.0f);
    return;
  }
  if (dtype == DType::F64) {  // the average divides, as divide() does: folded into the pass
    reduce_f64(elem_op(op), reinterpret_cast<const double* const*>(srcs), k, reinterpret_cast<double*>(dst), n,
               reinterpret_cast<double*>(dst2), average ? static_cast<double>(world) : 1.0);
    return;
  }
  if (dtype == DType::F16 || dtype == DType::BF16) {  // the average's second rounding in the same pass
    reduce_half_sources(dtype == DType::F16 ? Half::F16 : Half::BF16, elem_op(op),
                        reinterpret_cast<const uint16_t* const*>(srcs), k, reinterpret_cast<uint16_t*>(dst), n,
                        reinterpret_cast<uint16_t*>(dst2), average ? 1.0f / static_cast<float>(world) : 1.0f);
    return;
  }
  reduce_sources(dtype, op, srcs, k, dst, n);
  if (average) divide(dtype, dst, n, world);
  if (dst2) comm::copy_bytes(dst2, dst, n * dtype_size(dtype));
}

namespace {
constexpr size_t kMaxSegmentBytes = 32u << 20;
constexpr size_t kMinChunkBytes = 64u << 10;

size_t round_chunk(size_t chunk_bytes) { return std::max<size_t>(4096, (chunk_bytes + 4095) / 4096 * 4096); }

}  // namespace

size_t ShmAllreduce::ctrl_bytes(int local_size) {
  return (static_cast<size_t>(local_size) * sizeof(Control) + 4095) / 4096 * 4096;
}

// Control lines, then local_size staging rings and one result ring of kDepth chunks each.
size_t ShmAllreduce::segment_bytes(int local_size, size_t chunk_bytes) {
  return ctrl_bytes(local_size) + static_cast<size_t>(local_size + 1) * kDepth * round_chunk(chunk_bytes);
}

ShmAllreduce::ShmAllreduce(int local_rank, int local_size, void* memory, size_t chunk_bytes, double timeout_s)
    : lsize_(local_size), lrank_(local_rank), timeout_s_(timeout_s) {
  AIMASS_CHECK(local_size >= 1 && local_rank >= 0 && local_rank < local_size, ValueError,
               "ShmAllreduce: local_rank ", local_rank, " is not in [0, ", local_size, ")");
  AIMASS_CHECK(memory != nullptr, ValueError, "ShmAllreduce: memory is null");
  AIMASS_CHECK(reinterpret_cast<uintptr_t>(memory) % 128 == 0, ValueError,
               "ShmAllreduce: memory must be 128-byte aligned");
  chunk_bytes_ = round_chunk(chunk_bytes);
  ctrl_bytes_ = ctrl_bytes(lsize_);
  bytes_ = segment_bytes(lsize_, chunk_bytes);
  base_ = static_cast<char*>(memory);
  ctrl(lrank_)->pid.store(static_cast<int64_t>(getpid()), std::memory_order_relaxed);
  set_wait_policy();
}

ShmAllreduce::ShmAllreduce(const Communicator& comm, size_t chunk_bytes, double timeout_s)
    : lsize_(comm.local_size()), lrank_(comm.local_rank()), timeout_s_(timeout_s) {
  static_assert(std::atomic<uint64_t>::is_always_lock_free, "shared-memory counters need lock-free atomics");
  set_wait_policy();  // (every rank reads the same environment: a bad value raises everywhere, before any MPI call)
  MPI_Comm world = comm.comm();
  // Start-up collectives with the deadline too: a peer that dies during init() never hangs it.
  // (After a set-up timeout the engine is not created; the small buffers posted then are locals.)
  auto allreduce = [&](void* v, MPI_Datatype t, MPI_Op op, MPI_Comm c) {
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, v, 1, t, op, c, &req), "MPI_Iallreduce(shm)");
    wait_mpi(&req, 1.0, timeout_s, "shared-memory set-up");
  };
  int ok = lsize_ > 1 ? 1 : 0;
  // slices are allreduced across nodes rank-by-rank: every node needs the same local size
  int lmin = lsize_, lmax = lsize_;
  allreduce(&lmin, MPI_INT, MPI_MIN, world);
  allreduce(&lmax, MPI_INT, MPI_MAX, world);
  if (lmin != lmax) ok = 0;
  allreduce(&ok, MPI_INT, MPI_MIN, world);
  if (!ok) return;
  // every rank must cut chunks alike, whatever its environment says
  unsigned long long agreed = chunk_bytes;
  allreduce(&agreed, MPI_UNSIGNED_LONG_LONG, MPI_MIN, world);
  chunk_bytes = static_cast<size_t>(agreed);
  // Many ranks per node: smaller chunks keep the segment within kMaxSegmentBytes (container
  // /dev/shm is often 64 MiB; a segment that does not fit would silently disable the path).
  const size_t rings = static_cast<size_t>(lsize_ + 1) * kDepth;
  chunk_bytes = std::min(chunk_bytes, std::max<size_t>(kMinChunkBytes, kMaxSegmentBytes / rings / 4096 * 4096));

  chunk_bytes_ = round_chunk(chunk_bytes);
  ctrl_bytes_ = ctrl_bytes(lsize_);
  bytes_ = segment_bytes(lsize_, chunk_bytes);

  struct {
    int ok;
    char name[60];
  } msg{};
  const bool creator = lrank_ == 0;
  void* p = MAP_FAILED;
  if (creator) {
    p = create_shm_segment("aimass", bytes_, msg.name, sizeof(msg.name));
    if (p != MAP_FAILED) {
      for (int j = 0; j < lsize_; ++j) new (static_cast<char*>(p) + j * sizeof(Control)) Control{};
      msg.ok = 1;
    }
  }
  try {
    MPI_Request req;
    check_mpi(MPI_Ibcast(&msg, static_cast<int>(sizeof(msg)), MPI_BYTE, 0, comm.local_comm(), &req),
              "MPI_Ibcast(shm)");
    wait_mpi(&req, 1.0, timeout_s, "shared-memory set-up");
  } catch (...) {
    if (p != MAP_FAILED) {  // no segment is left behind
      munmap(p, bytes_);
      shm_unlink(msg.name);
    }
    throw;
  }
  if (!creator && msg.ok) p = open_shm_segment(msg.name, bytes_);
  int mine = p != MAP_FAILED ? 1 : 0;
  try {
    allreduce(&mine, MPI_INT, MPI_MIN, world);
    // every local rank has mapped it (or given up): the name is no longer needed
    MPI_Request req;
    check_mpi(MPI_Ibarrier(comm.local_comm(), &req), "MPI_Ibarrier(shm)");
    wait_mpi(&req, 1.0, timeout_s, "shared-memory set-up");
  } catch (...) {
    if (creator && msg.ok) shm_unlink(msg.name);
    if (p != MAP_FAILED) munmap(p, bytes_);
    throw;
  }
  if (creator && msg.ok) shm_unlink(msg.name);
  if (!mine) {  // e.g. /dev/shm too small somewhere: MPI only
    if (p != MAP_FAILED) munmap(p, bytes_);
    return;
  }
  base_ = static_cast<char*>(p);
  owned_ = true;
  // Single-copy mode needs process_vm_readv on the peers (same user, no ptrace restriction):
  // each rank reads every local peer's probe word; every rank of every node must manage.
  ctrl(lrank_)->pid.store(static_cast<int64_t>(getpid()), std::memory_order_relaxed);
  probe_ = 0x5eed0000u + static_cast<uint64_t>(lrank_);
  ctrl(lrank_)->addr.store(reinterpret_cast<uint64_t>(&probe_), std::memory_order_release);
  // a shared host buffer holding the same word, for the peers' map probe (probe_map); its RegionRef goes
  // in this rank's staging slot 0 (unused until the first collective; ino 0 when there is none)
  const char* menv = std::getenv("AIMASS_SHM_MAP");
  const bool map_probe = !(menv && std::string(menv) == "0");
  std::unique_ptr<SharedHostBuffer> probe_buf;
  if (map_probe) {
    try {
      probe_buf = std::make_unique<SharedHostBuffer>(4096);
      const uint64_t word = probe_;
      std::memcpy(probe_buf->data(), &word, sizeof(word));
      find_shared_region(probe_buf->data(), sizeof(word), reinterpret_cast<RegionRef*>(staging(lrank_, 0)));
    } catch (const Error&) {
      probe_buf.reset();  // no memfd here: the peers read ino 0 and everyone keeps the kernel copies
    }
  }
  MPI_Request req;
  check_mpi(MPI_Ibarrier(comm.local_comm(), &req), "MPI_Ibarrier(shm)");
  wait_mpi(&req, 1.0, timeout_s, "shared-memory set-up");
  const char* env = std::getenv("AIMASS_SHM_CMA");
  int cma = env && std::string(env) == "0" ? 0 : 1;
  for (int j = 0; j < lsize_ && cma; ++j)
    if (j != lrank_ && !probe_cma(j)) cma = 0;
  // push mode also writes the peers' memory: probed by writing each peer's probe word with the
  // value it holds (AIMASS_SHM_CMA_PUSH=0: pull only)
  const char* penv = std::getenv("AIMASS_SHM_CMA_PUSH");
  int push = cma && !(penv && std::string(penv) == "0") ? 1 : 0;
  for (int j = 0; j < lsize_ && push; ++j)
    if (j != lrank_ &&
        !cma_probe_write(static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed)),
                         ctrl(j)->addr.load(std::memory_order_acquire), 0x5eed0000u + static_cast<uint64_t>(j)))
      push = 0;
  // the pieces of a push allreduce go to whichever rank claims them first (AIMASS_SHM_CMA_STEAL=0:
  // one fixed slice per rank)
  const char* senv = std::getenv("AIMASS_SHM_CMA_STEAL");
  const int steal = push && !(senv && std::string(senv) == "0") ? 1 : 0;
  // buffers in the peers' shared host buffers are reduced with loads and stores (run_mapped): every rank
  // must map every local peer's probe buffer (posted above; AIMASS_SHM_MAP=0: off)
  const int map = steal && map_probe && probe_map() ? 1 : 0;
  int flags[4] = {cma, push, steal, map};
  {  // also: every probe is done before addr is reused (and before the probe buffers go)
    MPI_Request r2;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, flags, 4, MPI_INT, MPI_MIN, world, &r2), "MPI_Iallreduce(shm)");
    wait_mpi(&r2, 1.0, timeout_s, "shared-memory set-up");
  }
  peer_maps_.clear();  // the probe buffers' mappings
  cma_ok_ = flags[0] != 0;
  push_ok_ = cma_ok_ && flags[1] != 0;
  steal_ok_ = push_ok_ && flags[2] != 0;
  map_ok_ = steal_ok_ && flags[3] != 0;
}

// Every local peer posted a RegionRef of its probe buffer (one page whose first word is 0x5eed0000 + its
// local rank) in its staging slot 0, ino 0 when it has none: maps each and reads the word.
bool ShmAllreduce::probe_map() {
  for (int j = 0; j < lsize_; ++j) {
    if (j == lrank_) continue;
    const RegionRef* ref = reinterpret_cast<const RegionRef*>(staging(j, 0));
    const char* p = peer_maps_.translate(static_cast<pid_t>(ctrl(j)->pid.load(std::memory_order_relaxed)), *ref,
                                         ref->base, sizeof(uint64_t));
    uint64_t word = 0;
    if (p) std::memcpy(&word, p, sizeof(word));
    if (!p || word != 0x5eed0000u + static_cast<uint64_t>(j)) return false;
  }
  return true;
}

ShmAllreduce::~ShmAllreduce() {
  if (base_ && owned_) munmap(base_, bytes_);
}

char* ShmAllreduce::staging(int j, uint64_t seq) const {
  return base_ + ctrl_bytes_ + (static_cast<size_t>(j) * kDepth + seq % kDepth) * chunk_bytes_;
}

char* ShmAllreduce::result(uint64_t seq) const {
  return base_ + ctrl_bytes_ + (static_cast<size_t>(lsize_) * kDepth + seq % kDepth) * chunk_bytes_;
}

void ShmAllreduce::pulse(Clock::time_point now) const {
  if (heartbeat_)
    heartbeat_->store(std::chrono::duration_cast<std::chrono::nanoseconds>(now.time_since_epoch()).count(),
                      std::memory_order_relaxed);
}

namespace {
// A futex on a 64-bit counter: the kernel compares and sleeps on its low 32-bit word (a counter
// that moved differs there: it only grows, by far less than 2^32 per wait). Not FUTEX_PRIVATE:
// the counters live in shared memory mapped by several processes.
uint32_t* futex_word(std::atomic<uint64_t>& v) {
  static_assert(sizeof(std::atomic<uint64_t>) == 8, "counters are plain 64-bit words");
  return reinterpret_cast<uint32_t*>(&v) + (__BYTE_ORDER__ == __ORDER_BIG_ENDIAN__ ? 1 : 0);
}
void futex_sleep(std::atomic<uint64_t>& v, uint32_t seen, long ns) {
  timespec ts{static_cast<time_t>(ns / 1000000000L), ns % 1000000000L};
  syscall(SYS_futex, futex_word(v), FUTEX_WAIT, seen, &ts, nullptr, 0);  // EAGAIN / ETIMEDOUT / EINTR: look again
}
void futex_wake_all(std::atomic<uint64_t>& v) {
  syscall(SYS_futex, futex_word(v), FUTEX_WAKE, INT_MAX, nullptr, nullptr, 0);
}
// The longest sleep between looks at the peer's abort flag and the deadline (the heartbeat beats
// at least this often). An aborting peer wakes the sleepers at once; a dead one is caught here.
constexpr long kFutexSliceNs = 2000000;  // 2 ms
}  // namespace

// AIMASS_SHM_WAIT=yield restores the yield-and-nap loop. Past the spin a waiter yields for
// yield_s_ before it sleeps: 0 when the machine's ranks outnumber its CPUs (comm::cpu_share: a
// yield there mostly hands the core to another waiting rank: 4 ranks on 2 cores spent 31% of
// their samples switching out of sched_yield in a 1 MiB hierarchical allreduce), else 50 us (a
// peer on its own core usually answers within that, and a wake-up costs more; also under
// `mpirun --bind-to core`, where this process's affinity mask holds one CPU). AIMASS_SHM_YIELD_US
// overrides it.
void ShmAllreduce::set_wait_policy() {
  const char* w = std::getenv("AIMASS_SHM_WAIT");
  futex_on_ = !(w && std::string(w) == "yield");
  yield_s_ = cpu_share(lsize_).oversubscribed() ? 0.0 : 50e-6;
  if (const char* y = std::getenv("AIMASS_SHM_YIELD_US")) {
    char* end = nullptr;
    const double us = std::strtod(y, &end);
    AIMASS_CHECK(end != y && us >= 0 && us <= 1e6, ValueError,
                 "AIMASS_SHM_YIELD_US must be a number of microseconds in [0, 1e6], got '", y, "'");
    yield_s_ = us * 1e-6;
  }
}

void ShmAllreduce::publish(std::atomic<uint64_t>& counter, uint64_t s) {
  // seq_cst store, then the waiters load: a waiter either sees s before it sleeps, or is counted
  // here (it registers, seq_cst, before it reads the counter)
  counter.store(s, std::memory_order_seq_cst);
  if (ctrl(lrank_)->waiters.load(std::memory_order_seq_cst) != 0) futex_wake_all(counter);
}

void ShmAllreduce::abort_here() {
  Control* c = ctrl(lrank_);
  c->aborted.store(1, std::memory_order_seq_cst);
  if (c->waiters.load(std::memory_order_seq_cst) != 0) {
    futex_wake_all(c->staged);
    futex_wake_all(c->reduced);
    futex_wake_all(c->gathered);
  }
}

void ShmAllreduce::wait_counter(int j, int which, uint64_t target) {
  Control* c = ctrl(j);
  std::atomic<uint64_t>& v = which == 0 ? c->staged : which == 1 ? c->reduced : c->gathered;
  if (v.load(std::memory_order_acquire) >= target) return;
  for (int i = 0; i < 256; ++i) {  // the peer is usually a few hundred ns behind
    cpu_relax();
    if (v.load(std::memory_order_acquire) >= target) return;
  }
  const auto start = Clock::now();
  auto check = [&](Clock::time_point now) {  // the peer gave up or died, or the deadline passed
    if (c->aborted.load(std::memory_order_acquire)) {
      throw DistributedError(detail::concat("aimass.dist: shared-memory collective: local rank ", j,
                                            " gave up (see the error on that rank)"));
    }
    // a peer that died leaves no abort flag: where the cma probe showed that its pid is valid here (same
    // pid namespace), a gone process fails the wait at once, as process_vm_readv's ESRCH does, instead of
    // at the deadline (the mapped path touches no peer through the kernel)
    const pid_t pid = static_cast<pid_t>(c->pid.load(std::memory_order_relaxed));
    if (cma_ok_ && pid > 0 && pid != getpid() && kill(pid, 0) != 0 && errno == ESRCH) {
      throw DistributedError(detail::concat("aimass.dist: shared-memory collective: local rank ", j, " (pid ", pid,
                                            ") died: a peer rank has died"));
    }
    pulse(now);
    const double waited = std::chrono::duration<double>(now - start).count();
    if (waited > timeout_s_) {
      throw DistributedError(detail::concat(
          "aimass.dist: shared-memory collective: local rank ", j, " did not advance within ", timeout_s_,
          " s: a peer rank has died or stopped calling aimass (raise AIMASS_COMM_TIMEOUT if it is only slow)"));
    }
    return waited;
  };
  for (uint64_t iter = 1;; ++iter) {
    if (futex_on_ && (yield_s_ <= 0 || std::chrono::duration<double>(Clock::now() - start).count() > yield_s_)) {
      // sleep until rank j moves the counter (publish wakes us) or a slice passes
      c->waiters.fetch_add(1, std::memory_order_seq_cst);
      const uint64_t seen = v.load(std::memory_order_seq_cst);
      if (seen < target && !c->aborted.load(std::memory_order_seq_cst))
        futex_sleep(v, static_cast<uint32_t>(seen), kFutexSliceNs);
      c->waiters.fetch_sub(1, std::memory_order_seq_cst);
      if (v.load(std::memory_order_acquire) >= target) return;
      check(Clock::now());
      continue;
    }
    // ranks may outnumber cores (tests run -np 4 on 2): let the peer run
    sched_yield();
    if (v.load(std::memory_order_acquire) >= target) return;
    if ((iter & 63) == 0) {
      if (check(Clock::now()) > 0.05) std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }
}

void shm_line_pads(std::vector<ShmSegment>& segs, size_t elem_bytes, int line_offset) {
  const bool on = elem_bytes > 0 && elem_bytes <= 64 && line_offset >= 0 && line_offset < 64 &&
                  static_cast<size_t>(line_offset) % elem_bytes == 0;
  const int64_t unit = on ? 64 / static_cast<int64_t>(elem_bytes) : 1;  // elements per line
  const int64_t want = on ? line_offset / static_cast<int64_t>(elem_bytes) : 0;
  int64_t at = 0;  // the staging layout's next free element
  for (ShmSegment& g : segs) {
    g.pad = on ? ((want - at) % unit + unit) % unit : 0;
    at += g.pad + g.count;
  }
}

void ShmAllreduce::run(const std::vector<ShmSegment>& segs, int64_t count, DType dtype, ReduceOp op,
                       int world_size, const std::function<void(void*, int64_t)>& cross_reduce, int64_t lead) {
  AIMASS_CHECK(available(), DistributedError, "aimass.dist: shared-memory path used without a segment (internal error)");
  pushed_ = false;
  mapped_ = false;
  if (count <= 0) return;
  if (!stages(segs.size(), static_cast<bool>(cross_reduce))) {
    try {
      return run_cma(segs, count, dtype, op, world_size, cross_reduce);
    } catch (...) {
      abort_here();
      throw;
    }
  }
  const int L = lsize_, me = lrank_;
  const size_t es = dtype_size(dtype);
  const int64_t chunk = static_cast<int64_t>(this->chunk() / es);
  // Chunk c covers the elements [c * chunk - lead, (c + 1) * chunk - lead) (clipped to the buffer): with
  // the lead the caller gives (where every rank's buffer sits that many elements past a 64-byte line)
  // chunk and slice bounds fall on whole lines of the buffers, and staging and result slots hold each
  // element at the same offset within its line as the buffers do, so no vector load or store of the
  // kernels straddles two lines (numpy's arrays start 16 bytes into a page: measured 1.37-1.67 ms
  // against 1.11-1.13 ms for 16 MiB fp32 at 2 thread ranks).
  if (lead < 0 || lead >= chunk) lead = 0;
  // The staging layout: segment i occupies [starts[i] + pad_i, starts[i + 1]); the pads are holes that
  // are never staged, reduced or copied out (ShmSegment::pad).
  std::vector<int64_t> starts(segs.size() + 1, 0);
  int64_t real = 0;
  for (size_t i = 0; i < segs.size(); ++i) {
    AIMASS_CHECK(segs[i].pad >= 0 && segs[i].count >= 0, DistributedError,
                 "aimass.dist: negative segment size or pad (internal error)");
    starts[i + 1] = starts[i] + segs[i].pad + segs[i].count;
    real += segs[i].count;
  }
  AIMASS_CHECK(real == count, DistributedError, "aimass.dist: segment sizes do not add up (internal error)");
  count = starts.back();  // from here on: elements of the staging layout, holes included
  const int64_t nchunks = (count + lead + chunk - 1) / chunk;
  const uint64_t base_seq = seq_;
  // Calls fn(segment, element offset inside it, element offset in the layout, n)
  // for the pieces of [lo, hi) of the layout (holes skipped).
  auto pieces = [&](int64_t lo, int64_t hi, auto&& fn) {
    size_t idx = static_cast<size_t>(std::upper_bound(starts.begin(), starts.end(), lo) - starts.begin()) - 1;
    while (lo < hi && idx < segs.size()) {
      const int64_t first = starts[idx] + segs[idx].pad;  // the segment's first element
      const int64_t from = std::max(lo, first);
      const int64_t n = std::min(hi, starts[idx + 1]) - from;
      if (n > 0) fn(segs[idx], from - first, from, n);
      lo = std::max(lo, starts[idx + 1]);
      ++idx;
    }
  };
  std::vector<const char*> srcs(L);
  // off, m: the chunk's first element and element count; d: elements of the chunk's first line before the
  // buffer (lead for chunk 0, else 0). Slot positions count from off - d.
  auto bounds = [&](int64_t c, int64_t* off, int64_t* m, int64_t* d) {
    const int64_t vs = c * chunk - lead;
    *off = std::max<int64_t>(0, vs);
    *m = std::min(count, vs + chunk) - *off;
    *d = *off - vs;
  };
  // slice() of rank j over the chunk counted from off - d, as offsets from off
  auto cut = [&](int j, int64_t m, int64_t d, int64_t* b, int64_t* e) {
    line_slice(m + d, es, lsize_, j, b, e);
    *b = std::max<int64_t>(0, *b - d);
    *e = std::max<int64_t>(0, *e - d);
  };

  // Two ranks on one node: each rank's reduced slice goes back into the staging slot it read the peer's
  // copy from (staging(peer, s)), and the peer gathers it from its own slot. The reducer has just read
  // those lines, so the result costs no read-for-ownership of lines the peer last read, as the result
  // ring's did, and the result ring stays cold. Only at two ranks: a slot then holds one result, which
  // only its owner gathers before it writes the slot again (whatever the next collective); with more
  // ranks the other collectives would have to wait for every gatherer before they stage. Across nodes
  // the result ring is kept (cross_reduce rewrites the slice there before the gather).
  const bool direct = !cross_reduce;
  const bool in_slot = direct && L == 2;
  auto result_of = [&](int j, uint64_t s) { return in_slot ? staging(1 - j, s) : result(s); };

  auto stage = [&](int64_t c) {
    const uint64_t s = base_seq + c + 1;
    int64_t off, m, d, b, e;
    bounds(c, &off, &m, &d);
    cut(me, m, d, &b, &e);
    if (s > static_cast<uint64_t>(kDepth)) {  // peers finished reading this ring slot (in_slot: and writing
      for (int j = 0; j < L; ++j)             // their slice into it; this rank gathered it)
        if (j != me) wait_counter(j, 1, s - kDepth);
    }
    char* dst = staging(me, s);
    auto copy_in = [&](const ShmSegment& g, int64_t at, int64_t x, int64_t n) {
      comm::copy_bytes(dst + (x - off + d) * es, g.in + at * es, static_cast<size_t>(n) * es);
    };
    pieces(off, off + b, copy_in);
    pieces(off + e, off + m, copy_in);
    publish(ctrl(me)->staged, s);
  };

  auto reduce = [&](int64_t c) {
    const uint64_t s = base_seq + c + 1;
    int64_t off, m, d, b, e;
    bounds(c, &off, &m, &d);
    cut(me, m, d, &b, &e);
    for (int j = 0; j < L; ++j)
      if (j != me) wait_counter(j, 0, s);
    if (!in_slot && s > static_cast<uint64_t>(kDepth)) {  // every rank copied out what this result slot held before
      for (int j = 0; j < L; ++j)
        if (j != me) wait_counter(j, 2, s - kDepth);
    }
    char* res = result_of(me, s);
    // On one node the reduce pass also writes the output (and folds in the average), so the
    // gather below copies only the peers' slices. Across nodes the slice first goes over MPI.
    pieces(off + b, off + e, [&](const ShmSegment& g, int64_t at, int64_t x, int64_t n) {
      for (int j = 0; j < L; ++j) srcs[j] = j == me ? g.in + at * es : staging(j, s) + (x - off + d) * es;
      char* r = res + (x - off + d) * es;
      if (direct)  // the result slot and the output in one pass, the average folded in
        reduce_into(dtype, op, srcs.data(), L, r, static_cast<size_t>(n), g.average, world_size, g.out + at * es);
      else
        reduce_sources(dtype, op, srcs.data(), L, r, static_cast<size_t>(n));
    });
    if (!direct && e > b) {
      cross_reduce(res + (b + d) * es, e - b);
      pieces(off + b, off + e, [&](const ShmSegment& g, int64_t at, int64_t x, int64_t n) {
        char* r = res + (x - off + d) * es;
        if (g.average) divide(dtype, r, static_cast<size_t>(n), world_size);
        comm::copy_bytes(g.out + at * es, r, static_cast<size_t>(n) * es);
      });
    }
    publish(ctrl(me)->reduced, s);
  };

  auto gather = [&](int64_t c) {
    const uint64_t s = base_seq + c + 1;
    int64_t off, m, d;
    bounds(c, &off, &m, &d);
    for (int jj = 1; jj < L; ++jj) {  // the own slice was written by the reduce pass
      const int j = (me + jj) % L;
      const char* res = result_of(j, s);
      int64_t b, e;
      cut(j, m, d, &b, &e);
      if (e <= b) continue;
      wait_counter(j, 1, s);
      pieces(off + b, off + e, [&](const ShmSegment& g, int64_t at, int64_t x, int64_t n) {
        comm::copy_bytes(g.out + at * es, res + (x - off + d) * es, static_cast<size_t>(n) * es);
      });
    }
    publish(ctrl(me)->gathered, s);
  };

  try {
    // software pipeline: stage c+1 while the peers reduce c; gather c-1 once its slices are surely done
    for (int64_t t = 0; t < nchunks + 2; ++t) {
      if ((t & 15) == 0) pulse(Clock::now());
      if (t < nchunks) stage(t);
      if (t >= 1 && t - 1 < nchunks) reduce(t - 1);
      if (t >= 2) gather(t - 2);
    }
  } catch (...) {
    abort_here();
    throw;
  }
  seq_ = base_seq + static_cast<uint64_t>(nchunks);
}

}  // namespace comm
}  // namespace aimass
