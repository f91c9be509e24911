#include "aimass/parallel.h"

#include <sched.h>
#ifdef __linux__
#include <sys/syscall.h>
#include <unistd.h>
#endif

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

// While a run is in progress (RunScope: the runtime's Executor::execute), an idle worker keeps
// polling between the run's jobs for up to this long instead of parking after spin_time(). A
// batch-1 BERT mini run (4 ms at 2 threads) has gaps of single-threaded ops longer than 50 us
// between its parallel ones: its worker parked and was woken 2-11 times per run, and each wake-up
// could land it on the caller's CPU (onnxruntime's workers spin through a run and never park).
// Bounded, so a run that stops issuing parallel work (a long serial op, a hung caller) lets its
// workers park. AIMASS_RUN_SPIN_US (read once; set_run_spin_us changes it) sets it; 0 turns it off.
std::atomic<int64_t>& run_spin_us_ref() {
  static std::atomic<int64_t> us{[] {
    const char* env = std::getenv("AIMASS_RUN_SPIN_US");
    const int64_t v = env ? std::atoll(env) : 5000;
    return std::min<int64_t>(std::max<int64_t>(v, 0), 1000000);
  }()};
  return us;
}
std::atomic<bool>& wake_steering_ref() {
  static std::atomic<bool> on{[] {
    const char* env = std::getenv("AIMASS_WAKE_STEER");
    return !(env && std::atoi(env) == 0);
  }()};
  return on;
}
std::atomic<int> g_runs_active{0};  // RunScopes alive, in every thread
// Where the pool's caller last was: stored at every job, wake-up and run step (RunScope::step),
// read by polling workers to step off it. Global, not the pool's: a run step may store it while
// another thread replaces the pool.
std::atomic<int> g_caller_cpu{-1};

// Polls ready() until it is true or `limit` has passed; returns ready().
template <class Ready>
bool spin_until(const Ready& ready, std::chrono::microseconds limit) {
  if (ready()) return true;
  if (limit.count() <= 0) return false;
  const auto until = std::chrono::steady_clock::now() + limit;
  for (int i = 0;; ++i) {
    if (ready()) return true;
    cpu_relax();
    if ((i & 63) == 63 && std::chrono::steady_clock::now() >= until) return ready();
  }
}

// The hand-off is lock-free: a job is published by one 64-bit store of `state_` (the job's
// generation, its chunk count and the next unclaimed chunk), and every chunk is claimed by a
// compare-and-swap on it. The count lives in the same word: a worker that read a finished job's
// word (every chunk claimed) can never claim "one more" chunk of it against a newer count, and a
// claim fails once a newer job is published, so a worker never runs a chunk of a finished job.
// The caller never takes a lock unless a thread is parked: a round trip between two polling
// threads costs a few cache-line transfers instead of the four mutex hand-offs and two condition
// variables it used to (a 2-chunk job of ~3.3 us per chunk: 6.7-7.3 us -> 4.0-4.3 us per job at
// 2 threads, best of 400 bursts on a loaded 2-vCPU VM; serially 6.5 us). Idle workers poll
// state_ for spin_time() before parking on a condition variable; the publisher notifies only
// when one is parked (sleepers_, a Dekker-style handshake with seq_cst on both sides, so no
// wake-up is lost).
class Pool {
 public:
  using Fn = std::function<void(int, int)>;
  static constexpr int kCountBits = 20;
  static constexpr uint64_t kCountMask = (uint64_t{1} << kCountBits) - 1;
  static constexpr int kMaxChunks = static_cast<int>(kCountMask);  // per job
  static constexpr uint64_t kGenMask = (uint64_t{1} << (64 - 2 * kCountBits)) - 1;

  explicit Pool(int nworkers) : parked_(static_cast<size_t>(nworkers)) {
    for (int i = 0; i < nworkers; ++i) workers_.emplace_back([this, i] { loop(parked_[static_cast<size_t>(i)]); });
  }
  ~Pool() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      stop_.store(true);
    }
    cv_.notify_all();
    for (auto& t : workers_) t.join();
  }
  int size() const { return static_cast<int>(workers_.size()) + 1; }

  // Parked workers start polling again (a wake-up without a job), so that the next job,
  // published within max(spin_time(), poll), finds them awake.
  void wake(std::chrono::microseconds poll) {
    const int cpu = sched_getcpu();
    g_caller_cpu.store(cpu, std::memory_order_relaxed);
    wake_poll_us_.store(poll.count());
    wake_seq_.fetch_add(1);
    notify_sleepers(cpu);
  }

  // 1 <= nchunks <= kMaxChunks
  void run(int nchunks, const Fn& fn) {
    const int cpu = sched_getcpu();
    g_caller_cpu.store(cpu, std::memory_order_relaxed);
    fn_.store(&fn, std::memory_order_relaxed);
    done_.store(0, std::memory_order_relaxed);
    error_ = nullptr;
    const uint64_t gen = (generation(state_.load()) + 1) & kGenMask;
    // seq_cst: publishes the fields above
    state_.store(gen << (2 * kCountBits) | static_cast<uint64_t>(nchunks) << kCountBits);
    notify_sleepers(cpu);
    drain(gen);
    if (!spin_until([&] { return done_.load() == nchunks; }, spin_time() + std::chrono::microseconds(50))) {
      // a worker holds a chunk and is slow (descheduled?): sleep until it finishes
      std::unique_lock<std::mutex> lk(mu_);
      caller_parked_.store(true);
      done_cv_.wait(lk, [&] { return done_.load() == nchunks; });
      caller_parked_.store(false);
    }
    fn_.store(nullptr, std::memory_order_relaxed);
    restore_narrowed();
    if (error_) std::rethrow_exception(error_);
  }

 private:
  static uint64_t generation(uint64_t s) { return s >> (2 * kCountBits); }

  // A worker woken by the caller is often placed on the caller's CPU (the scheduler's
  // wake-affine choice); the two then share one core, polling, until load balancing moves one
  // of them, milliseconds later. Measured on the 2-vCPU VM: BERT mini at 2 threads, batch 1,
  // after a 50 ms idle gap took 6-8 ms in most calls (3.5 ms back to back, 7 ms at 1 thread);
  // with the threads on different CPUs 3.8-4.1 ms. So a worker that finds itself on the
  // caller's CPU steps off it: its affinity briefly excludes that CPU (the kernel migrates it
  // at once), then the original mask is restored, so nothing stays pinned.
  void step_off_caller_cpu() {
#ifdef __linux__
    const int cc = g_caller_cpu.load(std::memory_order_relaxed);
    if (cc < 0 || cc >= CPU_SETSIZE || sched_getcpu() != cc) return;
    cpu_set_t mask;
    if (sched_getaffinity(0, sizeof(mask), &mask) != 0) return;
    if (CPU_COUNT(&mask) < 2 || !CPU_ISSET(cc, &mask)) return;
    cpu_set_t others = mask;
    CPU_CLR(cc, &others);
    if (sched_setaffinity(0, sizeof(others), &others) == 0) sched_setaffinity(0, sizeof(mask), &mask);
#endif
  }

  void notify_sleepers(int caller_cpu) {
    if (sleepers_.load() > 0) {
      {
        std::lock_guard<std::mutex> lk(mu_);  // a worker between its check and its wait holds mu_
        if (wake_steering_ref().load(std::memory_order_relaxed))
          for (auto& p : parked_) steer_off(p, caller_cpu);
      }
      cv_.notify_all();
    }
  }

  // What a parked worker needs for its wake-up to land off the caller's CPU. `parked` is guarded by
  // mu_ (set before the worker waits, cleared as it returns from the wait); `mask` (its own
  // affinity, taken as it parks) by the worker's `mask_mu`, so that the caller can restore it
  // without mu_ (a worker returning from its wait needs mu_: holding it would put the worker back
  // to sleep on the mutex, and its second wake-up could land anywhere).
  struct Parked {
    bool parked = false;
    std::atomic<bool> narrowed{false};  // the waker excluded its CPU; whoever clears it restores the mask
    std::atomic<int64_t> steered_at_ns{0};  // steady_clock time of that narrowing (restore_narrowed)
#ifdef __linux__
    pid_t tid = 0;
    std::mutex mask_mu;
    cpu_set_t mask{};
#endif
  };

  // The scheduler places a woken thread on the waker's CPU whenever it judges that cheaper than
  // an idle one (wake-affine; on this Firecracker VM's kernel also its vCPU packing), and there
  // the worker waits behind a caller that runs back-to-back jobs until the caller's time slice
  // ends: measured 1.5-5 ms after an idle gap of 1-200 ms, in which every job ran on the caller
  // alone (int8 2048x2048 batch 1 at 2 threads: 1-thread latency for the first ~30 calls).
  // step_off_caller_cpu() fixes it only once the worker runs, i.e. after that wait. So the waker
  // excludes its own CPU from a parked worker's affinity before the wake-up (the kernel picks the
  // woken thread's CPU then, among the allowed ones). The mask is restored right after: by the
  // worker once it has run the job that woke it, or by the caller at the end of a job that ends
  // over 2 ms after the wake-up (restore_narrowed), whichever comes first, so a worker that cannot
  // get its one allowed CPU (another process, a real-time task) is not held there. One or two syscalls per parked
  // worker, only on a wake-up after idle; skipped where the mask has one CPU (a process or an
  // MPI rank bound to a core) or does not hold the caller's CPU. AIMASS_WAKE_STEER=0
  // (set_wake_steering) turns it off for A/B runs. Called with mu_ held.
  void steer_off(Parked& p, int caller_cpu) {
#ifdef __linux__
    if (!p.parked || p.narrowed.load() || caller_cpu < 0 || caller_cpu >= CPU_SETSIZE) return;
    std::lock_guard<std::mutex> lk(p.mask_mu);
    if (CPU_COUNT(&p.mask) < 2 || !CPU_ISSET(caller_cpu, &p.mask)) return;
    cpu_set_t others = p.mask;
    CPU_CLR(caller_cpu, &others);
    if (sched_setaffinity(p.tid, sizeof(others), &others) == 0) {
      p.steered_at_ns.store(now_ns(), std::memory_order_relaxed);
      p.narrowed.store(true);
      narrowed_.fetch_add(1);
    }
#else
    (void)p;
    (void)caller_cpu;
#endif
  }

  // Gives a narrowed worker its mask back unless someone already did; tid 0 is the calling thread.
  void restore_mask(Parked& p, bool own) {
    if (!p.narrowed.load(std::memory_order_relaxed) || !p.narrowed.exchange(false)) return;
    narrowed_.fetch_sub(1);
#ifdef __linux__
    std::lock_guard<std::mutex> lk(p.mask_mu);
    sched_setaffinity(own ? 0 : p.tid, sizeof(p.mask), &p.mask);
#else
    (void)own;
#endif
  }

  // The caller, at the end of a job: workers narrowed for a wake-up over 2 ms ago and still not
  // running get their masks back now. Not sooner: a worker restores its own mask as soon as it runs
  // (50-100 us after the wake-up on this VM), and a restore by the caller is a syscall on every
  // short call that follows an idle gap (isolated Session.run calls 200 us apart read a few per
  // cent slower with it).
  void restore_narrowed() {
    if (narrowed_.load(std::memory_order_relaxed) == 0) return;
    // each worker by its own narrowing's age: one that cannot get its one allowed CPU gets its mask
    // back even while the caller keeps steering the others
    const int64_t now = now_ns();
    for (auto& p : parked_)
      if (p.narrowed.load(std::memory_order_acquire) &&  // (acquire: the time stored before the flag)
          now - p.steered_at_ns.load(std::memory_order_relaxed) >= 2000000)
        restore_mask(p, false);
  }

  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // Claims and runs chunks of job `gen` until none is left or a newer job replaced it.
  void drain(uint64_t gen) {
    const bool prev = t_in_pool_task;
    t_in_pool_task = true;
    for (;;) {
      uint64_t s = state_.load();
      if (generation(s) != gen) break;
      const int n = static_cast<int>((s >> kCountBits) & kCountMask);
      const int c = static_cast<int>(s & kCountMask);
      if (c >= n) break;
      // read before the claim: a successful claim proves the job was still open (chunk c
      // unfinished), so the caller cannot have replaced its function yet
      const Fn* fn = fn_.load(std::memory_order_relaxed);
      if (!state_.compare_exchange_weak(s, s + 1)) continue;
      try {
        (*fn)(c, n);
      } catch (...) {
        std::lock_guard<std::mutex> lk(err_mu_);
        if (!error_) error_ = std::current_exception();
      }
      if (done_.fetch_add(1) + 1 == n && caller_parked_.load()) {
        { std::lock_guard<std::mutex> lk(mu_); }
        done_cv_.notify_all();
      }
    }
    t_in_pool_task = prev;
  }

  // Polls for news for `poll`, and on while a run is in progress, until run_spin_us has passed
  // with no news. While polling it steps off the caller's CPU whenever it finds itself there (the
  // caller publishes its CPU at every job and run step), not only when a job arrives: a polling
  // worker that shares the caller's CPU takes half of the caller's time for the serial ops.
  template <class News>
  bool poll_for_news(const News& news, std::chrono::microseconds poll) {
    if (news()) return true;
    const auto start = std::chrono::steady_clock::now();
    for (int i = 0;; ++i) {
      if (news()) return true;
      cpu_relax();
      if ((i & 63) != 63) continue;
      const auto now = std::chrono::steady_clock::now();
      if (now - start < poll) continue;
      if (g_runs_active.load(std::memory_order_relaxed) == 0) return news();
      const int64_t run_us = run_spin_us_ref().load(std::memory_order_relaxed);
      if (now - start >= poll + std::chrono::microseconds(run_us)) return news();
      if ((i & 255) == 255) step_off_caller_cpu();
      // The caller publishes its CPU only between ops: moved onto this CPU during one, it waits
      // behind this poll for a whole time slice (milliseconds). A yield now and then hands the CPU
      // back to whichever thread shares it (the caller, or another process on a loaded machine);
      // alone on its CPU, a yield is a 1 us syscall every ~40 us of polling.
      if ((i & 2047) == 2047) sched_yield();
    }
  }

  void loop(Parked& me) {
#ifdef __linux__
    {
      std::lock_guard<std::mutex> lk(mu_);
      me.tid = static_cast<pid_t>(syscall(SYS_gettid));
    }
#endif
    uint64_t seen_gen = generation(state_.load());
    uint64_t seen_wake = wake_seq_.load();
    std::chrono::microseconds poll = spin_time();
    for (;;) {
      auto news = [&] { return generation(state_.load()) != seen_gen || wake_seq_.load() != seen_wake || stop_.load(); };
      if (!poll_for_news(news, poll)) {
        std::unique_lock<std::mutex> lk(mu_);
#ifdef __linux__
        {
          // parked only with a mask to restore: the waker narrows it (steer_off) before the wake-up
          std::lock_guard<std::mutex> mk(me.mask_mu);
          me.parked = sched_getaffinity(0, sizeof(me.mask), &me.mask) == 0;
        }
#endif
        sleepers_.fetch_add(1);  // then re-check: pairs with notify_sleepers()
        cv_.wait(lk, news);
        sleepers_.fetch_sub(1);
        me.parked = false;
      }
      if (stop_.load()) return;
      step_off_caller_cpu();
      const uint64_t wake = wake_seq_.load();
      const uint64_t gen = generation(state_.load());
      if (gen != seen_gen) {
        seen_gen = gen;
        drain(gen);  // first: the mask's syscall must not delay the job that woke it
        poll = spin_time();
      } else if (wake != seen_wake) {  // a wake() without a job: poll as long as it asked
        poll = std::max(spin_time(), std::chrono::microseconds(wake_poll_us_.load()));
      }
      seen_wake = wake;
      restore_mask(me, true);  // narrowed for this wake-up: its mask back before it polls or parks
    }
  }

  std::vector<Parked> parked_;  // one per worker
  std::atomic<int> narrowed_{0};  // workers whose mask steer_off narrowed and nobody restored yet
  std::vector<std::thread> workers_;
  alignas(64) std::atomic<uint64_t> state_{0};  // generation << 40 | chunk count << 20 | next chunk
  alignas(64) std::atomic<int> done_{0};         // chunks finished in the current job
  std::atomic<const Fn*> fn_{nullptr};
  std::atomic<uint64_t> wake_seq_{0};
  std::atomic<int64_t> wake_poll_us_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<bool> caller_parked_{false};
  std::atomic<bool> stop_{false};
  std::mutex mu_, err_mu_;
  std::condition_variable cv_, done_cv_;
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
  if (nchunks <= Pool::kMaxChunks) {
    g_pool->run(nchunks, fn);
    return;
  }
  for (int base = 0; base < nchunks; base += Pool::kMaxChunks) {  // a job's count has 20 bits
    const int m = std::min(Pool::kMaxChunks, nchunks - base);
    g_pool->run(m, [&](int c, int) { fn(base + c, nchunks); });
  }
}

void parallel_steps(int64_t nsteps, int nchunks, const std::function<void(int64_t, int, int)>& fn) {
  AIMASS_CHECK(nsteps >= 0 && nchunks >= 1, ValueError, "parallel_steps: nsteps=", nsteps, " nchunks=", nchunks,
               " (need nsteps >= 0, nchunks >= 1)");
  if (nsteps == 0) return;
  const int nthreads = std::min(nchunks, threads_setting());
  if (nthreads <= 1 || t_in_pool_task) {
    for (int64_t s = 0; s < nsteps; ++s)
      for (int c = 0; c < nchunks; ++c) fn(s, c, nchunks);
    return;
  }
  struct alignas(64) Claim {
    std::atomic<int64_t> next{0};  // the next step of this chunk to claim
  };
  std::vector<Claim> claims(static_cast<size_t>(nchunks));
  alignas(64) std::atomic<int64_t> done{0};  // chunks finished, over all steps
  std::atomic<bool> failed{false};
  // Claims chunk c of its next step if that step may start; runs it; false when it could not.
  auto try_run = [&](int c) {
    int64_t s = claims[static_cast<size_t>(c)].next.load(std::memory_order_acquire);
    if (s >= nsteps || done.load(std::memory_order_acquire) < s * nchunks) return false;
    if (!claims[static_cast<size_t>(c)].next.compare_exchange_strong(s, s + 1)) return false;
    try {
      fn(s, c, nchunks);
    } catch (...) {
      // the step never completes: the others stop at their next look, and the pool rethrows
      // the first error on the caller
      failed.store(true);
      throw;
    }
    done.fetch_add(1);
    return true;
  };
  parallel_chunks(nthreads, [&](int p, int np) {
    // participant p owns chunks p, p + np, ...; others' chunks only once its own step is done
    int64_t waited = 0;
    auto last_check = std::chrono::steady_clock::now();
    for (;;) {
      if (failed.load(std::memory_order_relaxed)) return;
      bool ran = false, left = false;
      int64_t own = nsteps;  // the earliest step of its own chunks not yet claimed
      for (int c = p; c < nchunks; c += np) {
        ran |= try_run(c);
        own = std::min(own, claims[static_cast<size_t>(c)].next.load(std::memory_order_relaxed));
      }
      left = own < nsteps;
      if (!ran)
        for (int c = 0; c < nchunks; ++c) {
          if (c % np == p) continue;
          const int64_t sc = claims[static_cast<size_t>(c)].next.load(std::memory_order_relaxed);
          if (sc >= nsteps) continue;
          left = true;
          // only a step whose own chunks it has claimed: right after a step completes, its
          // owner (which finished it) is about to claim its chunk of the next one
          if (sc < own && try_run(c)) {
            ran = true;
            break;  // back to its own chunks first
          }
        }
      if (!left) return;  // every chunk of every step claimed (the others finish theirs)
      if (ran) {
        waited = 0;
        continue;
      }
      // waiting for the previous step: poll, and yield the core once that has taken long
      // (the thread it waits for may be descheduled on a loaded machine)
      cpu_relax();
      if ((++waited & 63) == 0) {
        const auto now = std::chrono::steady_clock::now();
        if (waited == 64) last_check = now;
        else if (now - last_check > std::chrono::microseconds(200)) sched_yield();
      }
    }
  });
}

void wake_workers(int poll_us) {
  AIMASS_CHECK(poll_us >= 0, ValueError, "wake_workers: poll_us=", poll_us, " must be >= 0");
  if (threads_setting() == 1) return;
  std::unique_lock<std::mutex> lk(g_pool_mu, std::try_to_lock);
  if (!lk.owns_lock()) return;  // another thread is using the pool: its workers are awake
  if (g_pool) g_pool->wake(std::chrono::microseconds(std::min(poll_us, 100000)));
}

void set_wake_steering(bool on) { wake_steering_ref().store(on); }

bool wake_steering() { return wake_steering_ref().load(); }

void set_run_spin_us(int us) {
  AIMASS_CHECK(us >= 0 && us <= 1000000, ValueError, "set_run_spin_us: us=", us, " must be in [0, 1000000]");
  run_spin_us_ref().store(us);
}

int run_spin_us() { return static_cast<int>(run_spin_us_ref().load()); }

RunScope::RunScope() : active_(threads_setting() > 1) {
  if (!active_) return;
  g_runs_active.fetch_add(1);
  wake_workers();
}

RunScope::~RunScope() {
  if (active_) g_runs_active.fetch_sub(1);
}

void RunScope::step() {
  if (active_) g_caller_cpu.store(sched_getcpu(), std::memory_order_relaxed);
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
