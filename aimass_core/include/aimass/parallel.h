// The engine's one CPU thread pool. Kernels split work with parallel_for; the
// pool is created on first use with num_threads() workers (default: the cores
// this process may use; AIMASS_NUM_THREADS or set_num_threads changes it).
// A parallel_for called from inside a pool task, or while another thread holds
// the pool, runs serially on the caller: it never deadlocks and never
// oversubscribes the cores. Idle workers poll for the next job for up to 50 us
// (AIMASS_SPIN_US) before sleeping, so back-to-back small jobs skip the wake-up latency;
// handing a job to a polling worker takes no lock.
#pragma once
#include <cstdint>
#include <functional>

namespace aimass {

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

// A hint: sleeping workers start polling again without a job, for max(AIMASS_SPIN_US,
// poll_us) (poll_us >= 0, else ValueError; capped at 100000), so that a parallel_for issued within that time finds
// them awake. Call it before single-threaded work that precedes parallel work (the runtime
// does at the start of a run; the HTTP server when a request arrives) so that their wake-up
// (tens of microseconds on a VM) overlaps it. No-op at 1 thread, before the pool exists, or
// while another thread is using the pool.
void wake_workers(int poll_us = 0);

}  // namespace aimass
