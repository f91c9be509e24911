// Dynamic batcher: one scheduler thread in front of one Executor.
//
// Requests (each some rows of every model input, plus caller-owned output
// buffers) enter a bounded priority queue (higher priority first, FIFO within a
// priority). The scheduler takes as many rows as fit in max_batch_size; it only
// waits (at most max_queue_delay_us after the oldest request arrived) when load
// is evident, i.e. the batch it holds or the previous one had several requests,
// so a lone request on an idle executor runs at once. Expired requests fail with
// TimeoutError without running. Batch rows are copied back to each request's own
// output buffers. Every request ends in exactly one outcome, counted in stats().
#pragma once
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "aimass/runtime.h"

namespace aimass::runtime {

struct BatcherOptions {
  int64_t max_batch_size = 32;       // rows per executed batch (1 = batching off)
  int64_t max_queue_delay_us = 500;  // longest wait for more requests under load
  int64_t queue_capacity = 1024;     // queued requests before submit() throws QueueFullError
};

enum class Outcome : int { Pending = 0, Ok, Timeout, Error, Closed };

class Request {
 public:
  // Blocks until the request finished; rethrows its error (TimeoutError, ...).
  void wait();
  // Waits at most timeout_us; true when finished.
  bool wait_for(int64_t timeout_us);
  bool done() const;
  Outcome outcome() const;
  // Rethrows the error of a finished, failed request; no-op when it succeeded.
  void rethrow() const;
  uint64_t id() const { return id_; }
  int priority() const { return priority_; }

 private:
  friend class Batcher;
  std::vector<const void*> inputs_;
  std::vector<void*> outputs_;
  int64_t rows_ = 0;
  int priority_ = 0;
  uint64_t id_ = 0;
  bool notify_ = false;
  std::chrono::steady_clock::time_point enqueued_, deadline_;
  bool has_deadline_ = false;
  mutable std::mutex mu_;
  std::condition_variable cv_;
  Outcome outcome_ = Outcome::Pending;
  std::exception_ptr error_;
  // Batcher::run callers (always blocked in wait()) are woken in a chain: the scheduler
  // wakes the first of a batch, each waiter wakes the next. Waking 10-30 threads itself
  // cost the scheduler ~15 us each (every woken client preempted it on 2 cores), during
  // which the executor stood idle.
  bool blocking_ = false;
  int64_t seq_ = 0;  // sequence length (dynamic-sequence models)
  std::shared_ptr<Request> wake_next_;  // guarded by mu_
  std::function<void(uint64_t)> on_done_;  // submit_then's hook, called by finish()
  void pass_wake();                     // wakes wake_next_ (call with mu_ not held)
};

struct Histogram {
  std::vector<double> bounds;    // upper bounds of the buckets; the last bucket is +inf
  std::vector<uint64_t> counts;  // bounds.size() + 1 entries
  uint64_t count = 0;
  double sum = 0;
  void add(double v);
};

struct BatcherStats {
  uint64_t submitted = 0, ok = 0, timeout = 0, error = 0, rejected_full = 0, rejected_closed = 0;
  uint64_t batches = 0, inline_runs = 0;
  int64_t queue_depth = 0;
  Histogram queue_us, compute_us, batch_rows, batch_requests;
};

class Batcher {
 public:
  Batcher(std::shared_ptr<Executor> executor, BatcherOptions opts);
  ~Batcher();  // close()
  Batcher(const Batcher&) = delete;
  Batcher& operator=(const Batcher&) = delete;

  // inputs[i] points at rows * row_bytes of model input i, outputs[i] at room for
  // rows of output i; both must stay valid until the request is done.
  // timeout_us < 0: no deadline. notify: also report the id to wait_completed().
  // Throws QueueFullError, ClosedError, ValueError (bad rows / buffer counts).
  // run_inline: when the queue is empty, the executor idle and the last batch held
  // one request (no evident load), run the request on the calling thread (a
  // blocking caller then pays no thread hand-off); the call returns after the
  // request finished. Otherwise it is queued as usual.
  std::shared_ptr<Request> submit(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows,
                                  int priority = 0, int64_t timeout_us = -1, bool notify = false,
                                  bool run_inline = false, int64_t seq = 0);
  // submit() whose end (any outcome) calls on_done(id) on the finishing thread, after the
  // request is done: a completion hook for an event loop (aimass::serve::Frontend) that, unlike
  // notify, does not share wait_completed() with another consumer (a Session's futures thread).
  std::shared_ptr<Request> submit_then(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows,
                                       int priority, int64_t timeout_us, std::function<void(uint64_t)> on_done);
  // Submits with run_inline and blocks until the request finished; rethrows its error.
  // The blocking path of Session.run (its callers are woken in a chain, see Request).
  // seq: the request's sequence length for models with a dynamic sequence dim (buffers
  // hold rows of that length; a batch only holds requests of one length), else 0.
  void run(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows, int priority = 0,
           int64_t timeout_us = -1, int64_t seq = 0);
  // Runs the request on the calling thread if run_inline would (queue empty, executor idle,
  // no evident load) and returns true once it finished (rethrowing its error); otherwise
  // returns false at once, having queued and counted nothing (the caller then submits it).
  // An event loop's fast path: a lone request runs without a hand-off, a loaded session
  // never blocks the loop.
  bool try_run_inline(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows, int priority = 0,
                      int64_t timeout_us = -1, int64_t seq = 0);
  bool dynamic_seq() const { return executor_->dynamic(); }
  // Ids of finished notify-requests, waiting at most timeout_us for the first one.
  std::vector<uint64_t> wait_completed(int64_t timeout_us);
  // Rejects new requests, runs every queued one, stops the scheduler. Idempotent.
  void close();
  bool closed() const;
  BatcherStats stats() const;
  const BatcherOptions& options() const { return opts_; }
  const Model& model() const { return executor_->model(); }

 private:
  void loop();
  std::shared_ptr<Request> enqueue(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows,
                                   int priority, int64_t timeout_us, bool notify, bool run_inline, bool blocking,
                                   int64_t seq, bool inline_only = false,
                                   std::function<void(uint64_t)>* on_done = nullptr);
  // Runs the batch on the executor (which the caller holds: busy_), frees it, then
  // finishes every request.
  void run_batch(std::vector<std::shared_ptr<Request>>& batch);
  // Executes requests [first, last) of batch as one executor run; records stats unless it
  // failed and !record_failure (a failed batch is retried one request at a time).
  std::exception_ptr execute(std::vector<std::shared_ptr<Request>>& batch, size_t first, size_t last,
                             bool record_failure);
  void finish(Request& r, Outcome o, std::exception_ptr err);  // count + publish + report
  void count(Outcome o);                                        // stats_ counter; mu_ held
  void publish(Request& r, Outcome o, std::exception_ptr err);  // set the outcome, wake its waiters

  std::shared_ptr<Executor> executor_;
  BatcherOptions opts_;
  // Variable-length batching (models whose metadata names a padding mask input, see
  // docs/runtime.md): requests of different sequence lengths share a batch padded to the
  // longest; padded positions of the mask input get its pad value, of other inputs 0, and
  // each request gets back its own length.
  struct SeqLayout {
    int dim = -1;              // the dynamic dim (-1: none)
    int64_t outer = 1, inner = 1, elem = 4;
    double pad = 0;
  };
  bool varlen_ = false;
  double max_waste_ = 0.25;  // largest fraction of padded positions a batch may hold
  std::vector<SeqLayout> in_layout_, out_layout_;
  void init_varlen();
  mutable std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::shared_ptr<Request>> heap_;
  uint64_t next_id_ = 1;
  bool closing_ = false;
  bool stopped_ = false;
  bool busy_ = false;  // someone (scheduler or an inline caller) is running the executor
  int64_t last_batch_requests_ = 0;
  int64_t wake_at_ = 1;    // queued requests at which submit() wakes the scheduler
  int64_t wake_rows_ = 1;  // ... or queued rows
  int64_t heap_rows_ = 0;  // rows in the queue
  std::condition_variable done_cv_;
  std::deque<uint64_t> completed_;
  BatcherStats stats_;
  std::thread thread_;
};

}  // namespace aimass::runtime
