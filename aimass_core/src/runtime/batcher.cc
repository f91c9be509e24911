#include "aimass/batcher.h"
#include "runtime/json.h"

#include <algorithm>
#include <cstring>

#include "aimass/error.h"

namespace aimass::runtime {

using Clock = std::chrono::steady_clock;
// Longer waits would overflow steady_clock arithmetic; callers loop instead.
constexpr int64_t kMaxWaitUs = int64_t{1} << 40;

namespace {
// Higher priority first, then arrival order: the heap's top is the next to run.
struct Later {
  bool operator()(const std::shared_ptr<Request>& a, const std::shared_ptr<Request>& b) const;
};
double us_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double, std::micro>(b - a).count();
}
Histogram make_hist(std::vector<double> bounds) {
  Histogram h;
  h.bounds = std::move(bounds);
  h.counts.assign(h.bounds.size() + 1, 0);
  return h;
}
std::vector<double> pow2_bounds(double first, int n) {
  std::vector<double> b;
  for (int i = 0; i < n; ++i) b.push_back(first * static_cast<double>(int64_t{1} << i));
  return b;
}
}  // namespace

void Histogram::add(double v) {
  size_t i = std::lower_bound(bounds.begin(), bounds.end(), v) - bounds.begin();
  counts[i]++;
  count++;
  sum += v;
}

// ---------------------------------------------------------------- Request
void Request::pass_wake() {
  std::shared_ptr<Request> next;
  {
    std::lock_guard<std::mutex> lk(mu_);
    next = std::move(wake_next_);
  }
  if (next) next->cv_.notify_all();  // its outcome was set (under its mutex) before ours
}
void Request::wait() {
  {
    std::unique_lock<std::mutex> lk(mu_);
    cv_.wait(lk, [&] { return outcome_ != Outcome::Pending; });
  }
  pass_wake();
  if (error_) std::rethrow_exception(error_);
}
bool Request::wait_for(int64_t timeout_us) {
  bool done;
  {
    std::unique_lock<std::mutex> lk(mu_);
    done = cv_.wait_for(lk, std::chrono::microseconds(std::clamp<int64_t>(timeout_us, 0, kMaxWaitUs)),
                        [&] { return outcome_ != Outcome::Pending; });
  }
  if (done) pass_wake();
  return done;
}
bool Request::done() const {
  std::lock_guard<std::mutex> lk(mu_);
  return outcome_ != Outcome::Pending;
}
Outcome Request::outcome() const {
  std::lock_guard<std::mutex> lk(mu_);
  return outcome_;
}
void Request::rethrow() const {
  std::lock_guard<std::mutex> lk(mu_);
  AIMASS_CHECK(outcome_ != Outcome::Pending, ValueError, "request ", id_, " has not finished yet");
  if (error_) std::rethrow_exception(error_);
}

bool Later::operator()(const std::shared_ptr<Request>& a, const std::shared_ptr<Request>& b) const {
  if (a->priority() != b->priority()) return a->priority() < b->priority();
  return a->id() > b->id();
}

// ---------------------------------------------------------------- Batcher
Batcher::Batcher(std::shared_ptr<Executor> executor, BatcherOptions opts)
    : executor_(std::move(executor)), opts_(opts) {
  AIMASS_CHECK(executor_, ValueError, "Batcher: executor is null");
  AIMASS_CHECK(opts_.max_batch_size >= 1, ValueError, "max_batch_size=", opts_.max_batch_size, " must be >= 1");
  AIMASS_CHECK(opts_.max_queue_delay_us >= 0 && opts_.max_queue_delay_us <= int64_t{1000000000000000}, ValueError,
               "max_queue_delay_us=", opts_.max_queue_delay_us, " must be in [0, 1e15]");
  AIMASS_CHECK(opts_.queue_capacity >= 1, ValueError, "queue_capacity=", opts_.queue_capacity, " must be >= 1");
  executor_->reserve(opts_.max_batch_size);
  init_varlen();
  stats_.queue_us = make_hist(pow2_bounds(1, 24));
  stats_.compute_us = make_hist(pow2_bounds(1, 24));
  stats_.batch_rows = make_hist(pow2_bounds(1, 12));
  stats_.batch_requests = make_hist(pow2_bounds(1, 12));
  heap_.reserve(opts_.queue_capacity);
  thread_ = std::thread([this] { loop(); });
}

void Batcher::init_varlen() {
  const Model& m = executor_->model();
  auto it = m.metadata().find("aimass.padding");
  if (it == m.metadata().end() || !executor_->dynamic()) return;
  json::Value v = json::parse(it->second.data(), it->second.size(), "aimass.padding metadata");
  const json::Value* mask = v.find("mask_input");
  const json::Value* pad = v.find("mask_pad_value");
  if (const json::Value* w = v.find("max_waste")) {
    AIMASS_CHECK(w->is_number() && w->num >= 0 && w->num <= 1, ValueError, m.path(),
                 ": aimass.padding max_waste must be a number in [0, 1]");
    max_waste_ = w->num;
  }
  AIMASS_CHECK(v.is_object() && mask && mask->is_string(), ValueError, m.path(),
               ": metadata 'aimass.padding' must be {\"mask_input\": name, \"mask_pad_value\": number}");
  auto layout = [&](const TensorSpec& t) {
    SeqLayout l;
    l.elem = t.dtype == ValueType::Int64 ? 8 : 4;
    for (size_t d = 1; d < t.shape.size(); ++d) {
      if (t.shape[d] < 0) {
        AIMASS_CHECK(l.dim < 0, ValueError, m.path(), ": '", t.name,
                     "' has two dynamic dims; variable-length batching pads one");
        l.dim = static_cast<int>(d);
      } else if (l.dim < 0) {
        l.outer *= t.shape[d];
      } else {
        l.inner *= t.shape[d];
      }
    }
    return l;
  };
  bool found = false;
  for (const auto& t : m.inputs()) {
    in_layout_.push_back(layout(t));
    if (t.name == mask->str) {
      AIMASS_CHECK(in_layout_.back().dim >= 0, ValueError, m.path(), ": padding mask input '", t.name,
                   "' has no dynamic sequence dim");
      in_layout_.back().pad = pad && pad->is_number() ? pad->num : 0.0;
      found = true;
    }
  }
  AIMASS_CHECK(found, ValueError, m.path(), ": metadata 'aimass.padding' names mask input '", mask->str,
               "', which the model does not take");
  for (const auto& t : m.outputs()) out_layout_.push_back(layout(t));
  varlen_ = true;
}

Batcher::~Batcher() {
  try {
    close();
  } catch (...) {
  }
}

std::shared_ptr<Request> Batcher::submit(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows,
                                         int priority, int64_t timeout_us, bool notify, bool run_inline,
                                         int64_t seq) {
  return enqueue(std::move(inputs), std::move(outputs), rows, priority, timeout_us, notify, run_inline, false, seq);
}

std::shared_ptr<Request> Batcher::submit_then(std::vector<const void*> inputs, std::vector<void*> outputs,
                                              int64_t rows, int priority, int64_t timeout_us,
                                              std::function<void(uint64_t)> on_done) {
  return enqueue(std::move(inputs), std::move(outputs), rows, priority, timeout_us, false, false, false, 0, false,
                 &on_done);
}

void Batcher::run(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows, int priority,
                  int64_t timeout_us, int64_t seq) {
  enqueue(std::move(inputs), std::move(outputs), rows, priority, timeout_us, false, true, true, seq)->wait();
}

bool Batcher::try_run_inline(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows, int priority,
                             int64_t timeout_us, int64_t seq) {
  auto r = enqueue(std::move(inputs), std::move(outputs), rows, priority, timeout_us, false, true, true, seq, true);
  if (!r) return false;
  r->wait();  // done already; rethrows its error
  return true;
}

std::shared_ptr<Request> Batcher::enqueue(std::vector<const void*> inputs, std::vector<void*> outputs, int64_t rows,
                                          int priority, int64_t timeout_us, bool notify, bool run_inline,
                                          bool blocking, int64_t seq, bool inline_only,
                                          std::function<void(uint64_t)>* on_done) {
  const Model& m = executor_->model();
  AIMASS_CHECK(inputs.size() == m.inputs().size(), ValueError, "submit: got ", inputs.size(),
               " inputs, the model takes ", m.inputs().size());
  AIMASS_CHECK(outputs.size() == m.outputs().size(), ValueError, "submit: got ", outputs.size(),
               " output buffers, the model has ", m.outputs().size(), " outputs");
  AIMASS_CHECK(rows >= 1, ValueError, "submit: rows=", rows, " must be >= 1");
  // enqueued + timeout must not overflow the clock's nanoseconds (aimass.runtime's deadline_ms <= 1e12)
  constexpr int64_t kMaxTimeoutUs = int64_t{1000000000000000};
  AIMASS_CHECK(timeout_us <= kMaxTimeoutUs, ValueError, "submit: timeout_us=", timeout_us, " must be < 0 (none) or in [0, ",
               kMaxTimeoutUs, "]");
  AIMASS_CHECK(executor_->dynamic() ? seq >= 1 : seq == 0, ValueError, "submit: seq=", seq,
               executor_->dynamic() ? " must be >= 1 (the model has a dynamic sequence dim)"
                                    : " must be 0 (the model has no dynamic sequence dim)");
  auto r = std::make_shared<Request>();
  r->seq_ = seq;
  r->inputs_ = std::move(inputs);
  r->outputs_ = std::move(outputs);
  r->rows_ = rows;
  r->priority_ = priority;
  r->notify_ = notify;
  r->blocking_ = blocking;
  if (on_done) r->on_done_ = std::move(*on_done);
  r->enqueued_ = Clock::now();
  if (timeout_us >= 0) {
    r->has_deadline_ = true;
    r->deadline_ = r->enqueued_ + std::chrono::microseconds(timeout_us);
  }
  bool wake = true;
  {
    std::lock_guard<std::mutex> lk(mu_);
    if (closing_) {
      stats_.rejected_closed++;
      throw ClosedError("submit: the session is closed; create a new Session to run more requests");
    }
    const bool can_inline = run_inline && heap_.empty() && !busy_ && last_batch_requests_ <= 1;
    if (inline_only && !can_inline) return nullptr;  // the caller queues it another way
    if (static_cast<int64_t>(heap_.size()) >= opts_.queue_capacity) {
      stats_.rejected_full++;
      throw QueueFullError(detail::concat("submit: the request queue is full (queue_capacity=", opts_.queue_capacity,
                                          "); retry later or raise queue_capacity"));
    }
    r->id_ = next_id_++;
    stats_.submitted++;
    // Inline only without evident load: when the last batch held several requests,
    // others are about to come back, and queueing lets them share one batch.
    if (can_inline) {
      busy_ = true;
      stats_.inline_runs++;
      // The caller runs it and finds it done when submit returns: nobody needs it reported
      // through wait_completed (that would only wake the futures thread for nothing).
      r->notify_ = false;
    } else {
      run_inline = false;
      heap_.push_back(r);
      std::push_heap(heap_.begin(), heap_.end(), Later());
      heap_rows_ += rows;
      // While the scheduler gathers a batch it asks to be woken only once enough
      // requests (or rows) are in: one futex wake per batch instead of one per request.
      wake = static_cast<int64_t>(heap_.size()) >= wake_at_ || heap_rows_ >= wake_rows_;
    }
  }
  if (!run_inline) {
    if (wake) cv_.notify_one();
    return r;
  }
  // The executor is ours: run on this thread (an idle executor never makes a lone request wait).
  if (!r->has_deadline_ || Clock::now() < r->deadline_) {
    std::vector<std::shared_ptr<Request>> one{r};
    run_batch(one);  // frees the executor
    return r;
  }
  {
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
  }
  cv_.notify_all();
  finish(*r, Outcome::Timeout,
         std::make_exception_ptr(TimeoutError(
             detail::concat("request ", r->id_, " missed its deadline before it ran; it was not run"))));
  return r;
}

void Batcher::count(Outcome o) {
  switch (o) {
    case Outcome::Ok: stats_.ok++; break;
    case Outcome::Timeout: stats_.timeout++; break;
    case Outcome::Closed: stats_.rejected_closed++; break;
    default: stats_.error++; break;
  }
}

void Batcher::publish(Request& r, Outcome o, std::exception_ptr err) {
  {
    std::lock_guard<std::mutex> lk(r.mu_);
    r.outcome_ = o;
    r.error_ = std::move(err);
  }
  r.cv_.notify_all();
}

void Batcher::finish(Request& r, Outcome o, std::exception_ptr err) {
  // Count first so stats() already reflects a request its caller saw finish.
  {
    std::lock_guard<std::mutex> lk(mu_);
    count(o);
  }
  publish(r, o, std::move(err));
  if (r.on_done_) r.on_done_(r.id_);
  if (r.notify_) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      completed_.push_back(r.id_);
    }
    done_cv_.notify_all();
  }
}

void Batcher::loop() {
  std::vector<std::shared_ptr<Request>> batch, expired;
  batch.reserve(opts_.max_batch_size);
  std::unique_lock<std::mutex> lk(mu_);
  while (true) {
    cv_.wait(lk, [&] { return (!heap_.empty() || closing_) && !busy_; });
    if (heap_.empty() && closing_) break;
    batch.clear();
    expired.clear();
    int64_t rows = 0, batch_max_seq = 0, batch_tokens = 0;
    const auto take = [&] {
      const auto now = Clock::now();
      while (!heap_.empty()) {
        const auto& top = heap_.front();
        if (top->has_deadline_ && now >= top->deadline_) {
          std::pop_heap(heap_.begin(), heap_.end(), Later());
          heap_rows_ -= heap_.back()->rows_;
          expired.push_back(std::move(heap_.back()));
          heap_.pop_back();
          continue;
        }
        // An oversized request runs alone (the executor grows once for it).
        if (!batch.empty() && rows + top->rows_ > opts_.max_batch_size) break;
        // One batch runs one sequence length (models with a dynamic sequence dim), unless the
        // model declares a padding mask (then shorter requests are padded to the longest).
        if (!batch.empty() && top->seq_ != batch.front()->seq_ && !varlen_) break;
        if (varlen_ && !batch.empty()) {
          // Pad only while it wastes at most max_waste of the batch's positions (length buckets
          // in effect): padding 16-token requests to 128 costs more than running them apart.
          const int64_t longest = std::max(batch_max_seq, top->seq_);
          const int64_t real = batch_tokens + top->rows_ * top->seq_;
          const double total = static_cast<double>(longest) * static_cast<double>(rows + top->rows_);
          if (total - static_cast<double>(real) > max_waste_ * total) break;
        }
        std::pop_heap(heap_.begin(), heap_.end(), Later());
        rows += heap_.back()->rows_;
        heap_rows_ -= heap_.back()->rows_;
        batch_max_seq = std::max(batch_max_seq, heap_.back()->seq_);
        batch_tokens += heap_.back()->rows_ * heap_.back()->seq_;
        batch.push_back(std::move(heap_.back()));
        heap_.pop_back();
        if (rows >= opts_.max_batch_size) break;
      }
    };
    take();
    if (!batch.empty()) busy_ = true;  // from here the executor is the scheduler's (no inline runs)
    // Wait for more only under evident load, and at most the delay after the
    // oldest request arrived; stop once as many requests as last time are in.
    if (!batch.empty() && rows < opts_.max_batch_size && opts_.max_queue_delay_us > 0 && !closing_ &&
        (batch.size() >= 2 || last_batch_requests_ >= 2)) {
      Clock::time_point oldest = batch.front()->enqueued_;
      for (const auto& r : batch) oldest = std::min(oldest, r->enqueued_);
      const auto until = oldest + std::chrono::microseconds(opts_.max_queue_delay_us);
      const int64_t target = std::max<int64_t>((last_batch_requests_ + 1) / 2, 2);
      // A request still queued after take() did not fit (take() stops at the first that does
      // not): the batch cannot grow in order any more, so waiting would only add latency.
      while (rows < opts_.max_batch_size && static_cast<int64_t>(batch.size()) < target && !closing_ &&
             heap_.empty()) {
        wake_at_ = std::max<int64_t>(1, target - static_cast<int64_t>(batch.size()));
        wake_rows_ = std::max<int64_t>(1, opts_.max_batch_size - rows);
        const bool timed_out = cv_.wait_until(lk, until) == std::cv_status::timeout;
        take();
        if (timed_out) break;
      }
      wake_at_ = wake_rows_ = 1;
    }
    stats_.queue_depth = static_cast<int64_t>(heap_.size());
    lk.unlock();
    for (auto& r : expired)
      finish(*r, Outcome::Timeout,
             std::make_exception_ptr(TimeoutError(detail::concat(
                 "request ", r->id_, " missed its deadline after ",
                 static_cast<int64_t>(us_between(r->enqueued_, Clock::now())), " us in the queue; it was not run"))));
    if (!batch.empty()) run_batch(batch);  // frees the executor
    lk.lock();
  }
  stopped_ = true;
  lk.unlock();
  done_cv_.notify_all();
}

std::exception_ptr Batcher::execute(std::vector<std::shared_ptr<Request>>& batch, size_t first, size_t last,
                                    bool record_failure) {
  const Model& m = executor_->model();
  const auto start = Clock::now();
  int64_t rows = 0;
  for (size_t j = first; j < last; ++j) rows += batch[j]->rows_;
  std::exception_ptr err;
  int64_t seq = 0;
  bool mixed = false;
  for (size_t j = first; j < last; ++j) {
    mixed = mixed || (j > first && batch[j]->seq_ != seq);
    seq = std::max(seq, batch[j]->seq_);
  }
  try {
    executor_->set_seq_len(seq);
    executor_->reserve(rows);
    if (mixed) {  // pad each request to `seq` (varlen_ models only)
      for (size_t i = 0; i < m.inputs().size(); ++i) {
        auto* dst = static_cast<uint8_t*>(executor_->input_buffer(static_cast<int>(i)));
        const int64_t rb = executor_->input_row_bytes(static_cast<int>(i));
        const SeqLayout& l = in_layout_[i];
        int64_t off = 0;
        for (size_t j = first; j < last; ++j) {
          const Request& r = *batch[j];
          const auto* src = static_cast<const uint8_t*>(r.inputs_[i]);
          if (l.dim < 0) {
            std::memcpy(dst + off * rb, src, r.rows_ * rb);
          } else {
            const int64_t have = r.seq_ * l.inner * l.elem, want = seq * l.inner * l.elem;
            for (int64_t o = 0; o < r.rows_ * l.outer; ++o) {
              uint8_t* d = dst + off * rb + o * want;
              std::memcpy(d, src + o * have, have);
              const int64_t n = (want - have) / l.elem;
              if (l.elem == 8) {
                const auto pv = static_cast<int64_t>(l.pad);
                for (int64_t k = 0; k < n; ++k) std::memcpy(d + have + 8 * k, &pv, 8);
              } else {
                const auto pv = static_cast<float>(l.pad);
                for (int64_t k = 0; k < n; ++k) std::memcpy(d + have + 4 * k, &pv, 4);
              }
            }
          }
          off += r.rows_;
        }
      }
      executor_->execute(rows);
      for (size_t i = 0; i < m.outputs().size(); ++i) {
        const auto* src = static_cast<const uint8_t*>(executor_->output_buffer(static_cast<int>(i)));
        const int64_t rb = executor_->output_row_bytes(static_cast<int>(i));
        const SeqLayout& l = out_layout_[i];
        int64_t off = 0;
        for (size_t j = first; j < last; ++j) {
          Request& r = *batch[j];
          auto* dst = static_cast<uint8_t*>(r.outputs_[i]);
          if (l.dim < 0) {
            std::memcpy(dst, src + off * rb, r.rows_ * rb);
          } else {
            const int64_t have = r.seq_ * l.inner * l.elem, want = seq * l.inner * l.elem;
            for (int64_t o = 0; o < r.rows_ * l.outer; ++o) std::memcpy(dst + o * have, src + off * rb + o * want, have);
          }
          off += r.rows_;
        }
      }
    }
    for (size_t i = 0; i < m.inputs().size() && !mixed; ++i) {
      const int64_t rb = executor_->input_row_bytes(static_cast<int>(i));
      auto* dst = static_cast<uint8_t*>(executor_->input_buffer(static_cast<int>(i)));
      int64_t off = 0;
      for (size_t j = first; j < last; ++j) {
        std::memcpy(dst + off * rb, batch[j]->inputs_[i], batch[j]->rows_ * rb);
        off += batch[j]->rows_;
      }
    }
    if (!mixed) executor_->execute(rows);
    for (size_t i = 0; i < m.outputs().size() && !mixed; ++i) {
      const int64_t rb = executor_->output_row_bytes(static_cast<int>(i));
      const auto* src = static_cast<const uint8_t*>(executor_->output_buffer(static_cast<int>(i)));
      int64_t off = 0;
      for (size_t j = first; j < last; ++j) {
        std::memcpy(batch[j]->outputs_[i], src + off * rb, batch[j]->rows_ * rb);
        off += batch[j]->rows_;
      }
    }
  } catch (...) {
    err = std::current_exception();
  }
  if (!err || record_failure) {
    const auto end = Clock::now();
    std::lock_guard<std::mutex> lk(mu_);
    stats_.batches++;
    stats_.compute_us.add(us_between(start, end));
    stats_.batch_rows.add(static_cast<double>(rows));
    stats_.batch_requests.add(static_cast<double>(last - first));
    for (size_t j = first; j < last; ++j) stats_.queue_us.add(us_between(batch[j]->enqueued_, start));
  }
  return err;
}

void Batcher::run_batch(std::vector<std::shared_ptr<Request>>& batch) {
  std::vector<std::exception_ptr> errs(batch.size());
  std::exception_ptr err = execute(batch, 0, batch.size(), batch.size() == 1);
  if (err && batch.size() > 1) {
    // One bad request (e.g. an out-of-range embedding index) must not fail the
    // others: run each alone to give every request its own outcome.
    for (size_t j = 0; j < batch.size(); ++j) errs[j] = execute(batch, j, j + 1, true);
  } else {
    errs[0] = err;
  }
  // Free the executor before waking the callers: a caller that comes straight back
  // must find it idle (and run inline when there is no load), not still "busy". One
  // lock for the whole batch's counters (the callers' submits contend for it).
  // The scheduler sleeps until the queue has work (or closing) and the executor is free: wake it
  // only then. After an inline run on an idle session there is nothing for it, and waking it
  // anyway cost every such request a futex round trip and a context switch on the other core.
  bool any_notify = false, wake_scheduler;
  {
    std::lock_guard<std::mutex> lk(mu_);
    busy_ = false;
    last_batch_requests_ = static_cast<int64_t>(batch.size());
    for (size_t j = 0; j < batch.size(); ++j) {
      count(errs[j] ? Outcome::Error : Outcome::Ok);
      any_notify |= batch[j]->notify_;
    }
    wake_scheduler = !heap_.empty() || closing_;
  }
  if (wake_scheduler) cv_.notify_all();
  // Blocking callers: set every outcome (last first, linking each to the next) and wake
  // only the first; each waiter wakes the next (Request::pass_wake). Others: wake directly.
  std::shared_ptr<Request> first_blocking;
  for (size_t j = batch.size(); j-- > 0;) {
    Request& r = *batch[j];
    if (!r.blocking_) continue;
    std::lock_guard<std::mutex> lk(r.mu_);
    r.outcome_ = errs[j] ? Outcome::Error : Outcome::Ok;
    r.error_ = errs[j];
    r.wake_next_ = std::move(first_blocking);
    first_blocking = batch[j];
  }
  if (first_blocking) first_blocking->cv_.notify_all();
  for (size_t j = 0; j < batch.size(); ++j)
    if (!batch[j]->blocking_) publish(*batch[j], errs[j] ? Outcome::Error : Outcome::Ok, errs[j]);
  for (const auto& r : batch)  // submit_then's hooks, after every outcome is set
    if (r->on_done_) r->on_done_(r->id_);
  if (any_notify) {  // futures: report after every outcome is set
    {
      std::lock_guard<std::mutex> lk(mu_);
      for (const auto& r : batch)
        if (r->notify_) completed_.push_back(r->id_);
    }
    done_cv_.notify_all();
  }
}

std::vector<uint64_t> Batcher::wait_completed(int64_t timeout_us) {
  std::unique_lock<std::mutex> lk(mu_);
  done_cv_.wait_for(lk, std::chrono::microseconds(std::clamp<int64_t>(timeout_us, 0, kMaxWaitUs)),
                    [&] { return !completed_.empty() || stopped_; });
  std::vector<uint64_t> out(completed_.begin(), completed_.end());
  completed_.clear();
  return out;
}

void Batcher::close() {
  {
    std::lock_guard<std::mutex> lk(mu_);
    closing_ = true;
  }
  cv_.notify_all();
  if (thread_.joinable()) thread_.join();
}

bool Batcher::closed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return closing_;
}

BatcherStats Batcher::stats() const {
  std::lock_guard<std::mutex> lk(mu_);
  BatcherStats s = stats_;
  s.queue_depth = static_cast<int64_t>(heap_.size());
  return s;
}

}  // namespace aimass::runtime
