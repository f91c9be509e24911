// The collective engine (see aimass/collectives.h for the protocol summary).
//
// Every cycle each rank's background thread takes part in one MPI_Iallreduce
// (BAND) of a bit vector: word 0 carries control flags (negated flags make BAND
// act as OR), the other words one bit per response-cache entry whose name is
// pending locally with the cached arguments. Bits set on every rank are ready.
// When some rank has a request the cache cannot describe (new name, changed
// arguments, stalled), or the coordinator still tracks unfinished names, the
// round also gathers every rank's unreported requests at rank 0, which answers
// with ready names and errors (mismatch / timeout) by broadcast. Every rank
// executes the same ready list in the same order, so the data collectives
// always match.
#include <mpi.h>
#include <sched.h>
#include <sys/prctl.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <map>
#include <sstream>
#include <thread>
#include <tuple>
#include <unordered_map>
#include <unordered_set>

#include "aimass/collectives.h"
#include "aimass/comm_kernels.h"
#include "aimass/error.h"
#include "comm/shm_allreduce.h"

namespace aimass {

using Clock = std::chrono::steady_clock;

namespace {

double seconds_between(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

int64_t numel_of(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string shape_str(const std::vector<int64_t>& shape, bool free_dim0) {
  std::ostringstream os;
  os << "[";
  for (size_t i = 0; i < shape.size(); ++i) {
    if (i) os << ", ";
    if (i == 0 && free_dim0) os << "*";
    else os << shape[i];
  }
  os << "]";
  return os.str();
}

// What must agree across ranks, as readable text (compared as a whole).
std::string signature(const CollectiveRequest& r) {
  std::ostringstream os;
  os << collective_kind_name(r.kind) << "(";
  if (r.kind == CollectiveKind::Barrier) {
    os << ")";
    return os.str();
  }
  os << "dtype=" << dtype_name(r.dtype) << ", shape=" << shape_str(r.shape, r.kind == CollectiveKind::Allgather);
  if (r.kind == CollectiveKind::Allreduce || r.kind == CollectiveKind::ReduceScatter)
    os << ", op=" << reduce_op_name(r.op);
  if (r.wire != r.dtype) os << ", compression=" << dtype_name(r.wire);
  if (r.kind == CollectiveKind::Broadcast) os << ", root=" << r.root;
  os << ")";
  return os.str();
}

// ---- byte (de)serialisation for the coordinator messages
struct Writer {
  std::vector<char> buf;
  void u32(uint32_t v) { raw(&v, 4); }
  void f64(double v) { raw(&v, 8); }
  void str(const std::string& s) {
    u32(static_cast<uint32_t>(s.size()));
    raw(s.data(), s.size());
  }
  void raw(const void* p, size_t n) {
    const char* c = static_cast<const char*>(p);
    buf.insert(buf.end(), c, c + n);
  }
};
struct Reader {
  const char* p;
  const char* end;
  void need(size_t n) {
    AIMASS_CHECK(static_cast<size_t>(end - p) >= n, DistributedError, "aimass.dist: truncated coordinator message");
  }
  uint32_t u32() {
    uint32_t v;
    need(4);
    std::memcpy(&v, p, 4);
    p += 4;
    return v;
  }
  double f64() {
    double v;
    need(8);
    std::memcpy(&v, p, 8);
    p += 8;
    return v;
  }
  std::string str() {
    uint32_t n = u32();
    need(n);
    std::string s(p, n);
    p += n;
    return s;
  }
};

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::F32: return MPI_FLOAT;
    case DType::F64: return MPI_DOUBLE;
    case DType::I32: return MPI_INT32_T;
    case DType::I64: return MPI_INT64_T;
    case DType::I16: return MPI_INT16_T;
    case DType::I8: return MPI_INT8_T;
    case DType::U8: return MPI_UINT8_T;
    case DType::Bool: return MPI_C_BOOL;
    case DType::F16:
    case DType::BF16: return MPI_UINT16_T;
  }
  throw TypeError(std::string("aimass.dist: unsupported dtype ") + dtype_name(t));
}

// Integer average: the sum divided by the world size, truncated toward zero.
template <typename T>
void divide_ints(void* data, int64_t n, int size) {
  T* o = static_cast<T*>(data);
  for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(o[i] / size);
}

// ---- user-defined MPI ops for 16-bit floats (reduced in fp32, rounded once)
template <comm::Half K, comm::ElemOp O>
void half_op(void* in, void* inout, int* len, MPI_Datatype*) {
  comm::reduce_half(K, O, static_cast<const uint16_t*>(in), static_cast<uint16_t*>(inout), static_cast<size_t>(*len));
}

// Waits for a non-blocking MPI request: yields the CPU while spinning (the
// machine may be oversubscribed), sleeps after `spin_s`, and gives up after
// `timeout_s` (a peer that stopped answering).
void wait_mpi(MPI_Request* req, double spin_s, double timeout_s, const char* what) {
  const auto start = Clock::now();
  int flag = 0;
  for (uint64_t iter = 0;; ++iter) {
    check_mpi(MPI_Test(req, &flag, MPI_STATUS_IGNORE), what);
    if (flag) return;
    if ((iter & 63) == 0) {
      const double waited = seconds_between(start, Clock::now());
      if (waited > timeout_s) {
        throw DistributedError(detail::concat(
            "aimass.dist: ", what, " did not complete within ", timeout_s,
            " s: a peer rank has died or stopped calling aimass (raise AIMASS_COMM_TIMEOUT if it is only slow)"));
      }
      if (waited > spin_s) {
        std::this_thread::sleep_for(std::chrono::microseconds(100));
        continue;
      }
    }
    sched_yield();
  }
}

constexpr int64_t kMaxChunk = int64_t(1) << 30;  // MPI counts are int

}  // namespace

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

ReduceOp parse_reduce_op(const std::string& name) {
  if (name == "sum") return ReduceOp::Sum;
  if (name == "average" || name == "avg" || name == "mean") return ReduceOp::Average;
  if (name == "min") return ReduceOp::Min;
  if (name == "max") return ReduceOp::Max;
  if (name == "product" || name == "prod") return ReduceOp::Product;
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
  return o;
}

// ---------------------------------------------------------------- handle

bool CollectiveHandle::poll() const {
  std::lock_guard<std::mutex> lk(mu_);
  return done_;
}

void CollectiveHandle::wait() {
  if (on_wait_ && !poll()) on_wait_();
  std::unique_lock<std::mutex> lk(mu_);
  cv_.wait(lk, [&] { return done_; });
  switch (error_kind_) {
    case ErrorKind::None: return;
    case ErrorKind::Closed: throw ClosedError(error_);
    case ErrorKind::Value: throw ValueError(error_);
    case ErrorKind::Distributed: throw DistributedError(error_);
  }
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

// ---------------------------------------------------------------- engine

// Wakes the background thread: submissions, a caller blocking on a handle (flush), stop.
// Shared with the handles, which may outlive the engine.
struct EngineWaker {
  std::mutex mu;
  std::condition_variable cv;
  uint64_t submitted = 0;
  bool flush = false;
  bool stop = false;
  void notify(bool* flag) {
    {
      std::lock_guard<std::mutex> lk(mu);
      *flag = true;
    }
    cv.notify_one();
  }
};

struct CollectiveEngine::Impl {
  struct Pending {
    CollectiveRequest req;
    std::string sig;
    std::shared_ptr<CollectiveHandle> handle;
    Clock::time_point submitted;
    bool reported = false;
  };
  struct CacheEntry {
    std::string name;
    std::string sig;
  };
  struct TableEntry {  // coordinator only
    std::vector<std::string> sigs;  // per rank; empty = not submitted yet
    int count = 0;
    double timeout_s = 0;
    Clock::time_point first_seen;
    uint64_t seq = 0;
  };
  struct Response {
    bool ok;
    std::string name;
    std::string error;
  };

  std::shared_ptr<Communicator> comm;
  MPI_Comm mpi;
  int rank, size;

  // shared with callers
  mutable std::mutex mu;
  EngineOptions opts;
  std::vector<Pending> incoming;
  std::unordered_set<std::string> inflight;  // names submitted and not finished
  std::unordered_map<std::string, std::pair<std::string, Clock::time_point>> poisoned;  // name -> error, when
  std::string broken;  // set once the engine cannot run anything
  bool stop_requested = false;
  bool running = false;
  bool clean_exit = false;
  EngineStats st;

  // background thread only
  std::thread thread;
  std::map<std::string, Pending> pending;  // by name
  std::vector<CacheEntry> cache;
  std::unordered_map<std::string, size_t> cache_index;
  bool table_nonempty = false;
  std::unordered_map<std::string, TableEntry> table;
  uint64_t table_seq = 0;
  std::vector<uint8_t> fusion;
  MPI_Op half_ops[2][4] = {{MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL},
                           {MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL, MPI_OP_NULL}};
  Clock::time_point stop_since;
  double cycle_s = 0.001;  // snapshot of opts.cycle_time_s for this cycle
  size_t shm_min_agreed = SIZE_MAX;  // BAND of every rank's shm_min_bytes this cycle

  std::shared_ptr<EngineWaker> waker = std::make_shared<EngineWaker>();
  uint64_t submissions_seen = 0;  // background thread only

  // ---- shared-memory path (one segment per node; see comm/shm_allreduce.h)
  std::unique_ptr<comm::ShmAllreduce> shm;
  bool shm_ok = false;

  Impl(std::shared_ptr<Communicator> c, EngineOptions o) : comm(std::move(c)), opts(o) {
    mpi = comm->comm();
    rank = comm->rank();
    size = comm->size();
    check_mpi(MPI_Op_create(&half_op<comm::Half::F16, comm::ElemOp::Sum>, 1, &half_ops[0][0]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::F16, comm::ElemOp::Min>, 1, &half_ops[0][1]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::F16, comm::ElemOp::Max>, 1, &half_ops[0][2]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::BF16, comm::ElemOp::Sum>, 1, &half_ops[1][0]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::BF16, comm::ElemOp::Min>, 1, &half_ops[1][1]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::BF16, comm::ElemOp::Max>, 1, &half_ops[1][2]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::F16, comm::ElemOp::Prod>, 1, &half_ops[0][3]), "MPI_Op_create");
    check_mpi(MPI_Op_create(&half_op<comm::Half::BF16, comm::ElemOp::Prod>, 1, &half_ops[1][3]), "MPI_Op_create");
    shm_init();
  }

  // Collective over the communicator (runs before the thread starts): every
  // rank must agree, since the path changes which MPI calls are made.
  void shm_init() {
    int want = opts.shm ? 1 : 0;
    check_mpi(MPI_Allreduce(MPI_IN_PLACE, &want, 1, MPI_INT, MPI_MIN, mpi), "MPI_Allreduce(shm)");
    if (!want) return;
    shm = std::make_unique<comm::ShmAllreduce>(*comm, opts.shm_chunk_bytes, opts.timeout_s);
    shm_ok = shm->available();
    if (!shm_ok) shm.reset();
  }

  bool use_shm(int64_t count, DType wire) const {
    if (!shm_ok) return false;
    return static_cast<uint64_t>(count) * dtype_size(wire) >= shm_min_agreed;
  }

  // Allreduce of the concatenation of segs through the node's shared memory; with
  // several nodes each reduced slice is allreduced across nodes over MPI.
  void shm_allreduce_segments(const std::vector<comm::ShmSegment>& segs, int64_t count, DType wire, ReduceOp op) {
    {
      std::lock_guard<std::mutex> lk(mu);
      ++st.shm_allreduces;
    }
    std::function<void(void*, int64_t)> cross;
    if (comm->cross_size() > 1) {
      cross = [&](void* data, int64_t n) {
        MPI_Request req;
        check_mpi(MPI_Iallreduce(MPI_IN_PLACE, data, static_cast<int>(n), mpi_type(wire), mpi_op(wire, op),
                                 comm->cross_comm(), &req),
                  "MPI_Iallreduce(cross-node)");
        wait_mpi(&req, 1.0, opts.timeout_s, "cross-node allreduce");
      };
    }
    shm->set_timeout(opts.timeout_s);
    shm->run(segs, count, wire, op, size, cross);
  }

  void shm_allreduce(void* data, int64_t count, DType wire, ReduceOp op) {
    shm_allreduce_segments({{static_cast<const char*>(data), static_cast<char*>(data), count, false}}, count, wire,
                           op);
  }

  ~Impl() {
    int finalized = 0;
    MPI_Finalized(&finalized);
    if (finalized) return;
    for (auto& row : half_ops)
      for (auto& op : row)
        if (op != MPI_OP_NULL) MPI_Op_free(&op);
  }

  double timeout_of(const CollectiveRequest& r) const { return r.timeout_s > 0 ? r.timeout_s : opts.timeout_s; }

  void finish(Pending& p, CollectiveHandle::ErrorKind kind, const std::string& msg) {
    {
      std::lock_guard<std::mutex> lk(mu);
      inflight.erase(p.req.name);
      if (kind == CollectiveHandle::ErrorKind::Distributed) ++st.errors;
    }
    p.handle->finish(kind, msg);
  }

  MPI_Op mpi_op(DType wire, ReduceOp op) {
    const int o = op == ReduceOp::Min ? 1 : op == ReduceOp::Max ? 2 : op == ReduceOp::Product ? 3 : 0;
    if (wire == DType::F16) return half_ops[0][o];
    if (wire == DType::BF16) return half_ops[1][o];
    if (wire == DType::Bool) return o == 1 || o == 3 ? MPI_LAND : MPI_LOR;
    static const MPI_Op native[4] = {MPI_SUM, MPI_MIN, MPI_MAX, MPI_PROD};
    return native[o];
  }

  // -------------------------------------------------------------- the loop
  // Sleeps until the next tick (cycle time after the last cycle began: idle ranks still
  // join every negotiation round in time) or until something is submitted. A submission
  // starts a cycle once the caller has been quiet for kBurstGap (a burst such as a backward
  // pass's gradients is negotiated and fused together), at the latest one cycle time after
  // the first: a lone blocking allreduce no longer waits for the tick.
  void wait_for_work(Clock::time_point last) {
    constexpr auto kBurstGap = std::chrono::microseconds(40);
    Clock::duration cycle;
    {
      std::lock_guard<std::mutex> lk(mu);
      cycle = std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts.cycle_time_s));
    }
    EngineWaker& w = *waker;
    std::unique_lock<std::mutex> lk(w.mu);
    auto woken = [&] { return w.submitted != submissions_seen || w.flush || w.stop; };
    if (w.cv.wait_until(lk, last + cycle, woken)) {
      const auto deadline = Clock::now() + cycle;
      uint64_t seen = w.submitted;
      while (!w.flush && !w.stop && Clock::now() < deadline) {
        w.cv.wait_for(lk, kBurstGap, [&] { return w.submitted != seen || w.flush || w.stop; });
        if (w.submitted == seen) break;  // quiet for a gap: the burst is over
        seen = w.submitted;
      }
    }
    submissions_seen = w.submitted;
    w.flush = w.stop = false;  // one early cycle each (Impl::stop_requested keeps the stop state)
  }

  void run() {
#ifdef PR_SET_TIMERSLACK
    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0);  // 1 us: the burst gap is tens of us (default slack: 50 us)
#endif
    try {
      auto last = Clock::now();
      while (true) {
        wait_for_work(last);
        last = Clock::now();
        if (cycle_once()) break;
      }
      fail_all(CollectiveHandle::ErrorKind::Closed, "aimass.dist was shut down before this collective ran");
      std::lock_guard<std::mutex> lk(mu);
      clean_exit = true;
    } catch (const std::exception& e) {
      std::string msg = e.what();
      {
        std::lock_guard<std::mutex> lk(mu);
        broken = msg;
      }
      fail_all(CollectiveHandle::ErrorKind::Distributed, msg);
    }
    std::lock_guard<std::mutex> lk(mu);
    running = false;
  }

  void fail_all(CollectiveHandle::ErrorKind kind, const std::string& msg) {
    std::vector<Pending> rest;
    {
      std::lock_guard<std::mutex> lk(mu);
      for (auto& p : incoming) rest.push_back(std::move(p));
      incoming.clear();
    }
    for (auto& kv : pending) rest.push_back(std::move(kv.second));
    pending.clear();
    for (auto& p : rest) finish(p, kind, msg);
  }

  // One negotiation round plus the collectives it makes ready. Returns true to stop.
  bool cycle_once() {
    bool want_stop;
    uint64_t threshold_local, shm_min_local;
    {
      std::lock_guard<std::mutex> lk(mu);
      shm_min_local = opts.shm_min_bytes;
      threshold_local = opts.fusion_threshold;
      cycle_s = opts.cycle_time_s;
      for (auto& p : incoming) {
        std::string name = p.req.name;
        auto pz = poisoned.find(name);
        if (pz != poisoned.end()) {  // failed on the other ranks while this one was queued
          inflight.erase(name);
          ++st.errors;
          p.handle->finish(CollectiveHandle::ErrorKind::Distributed, pz->second.first);
          poisoned.erase(pz);
          continue;
        }
        pending.emplace(name, std::move(p));
      }
      incoming.clear();
      want_stop = stop_requested;
      ++st.cycles;
    }
    const auto now = Clock::now();
    if (want_stop && seconds_between(stop_since, now) > opts.timeout_s) {
      throw DistributedError(detail::concat("aimass.dist.shutdown(): not every rank called shutdown within ",
                                            opts.timeout_s, " s"));
    }

    // ---- bit vector: word 0 = control, then one bit per cache entry
    // word 1 carries the fusion threshold: BAND gives every rank the same value,
    // so all ranks cut fused buffers identically even while a new one propagates.
    // word 2 does the same for the shared-memory size threshold.
    const size_t words = 3 + (cache.size() + 63) / 64;
    std::vector<uint64_t> bits(words, 0);
    bool need_full = table_nonempty;
    for (auto& kv : pending) {
      Pending& p = kv.second;
      if (p.reported) continue;
      if (seconds_between(p.submitted, now) > timeout_of(p.req)) need_full = true;
      auto it = cache_index.find(p.req.name);
      if (it != cache_index.end() && cache[it->second].sig == p.sig) {
        bits[3 + it->second / 64] |= uint64_t(1) << (it->second % 64);
      } else {
        need_full = true;
      }
    }
    bits[0] = (need_full ? 0 : 1) | (want_stop ? 2 : 0);  // BAND: bit0 -> nobody needs a full round
    bits[1] = threshold_local;
    bits[2] = shm_min_local;
    MPI_Request req;
    check_mpi(MPI_Iallreduce(MPI_IN_PLACE, bits.data(), static_cast<int>(words), MPI_UINT64_T, MPI_BAND, mpi, &req),
              "MPI_Iallreduce(negotiation)");
    wait_mpi(&req, 2 * cycle_s + 1e-3, opts.timeout_s, "negotiation");

    std::vector<std::string> ready;
    for (size_t i = 0; i < cache.size(); ++i) {
      if (bits[3 + i / 64] & (uint64_t(1) << (i % 64))) ready.push_back(cache[i].name);
    }
    {
      std::lock_guard<std::mutex> lk(mu);
      st.cache_hits += ready.size();
    }
    if (!(bits[0] & 1)) full_round(ready);
    shm_min_agreed = static_cast<size_t>(bits[2]);
    execute(ready, static_cast<size_t>(bits[1]));
    return (bits[0] & 2) != 0;  // every rank asked to stop
  }

  // -------------------------------------------------------------- coordinator round
  void full_round(std::vector<std::string>& ready) {
    {
      std::lock_guard<std::mutex> lk(mu);
      ++st.full_rounds;
    }
    const auto now = Clock::now();
    std::unordered_set<std::string> in_ready(ready.begin(), ready.end());
    Writer w;
    uint32_t count = 0;
    for (auto& kv : pending) {
      if (kv.second.reported || in_ready.count(kv.first)) continue;
      ++count;
    }
    w.u32(count);
    for (auto& kv : pending) {
      Pending& p = kv.second;
      if (p.reported || in_ready.count(kv.first)) continue;
      p.reported = true;
      w.str(p.req.name);
      w.str(p.sig);
      w.f64(timeout_of(p.req));
      w.f64(seconds_between(p.submitted, now));
    }
    int len = static_cast<int>(w.buf.size());
    std::vector<int> lens(rank == 0 ? size : 0);
    MPI_Request req;
    check_mpi(MPI_Igather(&len, 1, MPI_INT, lens.data(), 1, MPI_INT, 0, mpi, &req), "MPI_Igather(negotiation)");
    wait_mpi(&req, 2 * cycle_s + 1e-3, opts.timeout_s, "negotiation");
    std::vector<int> displs(rank == 0 ? size : 0);
    std::vector<char> all;
    if (rank == 0) {
      int64_t total = 0;
      for (int r = 0; r < size; ++r) {
        displs[r] = static_cast<int>(total);
        total += lens[r];
      }
      AIMASS_CHECK(total < INT_MAX, DistributedError, "aimass.dist: too many pending requests to negotiate");
      all.resize(static_cast<size_t>(total) + 1);
    }
    check_mpi(MPI_Igatherv(w.buf.data(), len, MPI_CHAR, all.data(), lens.data(), displs.data(), MPI_CHAR, 0, mpi,
                           &req),
              "MPI_Igatherv(negotiation)");
    wait_mpi(&req, 2 * cycle_s + 1e-3, opts.timeout_s, "negotiation");

    Writer out;
    if (rank == 0) {
      for (int r = 0; r < size; ++r) {
        Reader rd{all.data() + displs[r], all.data() + displs[r] + lens[r]};
        uint32_t n = rd.u32();
        for (uint32_t i = 0; i < n; ++i) {
          std::string name = rd.str(), sig = rd.str();
          double timeout = rd.f64(), age = rd.f64();
          auto ins = table.try_emplace(name);
          TableEntry& e = ins.first->second;
          const auto seen = now - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(age));
          if (ins.second) {
            e.sigs.assign(size, std::string());
            e.timeout_s = timeout;
            e.first_seen = seen;
            e.seq = table_seq++;
          }
          if (e.sigs[r].empty()) ++e.count;
          e.sigs[r] = sig;
          e.timeout_s = std::min(e.timeout_s, timeout);
          e.first_seen = std::min(e.first_seen, seen);
        }
      }
      std::vector<std::pair<uint64_t, std::string>> order;
      for (auto& kv : table) order.emplace_back(kv.second.seq, kv.first);
      std::sort(order.begin(), order.end());
      std::vector<Response> resp;
      for (auto& o : order) {
        TableEntry& e = table[o.second];
        std::string first;
        bool mismatch = false;
        for (auto& s : e.sigs) {
          if (s.empty()) continue;
          if (first.empty()) first = s;
          else if (s != first) mismatch = true;
        }
        // A mismatch is reported once every rank has submitted (or at the
        // timeout), so the message shows what each rank asked for.
        if (e.count == size && mismatch) {
          resp.push_back({false, o.second, describe(o.second, e, "ranks submitted collective '" + o.second +
                                                                     "' with different arguments")});
        } else if (e.count == size) {
          resp.push_back({true, o.second, ""});
        } else if (seconds_between(e.first_seen, now) > e.timeout_s) {
          resp.push_back({false, o.second,
                          describe(o.second, e, detail::concat("collective '", o.second, "' timed out after ",
                                                               e.timeout_s, " s waiting for every rank to submit it",
                                                               mismatch ? " (and the ranks that did disagree)" : ""))});
        } else {
          continue;
        }
        table.erase(o.second);
      }
      out.u32(table.empty() ? 0 : 1);
      out.u32(static_cast<uint32_t>(resp.size()));
      for (auto& r : resp) {
        out.u32(r.ok ? 1 : 0);
        out.str(r.name);
        out.str(r.error);
      }
    }
    int out_len = static_cast<int>(out.buf.size());
    check_mpi(MPI_Ibcast(&out_len, 1, MPI_INT, 0, mpi, &req), "MPI_Ibcast(negotiation)");
    wait_mpi(&req, 2 * cycle_s + 1e-3, opts.timeout_s, "negotiation");
    out.buf.resize(static_cast<size_t>(out_len));
    check_mpi(MPI_Ibcast(out.buf.data(), out_len, MPI_CHAR, 0, mpi, &req), "MPI_Ibcast(negotiation)");
    wait_mpi(&req, 2 * cycle_s + 1e-3, opts.timeout_s, "negotiation");

    Reader rd{out.buf.data(), out.buf.data() + out.buf.size()};
    table_nonempty = rd.u32() != 0;
    const uint32_t n = rd.u32();
    for (uint32_t i = 0; i < n; ++i) {
      const bool ok = rd.u32() != 0;
      std::string name = rd.str(), error = rd.str();
      auto it = pending.find(name);
      if (ok) {
        AIMASS_CHECK(it != pending.end(), DistributedError, "aimass.dist: coordinator scheduled '", name,
                     "' which this rank did not submit (internal error)");
        ready.push_back(name);
        auto ci = cache_index.find(name);
        if (ci != cache_index.end()) {
          cache[ci->second].sig = it->second.sig;
        } else if (cache.size() < opts.cache_capacity) {
          cache_index[name] = cache.size();
          cache.push_back({name, it->second.sig});
        }
        it->second.reported = false;  // runs now
      } else if (it != pending.end()) {
        Pending p = std::move(it->second);
        pending.erase(it);
        finish(p, CollectiveHandle::ErrorKind::Distributed, error);
      } else {
        // This rank never submitted it (yet): a later submission fails at once.
        std::lock_guard<std::mutex> lk(mu);
        const auto t = Clock::now();
        for (auto pz = poisoned.begin(); pz != poisoned.end();) {  // forget errors nobody asked about
          if (seconds_between(pz->second.second, t) > opts.timeout_s) pz = poisoned.erase(pz);
          else ++pz;
        }
        poisoned[name] = {error, t};
      }
    }
  }

  std::string describe(const std::string& name, const TableEntry& e, const std::string& headline) {
    std::ostringstream os;
    os << "aimass.dist: " << headline << ":";
    for (int r = 0; r < size; ++r) {
      os << (r ? ";" : "") << " rank " << r << ": ";
      if (e.sigs[r].empty()) os << "did not submit it";
      else os << e.sigs[r];
    }
    os << ". Every rank must call the same collectives with the same names, shapes, dtypes and ops"
          " (timeout: the timeout= argument or AIMASS_COMM_TIMEOUT).";
    return os.str();
  }

  // -------------------------------------------------------------- execution
  void execute(const std::vector<std::string>& ready, size_t threshold) {
    if (ready.empty()) return;
    std::vector<Pending> work;
    work.reserve(ready.size());
    for (auto& name : ready) {
      auto it = pending.find(name);
      AIMASS_CHECK(it != pending.end(), DistributedError, "aimass.dist: '", name,
                   "' is ready but not pending here (internal error)");
      work.push_back(std::move(it->second));
      pending.erase(it);
    }
    // Allreduces are grouped by (dtype, wire, op class) in first-seen order and
    // fused up to the threshold; everything else runs on its own, in order.
    std::vector<std::vector<size_t>> groups;
    std::vector<std::tuple<DType, DType, int>> keys;
    for (size_t i = 0; i < work.size(); ++i) {
      const CollectiveRequest& r = work[i].req;
      if (r.kind != CollectiveKind::Allreduce) {
        run_single(work[i]);
        continue;
      }
      const int opc = r.op == ReduceOp::Min ? 1 : r.op == ReduceOp::Max ? 2 : r.op == ReduceOp::Product ? 3 : 0;
      auto key = std::make_tuple(r.dtype, r.wire, opc);
      auto k = std::find(keys.begin(), keys.end(), key);
      if (k == keys.end()) {
        keys.push_back(key);
        groups.emplace_back();
        k = keys.end() - 1;
      }
      groups[k - keys.begin()].push_back(i);
    }
    for (auto& g : groups) {
      std::vector<Pending*> batch;
      size_t bytes = 0;
      for (size_t i : g) {
        Pending& p = work[i];
        const size_t b = static_cast<size_t>(numel_of(p.req.shape)) * dtype_size(p.req.wire);
        if (!batch.empty() && bytes + b > threshold) {
          allreduce_batch(batch);
          batch.clear();
          bytes = 0;
        }
        batch.push_back(&p);
        bytes += b;
      }
      if (!batch.empty()) allreduce_batch(batch);
    }
  }

  void allreduce_inplace(void* data, int64_t count, DType wire, ReduceOp op) {
    if (use_shm(count, wire)) return shm_allreduce(data, count, wire, op);
    const MPI_Datatype t = mpi_type(wire);
    const MPI_Op o = mpi_op(wire, op);
    const size_t es = dtype_size(wire);
    for (int64_t off = 0; off < count; off += kMaxChunk) {
      const int n = static_cast<int>(std::min(kMaxChunk, count - off));
      MPI_Request req;
      check_mpi(MPI_Iallreduce(MPI_IN_PLACE, static_cast<char*>(data) + off * es, n, t, o, mpi, &req),
                "MPI_Iallreduce");
      wait_mpi(&req, 1.0, opts.timeout_s, "allreduce");
    }
  }

  // Writes op-finished values of `wire`-typed `src` into p's output (conversion / average).
  void unpack(Pending& p, const void* src) {
    const CollectiveRequest& r = p.req;
    const int64_t n = numel_of(r.shape);
    const bool avg = r.op == ReduceOp::Average;
    if (r.wire != r.dtype) {  // compressed float32
      comm::half_to_f32(r.wire == DType::F16 ? comm::Half::F16 : comm::Half::BF16, static_cast<const uint16_t*>(src),
                        static_cast<float*>(r.output), static_cast<size_t>(n));
      if (avg) {
        float* o = static_cast<float*>(r.output);
        const float s = 1.0f / static_cast<float>(size);
        for (int64_t i = 0; i < n; ++i) o[i] *= s;
      }
      return;
    }
    if (src != r.output) std::memcpy(r.output, src, static_cast<size_t>(n) * dtype_size(r.dtype));
    if (!avg) return;
    switch (r.dtype) {
      case DType::F32: {
        float* o = static_cast<float*>(r.output);
        const float s = 1.0f / static_cast<float>(size);
        for (int64_t i = 0; i < n; ++i) o[i] *= s;
        break;
      }
      case DType::F64: {
        double* o = static_cast<double*>(r.output);
        for (int64_t i = 0; i < n; ++i) o[i] /= size;
        break;
      }
      case DType::I32: {
        int32_t* o = static_cast<int32_t*>(r.output);
        for (int64_t i = 0; i < n; ++i) o[i] /= size;
        break;
      }
      case DType::I64: {
        int64_t* o = static_cast<int64_t*>(r.output);
        for (int64_t i = 0; i < n; ++i) o[i] /= size;
        break;
      }
      case DType::I16: divide_ints<int16_t>(r.output, n, size); break;
      case DType::I8: divide_ints<int8_t>(r.output, n, size); break;
      case DType::U8: divide_ints<uint8_t>(r.output, n, size); break;
      case DType::F16:
      case DType::BF16:
        comm::scale_half(r.dtype == DType::F16 ? comm::Half::F16 : comm::Half::BF16, static_cast<uint16_t*>(r.output),
                         static_cast<size_t>(n), 1.0f / static_cast<float>(size));
        break;
      default: break;
    }
  }

  void allreduce_batch(const std::vector<Pending*>& batch) {
    const DType wire = batch[0]->req.wire, dtype = batch[0]->req.dtype;
    const ReduceOp op = batch[0]->req.op;
    const size_t es = dtype_size(wire);
    {
      std::lock_guard<std::mutex> lk(mu);
      ++st.fused_buffers;
      st.fused_tensors += batch.size();
    }
    if (batch.size() == 1 && wire == dtype && !use_shm(numel_of(batch[0]->req.shape), wire)) {
      // no packing: reduce in the output itself
      Pending& p = *batch[0];
      const int64_t n = numel_of(p.req.shape);
      if (p.req.output != p.req.input && n > 0)
        std::memcpy(p.req.output, p.req.input, static_cast<size_t>(n) * es);
      if (n > 0) allreduce_inplace(p.req.output, n, wire, op);
      unpack(p, p.req.output);
      finish(p, CollectiveHandle::ErrorKind::None, "");
      return;
    }
    int64_t total = 0;
    for (Pending* p : batch) total += numel_of(p->req.shape);
    if (wire == dtype && use_shm(total, wire)) {
      // stage straight from the tensors and write straight into them: no fusion buffer,
      // and the average is taken on the cache-resident reduced slices
      std::vector<comm::ShmSegment> segs;
      segs.reserve(batch.size());
      for (Pending* p : batch) {
        segs.push_back({static_cast<const char*>(p->req.input), static_cast<char*>(p->req.output),
                        numel_of(p->req.shape), p->req.op == ReduceOp::Average});
      }
      shm_allreduce_segments(segs, total, wire, op);
      for (Pending* p : batch) finish(*p, CollectiveHandle::ErrorKind::None, "");
      return;
    }
    if (fusion.size() < static_cast<size_t>(total) * es) fusion.resize(static_cast<size_t>(total) * es);
    int64_t off = 0;
    for (Pending* p : batch) {
      const int64_t n = numel_of(p->req.shape);
      if (wire != dtype) {
        comm::f32_to_half(wire == DType::F16 ? comm::Half::F16 : comm::Half::BF16,
                          static_cast<const float*>(p->req.input),
                          reinterpret_cast<uint16_t*>(fusion.data() + off * es), static_cast<size_t>(n));
      } else if (n > 0) {
        std::memcpy(fusion.data() + off * es, p->req.input, static_cast<size_t>(n) * es);
      }
      off += n;
    }
    if (total > 0) allreduce_inplace(fusion.data(), total, wire, op);
    off = 0;
    for (Pending* p : batch) {
      unpack(*p, fusion.data() + off * es);
      off += numel_of(p->req.shape);
      finish(*p, CollectiveHandle::ErrorKind::None, "");
    }
  }

  void run_single(Pending& p) {
    CollectiveRequest& r = p.req;
    const size_t es = dtype_size(r.dtype);
    MPI_Request req;
    switch (r.kind) {
      case CollectiveKind::Barrier: break;  // negotiation itself synchronised every rank
      case CollectiveKind::Broadcast: {
        const int64_t bytes = numel_of(r.shape) * static_cast<int64_t>(es);
        if (rank == r.root && r.output != r.input && bytes > 0) std::memcpy(r.output, r.input, static_cast<size_t>(bytes));
        for (int64_t off = 0; off < bytes; off += kMaxChunk) {
          const int n = static_cast<int>(std::min(kMaxChunk, bytes - off));
          check_mpi(MPI_Ibcast(static_cast<char*>(r.output) + off, n, MPI_BYTE, r.root, mpi, &req), "MPI_Ibcast");
          wait_mpi(&req, 1.0, opts.timeout_s, "broadcast");
        }
        break;
      }
      case CollectiveKind::Allgather: {
        int64_t row = static_cast<int64_t>(es);
        for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
        int64_t mine = r.shape.empty() ? 1 : r.shape[0];
        std::vector<int64_t> rows(size);
        check_mpi(MPI_Iallgather(&mine, 1, MPI_INT64_T, rows.data(), 1, MPI_INT64_T, mpi, &req), "MPI_Iallgather");
        wait_mpi(&req, 1.0, opts.timeout_s, "allgather");
        int64_t total_rows = 0;
        for (int64_t v : rows) total_rows += v;
        if (total_rows * row >= INT_MAX) {  // every rank sees the same totals: all fail alike
          finish(p, CollectiveHandle::ErrorKind::Value,
                 detail::concat("allgather '", r.name, "': the gathered result (", total_rows * row,
                                " bytes) exceeds 2 GiB; gather in pieces"));
          return;
        }
        std::vector<int> counts(size), displs(size);
        int64_t acc = 0;
        for (int i = 0; i < size; ++i) {
          counts[i] = static_cast<int>(rows[i] * row);
          displs[i] = static_cast<int>(acc);
          acc += rows[i] * row;
        }
        p.handle->result_.resize(static_cast<size_t>(acc));
        p.handle->result_shape_ = r.shape.empty() ? std::vector<int64_t>{total_rows} : r.shape;
        p.handle->result_shape_[0] = total_rows;
        check_mpi(MPI_Iallgatherv(r.input, counts[rank], MPI_BYTE, p.handle->result_.data(), counts.data(),
                                  displs.data(), MPI_BYTE, mpi, &req),
                  "MPI_Iallgatherv");
        wait_mpi(&req, 1.0, opts.timeout_s, "allgather");
        break;
      }
      case CollectiveKind::ReduceScatter: {
        const int64_t n0 = r.shape[0];
        int64_t row = 1;
        for (size_t d = 1; d < r.shape.size(); ++d) row *= r.shape[d];
        std::vector<int> counts(size);
        for (int i = 0; i < size; ++i) counts[i] = static_cast<int>((n0 / size + (i < n0 % size ? 1 : 0)) * row);
        p.handle->result_shape_ = r.shape;
        p.handle->result_shape_[0] = counts[rank] / std::max<int64_t>(row, 1);
        if (row == 0) p.handle->result_shape_[0] = n0 / size + (rank < n0 % size ? 1 : 0);
        p.handle->result_.resize(static_cast<size_t>(counts[rank]) * es + 1);
        check_mpi(MPI_Ireduce_scatter(r.input, p.handle->result_.data(), counts.data(), mpi_type(r.dtype),
                                      mpi_op(r.dtype, r.op), mpi, &req),
                  "MPI_Ireduce_scatter");
        wait_mpi(&req, 1.0, opts.timeout_s, "reduce_scatter");
        CollectiveRequest view = r;
        view.shape = {counts[rank]};
        view.output = p.handle->result_.data();
        Pending tmp{view, "", nullptr, p.submitted, false};
        unpack(tmp, p.handle->result_.data());
        break;
      }
      case CollectiveKind::Allreduce: break;  // handled by allreduce_batch
    }
    finish(p, CollectiveHandle::ErrorKind::None, "");
  }
};

CollectiveEngine::CollectiveEngine(std::shared_ptr<Communicator> comm, EngineOptions options)
    : comm_(std::move(comm)) {
  AIMASS_CHECK(comm_ != nullptr, ValueError, "CollectiveEngine needs a communicator");
  AIMASS_CHECK(options.timeout_s > 0, ValueError, "timeout must be > 0 seconds, got ", options.timeout_s);
  AIMASS_CHECK(options.cycle_time_s > 0, ValueError, "cycle time must be > 0, got ", options.cycle_time_s);
  impl_ = std::make_unique<Impl>(comm_, options);
  impl_->running = true;
  impl_->thread = std::thread([this] { impl_->run(); });
}

CollectiveEngine::~CollectiveEngine() {
  if (impl_->thread.joinable()) {
    shutdown();
  }
}

bool CollectiveEngine::shutdown() {
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (!impl_->stop_requested) {
      impl_->stop_requested = true;
      impl_->stop_since = Clock::now();
    }
  }
  impl_->waker->notify(&impl_->waker->stop);
  if (impl_->thread.joinable()) impl_->thread.join();
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->clean_exit;
}

std::shared_ptr<CollectiveHandle> CollectiveEngine::submit(CollectiveRequest r) {
  AIMASS_CHECK(!r.name.empty(), ValueError, "collective name must not be empty");
  AIMASS_CHECK(!(r.dtype == DType::Bool && r.op == ReduceOp::Average &&
                 (r.kind == CollectiveKind::Allreduce || r.kind == CollectiveKind::ReduceScatter)),
               TypeError, collective_kind_name(r.kind), " '", r.name,
               "': the average of bool tensors is not defined; use op 'sum' (logical or) or 'min' (logical and), "
               "or convert to a number type first");
  for (int64_t d : r.shape) AIMASS_CHECK(d >= 0, ValueError, "'", r.name, "': negative dimension in shape");
  const int64_t n = numel_of(r.shape);
  if (r.kind != CollectiveKind::Barrier) {
    AIMASS_CHECK(n == 0 || r.input != nullptr, ValueError, "'", r.name, "': input is null");
  }
  if (r.wire != r.dtype) {
    AIMASS_CHECK(r.kind == CollectiveKind::Allreduce, ValueError, "'", r.name,
                 "': compression applies to allreduce only");
    AIMASS_CHECK(r.dtype == DType::F32 && (r.wire == DType::F16 || r.wire == DType::BF16), TypeError, "'", r.name,
                 "': compression to ", dtype_name(r.wire), " applies to float32 tensors, got ", dtype_name(r.dtype));
  }
  switch (r.kind) {
    case CollectiveKind::Allreduce:
      AIMASS_CHECK(n == 0 || r.output != nullptr, ValueError, "'", r.name, "': output is null");
      break;
    case CollectiveKind::Broadcast:
      AIMASS_CHECK(r.root >= 0 && r.root < comm_->size(), ValueError, "broadcast '", r.name, "': root=", r.root,
                   " is not a rank of this communicator (size ", comm_->size(), ")");
      AIMASS_CHECK(n == 0 || r.output != nullptr, ValueError, "'", r.name, "': output is null");
      break;
    case CollectiveKind::ReduceScatter:
      AIMASS_CHECK(!r.shape.empty(), ValueError, "reduce_scatter '", r.name,
                   "': the tensor needs at least one dimension (split along dimension 0)");
      AIMASS_CHECK(n * static_cast<int64_t>(dtype_size(r.dtype)) < INT_MAX, ValueError, "reduce_scatter '", r.name,
                   "': tensors over 2 GiB are not supported; split it");
      break;
    case CollectiveKind::Allgather:
      AIMASS_CHECK(n * static_cast<int64_t>(dtype_size(r.dtype)) < INT_MAX, ValueError, "allgather '", r.name,
                   "': tensors over 2 GiB are not supported; split it");
      break;
    case CollectiveKind::Barrier: break;
  }
  if (r.kind == CollectiveKind::Barrier || r.kind == CollectiveKind::Broadcast ||
      r.kind == CollectiveKind::Allgather) {
    r.op = ReduceOp::Sum;  // not part of these collectives' agreement
  }
  auto handle = std::make_shared<CollectiveHandle>();
  handle->dtype_ = r.dtype;
  handle->on_wait_ = [w = impl_->waker] { w->notify(&w->flush); };
  Impl::Pending p;
  p.sig = signature(r);
  p.handle = handle;
  p.submitted = Clock::now();
  {
    std::lock_guard<std::mutex> lk(impl_->mu);
    if (!impl_->broken.empty()) throw DistributedError("aimass.dist cannot run collectives any more: " + impl_->broken);
    if (impl_->stop_requested || !impl_->running) throw ClosedError("aimass.dist was shut down; call init() again");
    auto pz = impl_->poisoned.find(r.name);
    if (pz != impl_->poisoned.end()) {
      const bool fresh = seconds_between(pz->second.second, Clock::now()) < impl_->opts.timeout_s;
      std::string msg = pz->second.first;
      impl_->poisoned.erase(pz);
      if (fresh) throw DistributedError(msg);
    }
    AIMASS_CHECK(impl_->inflight.insert(r.name).second, ValueError, "a collective named '", r.name,
                 "' is already in flight on this rank; synchronize it first or use another name");
    p.req = std::move(r);
    impl_->incoming.push_back(std::move(p));
  }
  {
    EngineWaker& w = *impl_->waker;
    {
      std::lock_guard<std::mutex> lk(w.mu);
      ++w.submitted;
    }
    w.cv.notify_one();
  }
  return handle;
}

void CollectiveEngine::set_fusion_threshold(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.fusion_threshold = bytes;
}

void CollectiveEngine::set_cycle_time(double seconds) {
  AIMASS_CHECK(seconds > 0, ValueError, "cycle time must be > 0 seconds, got ", seconds);
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.cycle_time_s = seconds;
}

void CollectiveEngine::set_shm_min_bytes(size_t bytes) {
  std::lock_guard<std::mutex> lk(impl_->mu);
  impl_->opts.shm_min_bytes = bytes;
}

bool CollectiveEngine::shm_available() const { return impl_->shm_ok; }

EngineOptions CollectiveEngine::options() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->opts;
}

EngineStats CollectiveEngine::stats() const {
  std::lock_guard<std::mutex> lk(impl_->mu);
  return impl_->st;
}

}  // namespace aimass
