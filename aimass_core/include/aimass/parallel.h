// The engine's one CPU thread pool. Kernels split work with parallel_for; the
// pool is created on first use with num_threads() workers (default: the cores
// this process may use; AIMASS_NUM_THREADS or set_num_threads changes it).
// A parallel_for called from inside a pool task, or while another thread holds
// the pool, runs serially on the caller: it never deadlocks and never
// oversubscribes the cores. Idle workers poll for the next job for up to 50 us
// (AIMASS_SPIN_US) before sleeping, so back-to-back small jobs skip the wake-up latency;
// handing a job to a polling worker takes no lock. A sleeping worker is woken off the caller's
// CPU (set_wake_steering below), so that after an idle gap it does not queue behind the caller.
#pragma once
#include <cstdint>
#include <functional>

namespace aimass {

// The spin-wait hint (x86 PAUSE) for every polling loop: the pool's workers and the
// shared-memory transports. It lets the sibling hyperthread run and saves power while a
// peer's write is on its way.
inline void cpu_relax() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#endif
}

int num_threads();
// n >= 1; takes effect at the next parallel_for.
void set_num_threads(int n);

// Calls fn(begin, end) over disjoint chunks covering [begin, end), each at least
// `grain` long (except the last). Exceptions thrown by fn are rethrown on the
// caller (the first one) after every chunk has finished.
void parallel_for(int64_t begin, int64_t end, int64_t grain,
                  const std::function<void(int64_t, int64_t)>& fn);

// Like parallel_for but with an explicit number of chunks: fn(chunk, nchunks),
// chunks run concurrently where threads are free.
void parallel_chunks(int nchunks, const std::function<void(int, int)>& fn);

// A sequence of dependent parallel steps in one pool job: fn(step, chunk, nchunks) for every
// step in [0, nsteps) and chunk in [0, nchunks), where the chunks of one step run concurrently
// and none of step s starts before every chunk of step s - 1 has finished (what a recurrent
// layer's time loop needs). The threads step through together behind a shared counter instead
// of a pool hand-off per step. Each thread keeps to its own chunk index (its slice of the data
// stays in its cache) and takes over another's chunk of a step only once its own is done and
// that chunk is still unclaimed; a chunk is claimed only when its step may start, so a late or
// descheduled worker never holds up a step it has not begun: the caller runs whatever nobody
// else took (all of it, alone, when no worker shows up). nsteps >= 0, nchunks >= 1 (else
// ValueError). The first exception thrown by fn stops further claims and is rethrown on the
// caller once the running chunks have finished.
void parallel_steps(int64_t nsteps, int nchunks, const std::function<void(int64_t, int, int)>& fn);

// A hint: sleeping workers start polling again without a job, for max(AIMASS_SPIN_US,
// poll_us) (poll_us >= 0, else ValueError; capped at 100000), so that a parallel_for issued within that time finds
// them awake. Call it before single-threaded work that precedes parallel work (the runtime
// does at the start of a run; the HTTP server when a request arrives) so that their wake-up
// (tens of microseconds on a VM) overlaps it. No-op at 1 thread, before the pool exists, or
// while another thread is using the pool.
void wake_workers(int poll_us = 0);

// Brackets one inference run (the runtime's Executor::execute): it wakes parked workers
// (wake_workers()), and while any RunScope is alive idle workers keep polling between jobs for up
// to run_spin_us() with no job, instead of parking after AIMASS_SPIN_US, as onnxruntime's workers
// spin through a run. A parked worker costs a futex wake-up per parallel op, and the scheduler
// may place the woken worker on the caller's CPU. step() (a few ns) publishes the caller's CPU
// between ops, so that a polling worker that finds itself there moves off it (its affinity
// mask is restored at once: nothing stays pinned). No-op at 1 thread. Nests; any thread.
class RunScope {
 public:
  RunScope();
  ~RunScope();
  RunScope(const RunScope&) = delete;
  RunScope& operator=(const RunScope&) = delete;
  void step();

 private:
  bool active_;
};

// Whether a parked worker's wake-up is steered off the caller's CPU (default on; AIMASS_WAKE_STEER=0
// turns it off, read once). The scheduler often queues a woken worker on its waker's CPU, behind a
// caller that keeps it busy until its time slice ends (1.5-5 ms on the 2-vCPU VM): after an idle
// gap, 2 threads ran at 1 thread's speed for that long. Steered, the waker excludes its own CPU
// from each parked worker's affinity before the wake-up, and the worker restores its mask right
// after the job it woke for (one syscall each, only on a wake-up after idle; nothing stays
// pinned). No-op where the process may use one CPU only. set_wake_steering is for A/B runs.
void set_wake_steering(bool on);
bool wake_steering();

// How long an idle worker polls for the next job while a run is in progress (default 5000 us,
// AIMASS_RUN_SPIN_US); 0 turns run-long polling off. us in [0, 1000000], else ValueError.
void set_run_spin_us(int us);
int run_spin_us();

}  // namespace aimass
