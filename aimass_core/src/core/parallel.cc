#include "aimass/parallel.h"

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdlib>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

#include "aimass/error.h"

namespace aimass {
namespace {

int default_threads() {
  if (const char* env = std::getenv("AIMASS_NUM_THREADS")) {
    int n = std::atoi(env);
    if (n >= 1) return n;
  }
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
  unsigned hc = std::thread::hardware_concurrency();
  return hc ? static_cast<int>(hc) : 1;
}

thread_local bool t_in_pool_task = false;

// Before sleeping on a condition variable, a worker waits this long for the next job
// (and the caller this long for the workers) by polling. Waking a sleeping thread costs
// two futex round trips, tens of microseconds on a VM whose idle vCPU has halted, which
// at batch-1 inference (0.1-0.3 ms per layer) ate most of the second thread's gain
// (OpenMP runtimes spin for the same reason). Bounded, so an idle pool stops using CPU.
// AIMASS_SPIN_US (read once) changes it; 0 turns polling off.
std::chrono::microseconds spin_time() {
  static const std::chrono::microseconds t = [] {
    const char* env = std::getenv("AIMASS_SPIN_US");
    const int us = env ? std::atoi(env) : 50;
    return std::chrono::microseconds(us < 0 ? 0 : us);
  }();
  return t;
}

inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

// Polls ready() until it is true or spin_time() has passed; returns ready().
template <class Ready>
bool spin_until(const Ready& ready) {
  const auto until = std::chrono::steady_clock::now() + spin_time();
  for (int i = 0;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return ready();
  }
}

// Workers sleep on a condition variable between jobs; a job is a chunk counter
// that the caller and workers drain together.
class Pool {
 public:
  explicit Pool(int nworkers) {
    for (int i = 0; i < nworkers; ++i) workers_.emplace_back([this] { loop(); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  void run(int nchunks, const std::function<void(int, int)>& fn) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      fn_ = &fn;
      nchunks_ = nchunks;
      next_.store(0);
      done_ = 0;
      error_ = nullptr;
      ++generation_;
    }
    cv_.notify_all();
    drain(&fn, nchunks);
    spin_until([&] { return done_.load() == nchunks && active_.load() == 0; });
    std::unique_lock<std::mutex> lk(mu_);
    // Wait for every worker that joined this job to leave it too: a worker still
    // holding this job's function must not claim a chunk of the next job.
    done_cv_.wait(lk, [&] { return done_ == nchunks_ && active_ == 0; });
    fn_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void drain(const std::function<void(int, int)>* fn, int n) {
    bool prev = t_in_pool_task;
    t_in_pool_task = true;
    int finished = 0;
    std::exception_ptr err;
    for (;;) {
      int c = next_.fetch_add(1);
      if (c >= n) break;
      try {
        (*fn)(c, n);
      } catch (...) {
        if (!err) err = std::current_exception();
      }
      ++finished;
    }
    t_in_pool_task = prev;
    if (finished) {
      std::lock_guard<std::mutex> lk(mu_);
      if (err && !error_) error_ = err;
      done_ += finished;
      if (done_ == nchunks_) done_cv_.notify_all();
    }
  }
  void loop() {
    uint64_t seen = 0;
    for (;;) {
      const std::function<void(int, int)>* fn;
      int n;
      spin_until([&] { return generation_.load() != seen; });
      {
        std::unique_lock<std::mutex> lk(mu_);
        cv_.wait(lk, [&] { return stop_ || (generation_ != seen && fn_ != nullptr); });
        if (stop_) return;
        seen = generation_;
        // the job is captured under the lock, and run() waits for active_ == 0
        fn = fn_;
        n = nchunks_;
        ++active_;
      }
      drain(fn, n);
      {
        std::lock_guard<std::mutex> lk(mu_);
        if (--active_ == 0) done_cv_.notify_all();
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable cv_, done_cv_;
  const std::function<void(int, int)>* fn_ = nullptr;
  int nchunks_ = 0;
  std::atomic<int> next_{0};
  // Changed under mu_ only; atomic so that the spinning waits can poll them.
  std::atomic<int> done_{0};
  std::atomic<int> active_{0};  // workers inside the current job
  std::atomic<uint64_t> generation_{0};
  bool stop_ = false;
  std::exception_ptr error_;
};

std::mutex g_pool_mu;  // held by the thread that is using the pool
std::atomic<int> g_threads{0};
Pool* g_pool = nullptr;  // replaced when the thread count changes; leaked at exit on purpose

int threads_setting() {
  int n = g_threads.load();
  if (n == 0) {
    int d = default_threads();
    g_threads.compare_exchange_strong(n, d);
    n = g_threads.load();
  }
  return n;
}

}  // namespace

int num_threads() { return threads_setting(); }

void set_num_threads(int n) {
  AIMASS_CHECK(n >= 1, ValueError, "set_num_threads: n=", n, " must be >= 1");
  g_threads.store(n);
}

void parallel_chunks(int nchunks, const std::function<void(int, int)>& fn) {
  if (nchunks <= 0) return;
  const int want = threads_setting();
  if (nchunks == 1 || want == 1 || t_in_pool_task) {
    for (int c = 0; c < nchunks; ++c) fn(c, nchunks);
    return;
  }
  std::unique_lock<std::mutex> lk(g_pool_mu, std::try_to_lock);
  if (!lk.owns_lock()) {  // another thread is using the pool: don't wait, don't oversubscribe
    for (int c = 0; c < nchunks; ++c) fn(c, nchunks);
    return;
  }
  if (!g_pool || g_pool->size() != want) {
    delete g_pool;
    g_pool = new Pool(want - 1);
  }
  g_pool->run(nchunks, fn);
}

void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn) {
  if (end <= begin) return;
  grain = std::max<int64_t>(grain, 1);
  const int64_t n = end - begin;
  const int64_t max_chunks = (n + grain - 1) / grain;
  const int nchunks = static_cast<int>(std::min<int64_t>(max_chunks, threads_setting()));
  if (nchunks <= 1) {
    fn(begin, end);
    return;
  }
  parallel_chunks(nchunks, [&](int c, int nc) {
    int64_t b = begin + n * c / nc;
    int64_t e = begin + n * (c + 1) / nc;
    if (e > b) fn(b, e);
  });
}

}  // namespace aimass
