// Names, options from the environment, and the caller's handle.
#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <new>
#include <string>

#include "aimass/shared_host.h"
#include "comm/engine_impl.h"

namespace aimass {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::Sum: return "sum";
    case ReduceOp::Average: return "average";
    case ReduceOp::Min: return "min";
    case ReduceOp::Max: return "max";
    case ReduceOp::Product: return "product";
  }
  return "?";
}

bool try_parse_reduce_op(std::string_view name, ReduceOp* op) {
  if (name == "sum") *op = ReduceOp::Sum;
  else if (name == "average" || name == "avg" || name == "mean") *op = ReduceOp::Average;
  else if (name == "min") *op = ReduceOp::Min;
  else if (name == "max") *op = ReduceOp::Max;
  else if (name == "product" || name == "prod") *op = ReduceOp::Product;
  else return false;
  return true;
}

ReduceOp parse_reduce_op(const std::string& name) {
  ReduceOp op;
  if (try_parse_reduce_op(name, &op)) return op;
  throw ValueError("op must be one of 'sum', 'average', 'min', 'max', 'product'; got '" + name + "'");
}

const char* collective_kind_name(CollectiveKind kind) {
  switch (kind) {
    case CollectiveKind::Allreduce: return "allreduce";
    case CollectiveKind::Broadcast: return "broadcast";
    case CollectiveKind::Allgather: return "allgather";
    case CollectiveKind::ReduceScatter: return "reduce_scatter";
    case CollectiveKind::Barrier: return "barrier";
  }
  return "?";
}

EngineOptions EngineOptions::from_env() {
  EngineOptions o;
  if (const char* v = std::getenv("AIMASS_COMM_TIMEOUT")) {
    char* end = nullptr;
    double t = std::strtod(v, &end);
    AIMASS_CHECK(end != v && t > 0, ValueError, "AIMASS_COMM_TIMEOUT must be a positive number of seconds, got '", v,
                 "'");
    o.timeout_s = t;
  }
  if (const char* v = std::getenv("AIMASS_FUSION_THRESHOLD")) {
    char* end = nullptr;
    long long b = std::strtoll(v, &end, 10);
    AIMASS_CHECK(end != v && b >= 0, ValueError, "AIMASS_FUSION_THRESHOLD must be a byte count >= 0, got '", v, "'");
    o.fusion_threshold = static_cast<size_t>(b);
  }
  if (const char* v = std::getenv("AIMASS_CYCLE_TIME")) {
    char* end = nullptr;
    double ms = std::strtod(v, &end);
    AIMASS_CHECK(end != v && ms > 0, ValueError, "AIMASS_CYCLE_TIME must be a positive number of milliseconds, got '",
                 v, "'");
    o.cycle_time_s = ms / 1000.0;
  }
  if (const char* v = std::getenv("AIMASS_SHM")) o.shm = std::string(v) != "0";
  comm::ll_options_from_env(o);
  if (const char* v = std::getenv("AIMASS_SHM_MIN_BYTES")) {
    char* end = nullptr;
    long long b = std::strtoll(v, &end, 10);
    AIMASS_CHECK(end != v && b >= 0, ValueError, "AIMASS_SHM_MIN_BYTES must be a byte count >= 0, got '", v, "'");
    o.shm_min_bytes = static_cast<size_t>(b);
  }
  if (const char* v = std::getenv("AIMASS_SHM_CHUNK_BYTES")) {
    char* end = nullptr;
    long long b = std::strtoll(v, &end, 10);
    AIMASS_CHECK(end != v && b >= 4096 && b <= (1ll << 30), ValueError,
                 "AIMASS_SHM_CHUNK_BYTES must be a byte count in [4096, 2^30], got '", v, "'");
    o.shm_chunk_bytes = static_cast<size_t>(b);
  }
  if (const char* v = std::getenv("AIMASS_COMM_ALGOS")) o.algorithms = v;
  return o;
}

// ---------------------------------------------------------------- handle
namespace {
// Freed result blocks of at least kPoolMin bytes, kept for the next result of the same size
// (at most kPoolBlocks and kPoolMaxBytes, newest first): repeated large allgathers reuse pages
// already faulted in.
constexpr size_t kPoolMin = 1u << 20, kPoolBlocks = 4, kPoolMaxBytes = size_t(512) << 20;
std::mutex pool_mu;
std::vector<std::pair<size_t, void*>> pool;

// Blocks of 4 MiB or more sit on 2 MiB boundaries and ask for transparent huge pages (numpy does
// the same for its arrays from 4 MiB): process_vm_readv pins the pages it copies one by one, and
// with 4 KiB pages that walk cost more than the copy. Measured (2 ranks, loaded VM, median of
// 50): a 16 MiB gather into 4 KiB-page blocks 5.0 ms against 2.9 ms into fresh numpy arrays.
constexpr size_t kHugeMin = size_t(4) << 20, kHugeAlign = size_t(2) << 20;
void* block_alloc(size_t n) {
  if (n < kHugeMin) return ::operator new(n);
  void* p = nullptr;
  if (posix_memalign(&p, kHugeAlign, (n + kHugeAlign - 1) / kHugeAlign * kHugeAlign) != 0) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  madvise(p, (n + kHugeAlign - 1) / kHugeAlign * kHugeAlign, MADV_HUGEPAGE);  // (advice: failure is harmless)
#endif
  return p;
}
void block_free(void* p, size_t n) noexcept {
  if (n < kHugeMin) ::operator delete(p);
  else std::free(p);
}
}  // namespace

void* CollectiveHandle::result_block_get(size_t n) {
  if (n >= kPoolMin) {
    std::lock_guard<std::mutex> lk(pool_mu);
    for (size_t i = 0; i < pool.size(); ++i) {
      if (pool[i].first == n) {
        void* p = pool[i].second;
        pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(i));
        return p;
      }
    }
  }
  return block_alloc(n);
}

void CollectiveHandle::result_block_put(void* p, size_t n) noexcept {
  std::vector<std::pair<size_t, void*>> drop;
  if (n >= kPoolMin && n <= kPoolMaxBytes) {
    std::lock_guard<std::mutex> lk(pool_mu);
    pool.insert(pool.begin(), {n, p});
    size_t total = 0;
    for (auto& b : pool) total += b.first;
    while (pool.size() > kPoolBlocks || total > kPoolMaxBytes) {
      total -= pool.back().first;
      drop.push_back(pool.back());
      pool.pop_back();
    }
  } else {
    drop.emplace_back(n, p);
  }
  for (auto& b : drop) block_free(b.second, b.first);
}

namespace {
// Shared result blocks: handed out (live) and freed ones kept for the next result of the same size
// (newest first, at most kPoolBlocks and kPoolMaxBytes), as the private pool does; the peers keep their
// mappings of a recycled block (comm/host_regions.h), so a repeated gather maps nothing.
std::mutex shared_mu;
std::map<void*, std::unique_ptr<SharedHostBuffer>>& shared_live() {
  static auto* m = new std::map<void*, std::unique_ptr<SharedHostBuffer>>();  // (never destroyed: atexit order)
  return *m;
}
std::vector<std::unique_ptr<SharedHostBuffer>>& shared_free() {
  static auto* v = new std::vector<std::unique_ptr<SharedHostBuffer>>();
  return *v;
}
// Results under kPoolMin (from kSmallSharedMin: an allgather of single-copy parts) are blocks of a
// power-of-two size carved from shared slabs of kSlabBytes, one size per slab at a time: a peer maps a
// slab once and then writes any of its blocks, and a gather of a new size or a result kept alive makes no
// buffer (a memfd and a peer's mapping per result cost more than the gather itself at these sizes). At
// most kSlabMaxBytes of slabs, kept for the process's life: an empty slab takes whatever size is asked
// next (a slab made and dropped per call cost 2-3x the gather: 250 against 140 us a call, 2 ranks,
// sizes of 32-900 KiB with 20 results kept alive).
constexpr size_t kSmallSharedMin = size_t(32) << 10, kSlabBytes = size_t(2) << 20,
                 kSlabMaxBytes = size_t(32) << 20;
struct Slab {
  std::unique_ptr<SharedHostBuffer> buf;
  size_t block = 0;    // bytes per block
  uint64_t used = 0;   // bit i: block i is handed out (kSlabBytes / block <= 64 blocks)
};
std::map<uintptr_t, Slab>& shared_slabs() {  // base address -> slab
  static auto* m = new std::map<uintptr_t, Slab>();
  return *m;
}
size_t small_shared_class(size_t n) {
  size_t p = kSmallSharedMin;
  while (p < n) p <<= 1;
  return p;
}
// (under shared_mu) a free block of `block` bytes: from a slab of that size with room, an empty slab, or a
// new one; nullptr once the slabs are full
void* slab_block_get(size_t block) {
  auto& slabs = shared_slabs();
  Slab* empty = nullptr;
  for (auto& kv : slabs) {
    Slab& s = kv.second;
    if (s.used == 0 && !empty) empty = &s;
    if (s.block != block) continue;
    const size_t nb = kSlabBytes / s.block;
    const uint64_t all = nb >= 64 ? ~uint64_t(0) : (uint64_t(1) << nb) - 1;
    if ((s.used & all) == all) continue;
    const int i = __builtin_ctzll(~s.used & all);
    s.used |= uint64_t(1) << i;
    return static_cast<char*>(s.buf->data()) + static_cast<size_t>(i) * block;
  }
  if (empty) {
    empty->block = block;
    empty->used = 1;
    return empty->buf->data();
  }
  if (slabs.size() * kSlabBytes >= kSlabMaxBytes) return nullptr;
  Slab s;
  try {
    s.buf = std::make_unique<SharedHostBuffer>(kSlabBytes);
  } catch (const std::exception&) {  // no memfd, no memory: private memory instead
    return nullptr;
  }
  s.block = block;
  s.used = 1;
  void* p = s.buf->data();
  slabs.emplace(reinterpret_cast<uintptr_t>(p), std::move(s));
  return p;
}
// (under shared_mu) gives back a slab block; false when p is none
bool slab_block_put(void* p) {
  auto& slabs = shared_slabs();
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  auto it = slabs.upper_bound(a);
  if (it == slabs.begin()) return false;
  --it;
  if (a - it->first >= kSlabBytes) return false;
  it->second.used &= ~(uint64_t(1) << ((a - it->first) / it->second.block));
  return true;
}

// In a forked child every shared block becomes private memory with the same contents at the same
// address: the child's arrays are its own again (MAP_SHARED would let parent and child see each other's
// writes). The fork happens with shared_mu held (fork_prepare), so the lists are whole in the child;
// only mmap, memcpy and munmap there.
void fork_prepare() { shared_mu.lock(); }
void fork_parent() { shared_mu.unlock(); }
void privatize_shared_blocks_in_child() {
  const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE) > 0 ? sysconf(_SC_PAGESIZE) : 4096);
  auto privatize = [page](SharedHostBuffer& b) {
    const size_t n = (b.size() + page - 1) / page * page;  // (the whole pages the buffer maps)
    void* tmp = mmap(nullptr, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (tmp == MAP_FAILED) return;
    std::memcpy(tmp, b.data(), n);
    if (mmap(b.data(), n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) != MAP_FAILED)
      std::memcpy(b.data(), tmp, n);
    munmap(tmp, n);
  };
  for (auto& kv : shared_live()) privatize(*kv.second);
  for (auto& b : shared_free()) privatize(*b);
  for (auto& kv : shared_slabs()) privatize(*kv.second.buf);
  shared_mu.unlock();
}

// Shared blocks come in size classes (n rounded up to a sixteenth of the next power of two, at most 1/16
// more): gathers of nearby sizes reuse one block, so the peers do not map a new buffer for each size (a
// mapping keeps the pages of a block its owner dropped until it has been idle for PeerRegions::kIdleRuns).
size_t shared_block_class(size_t n) {
  size_t p = 1;
  while (p < n) p <<= 1;
  const size_t step = std::max<size_t>(4096, p / 16);
  return (n + step - 1) / step * step;
}
}  // namespace

void* CollectiveHandle::shared_result_block_get(size_t n) {
  static const bool hooked = [] { return pthread_atfork(&fork_prepare, &fork_parent, &privatize_shared_blocks_in_child) == 0; }();
  if (!hooked || n == 0) return nullptr;
  if (n < kPoolMin) {
    if (n < kSmallSharedMin) return nullptr;
    std::lock_guard<std::mutex> lk(shared_mu);
    return slab_block_get(small_shared_class(n));
  }
  n = shared_block_class(n);
  std::unique_ptr<SharedHostBuffer> b;
  {
    std::lock_guard<std::mutex> lk(shared_mu);
    auto& fr = shared_free();
    for (size_t i = 0; i < fr.size(); ++i) {
      if (fr[i]->size() == n) {
        b = std::move(fr[i]);
        fr.erase(fr.begin() + static_cast<std::ptrdiff_t>(i));
        break;
      }
    }
  }
  if (!b) {
    try {
      b = std::make_unique<SharedHostBuffer>(n);
    } catch (const std::exception&) {  // no memfd, no memory: private memory instead
      return nullptr;
    }
  }
  void* p = b->data();
  std::lock_guard<std::mutex> lk(shared_mu);
  shared_live()[p] = std::move(b);
  return p;
}

void CollectiveHandle::shared_result_block_put(void* p) noexcept {
  std::vector<std::unique_ptr<SharedHostBuffer>> drop;
  {
    std::lock_guard<std::mutex> lk(shared_mu);
    auto it = shared_live().find(p);
    if (it == shared_live().end()) {
      slab_block_put(p);
      return;
    }
    auto& fr = shared_free();
    fr.insert(fr.begin(), std::move(it->second));
    shared_live().erase(it);
    size_t total = 0;
    for (auto& b : fr) total += b->size();
    while (fr.size() > kPoolBlocks || total > kPoolMaxBytes) {
      total -= fr.back()->size();
      drop.push_back(std::move(fr.back()));
      fr.pop_back();
    }
  }
}

bool CollectiveHandle::poll() const {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

void CollectiveHandle::wait() {
  if (on_wait_ && !poll()) on_wait_();
  std::unique_lock<std::mutex> lk(mu_);
  while (!done_) {
    if (cv_.wait_for(lk, std::chrono::milliseconds(50), [&] { return done_; })) break;
    if (!watchdog_) continue;
    lk.unlock();
    const std::string stalled = watchdog_();
    lk.lock();
    if (!stalled.empty() && !done_) {
      buffers_in_use_ = true;  // the engine thread may still touch the request's memory
      throw DistributedError(stalled);
    }
  }
  switch (error_kind_) {
    case ErrorKind::None: return;
    case ErrorKind::Closed: throw ClosedError(error_);
    case ErrorKind::Value: throw ValueError(error_);
    case ErrorKind::Distributed: throw DistributedError(error_);
  }
}

bool CollectiveHandle::buffers_in_use() const {
  std::lock_guard<std::mutex> lk(mu_);
  return buffers_in_use_;
}

void CollectiveHandle::finish(ErrorKind kind, const std::string& message) {
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (done_) return;
    error_kind_ = kind;
    error_ = message;
    done_ = true;
  }
  cv_.notify_all();
}

}  // namespace aimass
