// Names, options from the environment, and the caller's handle.
#include <sys/mman.h>

#include <cstdlib>
#include <new>
#include <string>

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
