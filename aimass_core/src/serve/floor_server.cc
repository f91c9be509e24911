// The native floor server (aimass/serve.h): one epoll thread, HTTP/1.1 keep-alive with
// pipelining, KServe v2 infer (JSON and binary tensors) and /predict for one model through
// the runtime's Batcher. Its p50 at one connection, minus Session.run's, is the HTTP overhead
// of a compiled front end: the floor that a native `aimass serve` path could reach.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <unordered_map>

#include "aimass/batcher.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include "aimass/serve.h"
#include "runtime/json.h"
#include "serve/wire.h"

namespace aimass::serve {
namespace rt = aimass::runtime;
namespace json = aimass::runtime::json;

namespace {

struct HttpError {
  int status;
  std::string message;
};

using wire::json_escape;
using wire::reason;

void append_number(std::string& out, double v) {
  if (std::isnan(v)) {
    out += "NaN";
  } else if (std::isinf(v)) {
    out += v > 0 ? "Infinity" : "-Infinity";
  } else {
    char buf[32];
    int n = std::snprintf(buf, sizeof buf, "%.9g", v);
    out.append(buf, static_cast<size_t>(n));
  }
}

// Every number of a (nested) JSON array, in order.
void flatten(const json::Value& v, std::vector<double>& out, const std::string& what) {
  if (v.is_number()) {
    out.push_back(v.num);
  } else if (v.is_array()) {
    for (const auto& e : v.arr) flatten(e, out, what);
  } else {
    throw HttpError{400, what + ": 'data' must hold only numbers (nested lists allowed)"};
  }
}

const char* v2_type(rt::ValueType t) { return t == rt::ValueType::Int64 ? "INT64" : "FP32"; }

}  // namespace

// One decoded inference request: its inputs (owned, or views into the connection's buffer until it
// goes asynchronous), rows, and how to encode the answer from the outputs.
struct Job {
  std::vector<const void*> ptrs;
  std::vector<std::vector<char>> owned;
  std::vector<std::vector<char>> outs;
  int64_t rows = 0;
  std::function<void(std::vector<std::vector<char>>&, std::string&, std::string&, std::string&)> encode;
  std::shared_ptr<rt::Request> req;  // when queued in the batcher
  int fd = -1;
  uint64_t conn_id = 0;
  bool keep_alive = true;
};

struct FloorServer::Impl {
  FloorOptions opts;
  std::shared_ptr<rt::Model> model;
  std::shared_ptr<rt::Executor> exec;
  std::unique_ptr<rt::Batcher> batcher;
  int listen_fd = -1, epoll_fd = -1, event_fd = -1, done_fd = -1, port = 0;
  uint64_t next_conn_id = 0;
  // A request may run inline (on the loop's thread) only when it is the one thing to do: a single
  // ready connection and nothing queued. Otherwise several requests are at hand, and running them
  // inline one after another would never batch them.
  bool allow_inline = true;
  // Requests the batcher queued (not run inline): the completer thread reports their ids through
  // done_fd, and the loop answers them, so the loop never blocks while other connections wait.
  std::unordered_map<uint64_t, std::unique_ptr<Job>> pending;  // loop thread only
  std::mutex done_mu;
  std::vector<uint64_t> done_ids;  // guarded by done_mu
  std::thread completer;
  std::atomic<bool> stopping{false};
  std::atomic<uint64_t> responses{0};

  struct Conn {
    std::string in, out;
    size_t out_off = 0;
    bool close_after = false;  // close once `out` is sent
    bool peer_closed = false;
    bool busy = false;         // a request of this connection is in the batcher: later ones wait
    uint64_t id = 0;
  };
  std::unordered_map<int, Conn> conns;

  ~Impl() {
    for (auto& kv : conns) ::close(kv.first);
    for (int fd : {listen_fd, epoll_fd, event_fd, done_fd})
      if (fd >= 0) ::close(fd);
  }

  // ---------------------------------------------------------------- the model
  [[noreturn]] static void rethrow_as_http(std::exception_ptr e) {
    try {
      std::rethrow_exception(e);
    } catch (const QueueFullError& e) {
      throw HttpError{503, std::string("model queue is full: ") + e.what()};
    } catch (const TimeoutError& e) {
      throw HttpError{504, std::string("deadline passed before the model ran: ") + e.what()};
    } catch (const ClosedError& e) {
      throw HttpError{503, std::string("model is closed: ") + e.what()};
    } catch (const ValueError& e) {
      throw HttpError{400, std::string("the model rejected the inputs: ") + e.what()};
    }
  }

  // Runs the job inline when the batcher is idle (true: job.outs hold the answer), else copies its
  // inputs out of the connection's buffer and queues it with a completion notice (false).
  bool start(Job& job) {
    job.outs.assign(model->outputs().size(), {});
    std::vector<void*> optr;
    for (size_t i = 0; i < job.outs.size(); ++i) {
      job.outs[i].resize(static_cast<size_t>(job.rows * model->outputs()[i].row_bytes()));
      optr.push_back(job.outs[i].data());
    }
    try {
      aimass::wake_workers();  // their wake-up overlaps the copy into the arena
      if (allow_inline && opts.run_inline && batcher->try_run_inline(job.ptrs, optr, job.rows)) return true;
      std::vector<std::vector<char>> copies(job.ptrs.size());
      for (size_t k = 0; k < job.ptrs.size(); ++k) {
        const char* p = static_cast<const char*>(job.ptrs[k]);
        copies[k].assign(p, p + job.rows * model->inputs()[k].row_bytes());
      }
      job.owned = std::move(copies);
      for (size_t k = 0; k < job.ptrs.size(); ++k) job.ptrs[k] = job.owned[k].data();
      job.req = batcher->submit(job.ptrs, optr, job.rows, 0, -1, /*notify=*/true);
      return false;
    } catch (const HttpError&) {
      throw;
    } catch (const std::exception&) {
      rethrow_as_http(std::current_exception());
    }
  }

  // Numbers from JSON into the bytes of one input (FP32 or INT64).
  static void from_numbers(const std::vector<double>& nums, const rt::TensorSpec& s, std::vector<char>& dst,
                           const std::string& what) {
    if (s.dtype == rt::ValueType::Int64) {
      dst.resize(nums.size() * 8);
      auto* p = reinterpret_cast<int64_t*>(dst.data());
      for (size_t i = 0; i < nums.size(); ++i) {
        double v = nums[i];
        if (!(std::fabs(v) < 9.2e18) || v != std::floor(v))
          throw HttpError{400, what + ": INT64 data must hold integers"};
        p[i] = static_cast<int64_t>(v);
      }
    } else {
      dst.resize(nums.size() * 4);
      auto* p = reinterpret_cast<float*>(dst.data());
      for (size_t i = 0; i < nums.size(); ++i) p[i] = static_cast<float>(nums[i]);
    }
  }

  static void append_values(std::string& out, const char* data, const rt::TensorSpec& s, int64_t count) {
    for (int64_t i = 0; i < count; ++i) {
      if (i) out += ',';
      if (s.dtype == rt::ValueType::Int64)
        out += std::to_string(reinterpret_cast<const int64_t*>(data)[i]);
      else
        append_number(out, reinterpret_cast<const float*>(data)[i]);
    }
  }

  // ---------------------------------------------------------------- KServe v2 infer
  void v2_infer(const HttpRequest& req, Job& job) {
    std::string_view hlen = req.header("inference-header-content-length");
    size_t json_len = req.body.size();
    bool binary_req = req.has_header("inference-header-content-length");
    if (binary_req) {
      if (hlen.empty() || hlen.size() > 18) throw HttpError{400, "malformed Inference-Header-Content-Length"};
      size_t v = 0;
      for (char c : hlen) {
        if (c < '0' || c > '9') throw HttpError{400, "malformed Inference-Header-Content-Length"};
        v = v * 10 + static_cast<size_t>(c - '0');
      }
      if (v > req.body.size())
        throw HttpError{400, "Inference-Header-Content-Length " + std::to_string(v) + " is past the body's " +
                                 std::to_string(req.body.size()) + " bytes"};
      json_len = v;
    }
    json::Value root;
    try {
      root = json::parse(req.body.data(), json_len, "request");
    } catch (const std::exception& e) {
      throw HttpError{400, std::string("malformed JSON: ") + e.what()};
    }
    if (!root.is_object()) throw HttpError{400, "the request must be a JSON object"};
    const json::Value* ins = root.find("inputs");
    if (!ins || !ins->is_array()) throw HttpError{400, "'inputs' must be a list of tensors"};
    const auto& specs = model->inputs();
    std::vector<const void*> ptrs(specs.size(), nullptr);
    std::vector<std::vector<char>> owned(specs.size());
    size_t bin_off = json_len;
    int64_t rows = -1;
    for (const auto& t : ins->arr) {
      const json::Value* nm = t.is_object() ? t.find("name") : nullptr;
      if (!nm || !nm->is_string()) throw HttpError{400, "each input needs a 'name'"};
      size_t k = 0;
      while (k < specs.size() && specs[k].name != nm->str) ++k;
      std::string what = "input '" + nm->str + "'";
      if (k == specs.size()) throw HttpError{400, "unknown " + what};
      if (ptrs[k] || !owned[k].empty()) throw HttpError{400, what + " given twice"};
      const auto& s = specs[k];
      const json::Value* dt = t.find("datatype");
      if (!dt || !dt->is_string() || dt->str != v2_type(s.dtype))
        throw HttpError{400, what + ": datatype must be " + v2_type(s.dtype)};
      const json::Value* shape = t.find("shape");
      if (!shape || !shape->is_array() || shape->arr.size() != s.shape.size())
        throw HttpError{400, what + ": shape must have " + std::to_string(s.shape.size()) + " dims"};
      int64_t r = -1;
      for (size_t d = 0; d < s.shape.size(); ++d) {
        const json::Value& dv = shape->arr[d];
        if (!dv.is_number() || dv.num < 0 || dv.num != std::floor(dv.num) || dv.num > 1e12)
          throw HttpError{400, what + ": shape entries must be non-negative integers"};
        int64_t n = static_cast<int64_t>(dv.num);
        if (d == 0) r = n;
        else if (n != s.shape[d]) throw HttpError{400, what + ": wrong shape (dim " + std::to_string(d) + " is " +
                                                          std::to_string(n) + ", the model takes " +
                                                          std::to_string(s.shape[d]) + ")"};
      }
      if (r < 1) throw HttpError{400, what + ": the batch dimension must be >= 1"};
      if (rows >= 0 && r != rows) throw HttpError{400, what + ": inputs disagree on the batch size"};
      rows = r;
      int64_t need = r * s.row_bytes();
      const json::Value* params = t.find("parameters");
      const json::Value* bsize = params && params->is_object() ? params->find("binary_data_size") : nullptr;
      if (bsize) {
        if (!binary_req) throw HttpError{400, what + ": binary_data_size without Inference-Header-Content-Length"};
        if (!bsize->is_number() || bsize->num != static_cast<double>(need))
          throw HttpError{400, what + ": binary_data_size must be " + std::to_string(need) + " bytes for shape"};
        if (req.body.size() - bin_off < static_cast<size_t>(need))
          throw HttpError{400, what + ": the body ends before its binary data"};
        ptrs[k] = req.body.data() + bin_off;
        bin_off += static_cast<size_t>(need);
      } else {
        const json::Value* data = t.find("data");
        if (!data || !data->is_array()) throw HttpError{400, what + ": needs 'data' or binary_data_size"};
        std::vector<double> nums;
        flatten(*data, nums, what);
        if (static_cast<int64_t>(nums.size()) != r * s.row_numel())
          throw HttpError{400, what + ": 'data' holds " + std::to_string(nums.size()) + " values, the shape needs " +
                                   std::to_string(r * s.row_numel())};
        from_numbers(nums, s, owned[k], what);
        ptrs[k] = owned[k].data();
      }
    }
    for (size_t k = 0; k < specs.size(); ++k)
      if (!ptrs[k]) throw HttpError{400, "missing input '" + specs[k].name + "'"};
    if (bin_off != req.body.size())
      throw HttpError{400, std::to_string(req.body.size() - bin_off) + " bytes after the binary inputs"};
    bool binary_out = false;
    if (const json::Value* p = root.find("parameters"); p && p->is_object())
      if (const json::Value* b = p->find("binary_data_output"); b && b->kind == json::Value::Bool) binary_out = b->b;
    job.ptrs = ptrs;
    job.owned = std::move(owned);  // the vectors' buffers (and so ptrs) stay where they are
    job.rows = rows;
    job.encode = [this, rows, binary_out](std::vector<std::vector<char>>& outs, std::string& body, std::string& ctype,
                                          std::string& extra) {
    std::string head = "{\"model_name\":\"";
    json_escape(head, opts.model_name);
    head += "\",\"model_version\":\"1\",\"outputs\":[";
    const auto& os = model->outputs();
    for (size_t i = 0; i < os.size(); ++i) {
      if (i) head += ',';
      head += "{\"name\":\"";
      json_escape(head, os[i].name);
      head += "\",\"datatype\":\"";
      head += v2_type(os[i].dtype);
      head += "\",\"shape\":[" + std::to_string(rows);
      for (size_t d = 1; d < os[i].shape.size(); ++d) head += "," + std::to_string(os[i].shape[d]);
      head += "],";
      if (binary_out) {
        head += "\"parameters\":{\"binary_data_size\":" + std::to_string(outs[i].size()) + "}}";
      } else {
        head += "\"data\":[";
        append_values(head, outs[i].data(), os[i], rows * os[i].row_numel());
        head += "]}";
      }
    }
    head += "]}";
    if (!binary_out) {
      body = std::move(head);
      ctype = "application/json";
      return;
    }
    extra = "inference-header-content-length: " + std::to_string(head.size()) + "\r\n";
    body = std::move(head);
    for (const auto& o : outs) body.append(o.data(), o.size());
    ctype = "application/octet-stream";
    };
  }

  // ---------------------------------------------------------------- Flask-style /predict
  void predict(const HttpRequest& req, Job& job) {
    if (model->inputs().size() != 1) throw HttpError{400, "/predict serves single-input models"};
    const auto& s = model->inputs()[0];
    std::vector<double> nums;
    std::vector<int64_t> shape;
    nums.reserve(static_cast<size_t>(s.row_numel()));
    if (!read_number_body(req.body.data(), req.body.size(), "input", nums, shape)) {
      nums.clear();
      json::Value root;
      try {
        root = json::parse(req.body.data(), req.body.size(), "request");
      } catch (const std::exception& e) {
        throw HttpError{400, std::string("malformed JSON: ") + e.what()};
      }
      const json::Value* in = root.is_object() ? root.find("input") : nullptr;
      if (!in || !(in->is_array() || in->is_number())) throw HttpError{400, "the request needs 'input': a list"};
      flatten(*in, nums, "input '" + s.name + "'");
    }
    int64_t per = s.row_numel();
    if (nums.empty() || static_cast<int64_t>(nums.size()) % per)
      throw HttpError{400, "input '" + s.name + "': " + std::to_string(nums.size()) +
                               " values are not whole rows of " + std::to_string(per)};
    int64_t rows = static_cast<int64_t>(nums.size()) / per;
    std::vector<char> buf;
    from_numbers(nums, s, buf, "input '" + s.name + "'");
    job.ptrs = {buf.data()};
    job.owned.push_back(std::move(buf));
    job.rows = rows;
    job.encode = [this, rows](std::vector<std::vector<char>>& outs, std::string& body, std::string& ctype,
                              std::string&) {
    const auto& o = model->outputs()[0];
    body = "{\"output\":[";
    int64_t on = o.row_numel();
    for (int64_t r = 0; r < rows; ++r) {
      if (r) body += ',';
      body += '[';
      append_values(body, outs[0].data() + r * o.row_bytes(), o, on);
      body += ']';
    }
    body += "]}";
    ctype = "application/json";
    };
  }

  // ---------------------------------------------------------------- routing + responses
  void respond(Conn& c, int status, std::string_view ctype, std::string_view extra, std::string_view body,
               bool keep_alive) {
    wire::respond(c.out, status, ctype, extra, body, keep_alive);
    if (!keep_alive) c.close_after = true;
    responses.fetch_add(1, std::memory_order_relaxed);
  }

  void error(Conn& c, int status, const std::string& msg, bool keep_alive) {
    std::string body = "{\"error\":\"";
    json_escape(body, msg);
    body += "\"}";
    respond(c, status, "application/json", "", body, keep_alive);
  }

  void handle(int c_fd, Conn& c, const HttpRequest& req) {
    std::string_view path = req.target.substr(0, req.target.find('?'));
    std::string body, ctype, extra;
    try {
      std::string v2 = "/v2/models/" + opts.model_name + "/infer";
      if (path == v2 || path == "/predict") {
        if (req.method != "POST") throw HttpError{405, "use POST"};
        auto job = std::make_unique<Job>();
        if (path == "/predict") predict(req, *job);
        else v2_infer(req, *job);
        if (start(*job)) {
          job->encode(job->outs, body, ctype, extra);
        } else {  // queued: answered by on_done; this connection's next requests wait for it
          job->fd = c_fd;
          job->conn_id = c.id;
          job->keep_alive = req.keep_alive;
          c.busy = true;
          uint64_t id = job->req->id();
          pending[id] = std::move(job);
          return;
        }
      } else if (path == "/v2/health/live" || path == "/v2/health/ready" || path == "/") {
        body = "{}";
        ctype = "application/json";
      } else {
        throw HttpError{404, "not found (this server answers POST " + v2 + " and /predict)"};
      }
    } catch (const HttpError& e) {
      return error(c, e.status, e.message, req.keep_alive);
    } catch (const std::exception& e) {  // a bug: answer it, keep serving
      return error(c, 500, std::string("internal error: ") + e.what(), false);
    }
    respond(c, 200, ctype, extra, body, req.keep_alive);
  }

  // Answers every complete request buffered on `c` (pipelining: in order, one write for all).
  void process(int fd, Conn& c) {
    while (!c.close_after && !c.busy && c.out.size() < (1u << 20)) {
      HttpRequest req;
      ParseResult pr = parse_request(c.in.data(), c.in.size(), opts.limits, req);
      if (pr.status == ParseStatus::Incomplete) break;
      if (pr.status == ParseStatus::Error) {
        error(c, pr.http_status, pr.error, false);
        c.in.clear();
        break;
      }
      handle(fd, c, req);
      c.in.erase(0, req.consumed);
    }
  }

  void set_events(int fd, uint32_t ev) {
    epoll_event e{};
    e.events = ev;
    e.data.fd = fd;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fd, &e);
  }

  void drop(int fd) {
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    conns.erase(fd);
  }

  // Sends what is pending; false when the connection was closed.
  bool flush(int fd, Conn& c) {
    while (c.out_off < c.out.size()) {
      ssize_t w = ::send(fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
      if (w > 0) {
        c.out_off += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        set_events(fd, EPOLLIN | EPOLLOUT);
        return true;
      }
      drop(fd);
      return false;
    }
    c.out.clear();
    c.out_off = 0;
    if (c.close_after || c.peer_closed) {
      drop(fd);
      return false;
    }
    set_events(fd, EPOLLIN);
    return true;
  }

  void on_conn(int fd, uint32_t events) {
    auto it = conns.find(fd);
    if (it == conns.end()) return;
    Conn& c = it->second;
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      // Read only while the buffer is below the most one request may need, so a client cannot
      // make the server hold more than that (the parser then refuses it with 413 / 431).
      const size_t cap = opts.limits.max_header_bytes + static_cast<size_t>(opts.limits.max_body_bytes) + 8;
      char buf[65536];
      while (!c.close_after && c.in.size() < cap) {
        ssize_t r = ::recv(fd, buf, std::min(sizeof buf, cap - c.in.size()), 0);
        if (r > 0) {
          c.in.append(buf, static_cast<size_t>(r));
          continue;
        }
        if (r == 0) c.peer_closed = true;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) c.peer_closed = true;
        break;
      }
    }
    pump(fd, c);
  }

  // Answers what is buffered on the connection and sends it, as long as that makes progress.
  void pump(int fd, Conn& c) {
    for (;;) {
      size_t before = c.in.size();
      if (c.out_off == 0) process(fd, c);  // not while an earlier response is still half sent
      if (c.out.empty()) {
        if ((c.peer_closed && !c.busy) || c.close_after) drop(fd);
        return;
      }
      if (!flush(fd, c)) return;
      if (!c.out.empty() || c.in.size() == before || c.in.empty()) return;
    }
  }

  void accept_all() {
    for (;;) {
      int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) {
        if (errno == EINTR) continue;
        return;  // EAGAIN, or out of descriptors: try again at the next event
      }
      if (static_cast<int>(conns.size()) >= opts.max_connections) {
        ::close(c);
        continue;
      }
      int one = 1;
      ::setsockopt(c, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      epoll_event e{};
      e.events = EPOLLIN;
      e.data.fd = c;
      if (::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, c, &e) != 0) {
        ::close(c);
        continue;
      }
      conns[c].id = ++next_conn_id;
    }
  }

  // Answers the queued requests the completer reported finished.
  void on_done() {
    uint64_t n;
    ssize_t r = ::read(done_fd, &n, sizeof n);
    (void)r;
    std::vector<uint64_t> ids;
    {
      std::lock_guard<std::mutex> lk(done_mu);
      ids.swap(done_ids);
    }
    for (uint64_t id : ids) {
      auto it = pending.find(id);
      if (it == pending.end()) continue;
      std::unique_ptr<Job> job = std::move(it->second);
      pending.erase(it);
      auto ct = conns.find(job->fd);
      if (ct == conns.end() || ct->second.id != job->conn_id) continue;  // the client went away
      Conn& c = ct->second;
      c.busy = false;
      std::string body, ctype, extra;
      try {
        job->req->rethrow();
        job->encode(job->outs, body, ctype, extra);
        respond(c, 200, ctype, extra, body, job->keep_alive);
      } catch (const HttpError& e) {
        error(c, e.status, e.message, job->keep_alive);
      } catch (const Error&) {
        try {
          rethrow_as_http(std::current_exception());
        } catch (const HttpError& e) {
          error(c, e.status, e.message, job->keep_alive);
        } catch (const std::exception& e) {
          error(c, 500, std::string("internal error: ") + e.what(), false);
        }
      } catch (const std::exception& e) {
        error(c, 500, std::string("internal error: ") + e.what(), false);
      }
      if (c.out_off == 0) {  // not behind a half-sent response: send now (and take the next ones)
        if (!flush(job->fd, c)) continue;
      }
      pump(job->fd, c);
    }
  }
};

FloorServer::FloorServer(const std::string& model_path, FloorOptions opts) : impl_(new Impl) {
  Impl& s = *impl_;
  AIMASS_CHECK(opts.port >= 0 && opts.port <= 65535, ValueError, "FloorServer: port=", opts.port, " not in [0, 65535]");
  AIMASS_CHECK(opts.max_connections >= 1, ValueError, "FloorServer: max_connections must be >= 1");
  AIMASS_CHECK(opts.limits.max_body_bytes >= 0 && opts.limits.max_header_bytes >= 64, ValueError,
               "FloorServer: limits must be max_body_bytes >= 0 and max_header_bytes >= 64");
  AIMASS_CHECK(!opts.model_name.empty() && opts.model_name.find('/') == std::string::npos, ValueError,
               "FloorServer: model_name must be non-empty without '/'");
  s.opts = opts;
  s.model = rt::Model::load(model_path);
  AIMASS_CHECK(!rt::has_dynamic_seq(*s.model), ValueError,
               "FloorServer: serves models without a dynamic sequence dimension");
  rt::ExecutorOptions eo;
  eo.max_batch_size = opts.max_batch_size;
  s.exec = std::make_shared<rt::Executor>(s.model, eo);
  s.batcher = std::make_unique<rt::Batcher>(s.exec, rt::BatcherOptions{opts.max_batch_size, opts.max_queue_delay_us,
                                                                       opts.queue_capacity});
  s.listen_fd = wire::listen_on(opts.host, opts.port, 512, "FloorServer", s.port);
  s.epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  s.event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  s.done_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  AIMASS_CHECK(s.epoll_fd >= 0 && s.event_fd >= 0 && s.done_fd >= 0, IOError, "FloorServer: epoll/eventfd: ", std::strerror(errno));
  for (int fd : {s.listen_fd, s.event_fd, s.done_fd}) {
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.fd = fd;
    ::epoll_ctl(s.epoll_fd, EPOLL_CTL_ADD, fd, &e);
  }
  s.completer = std::thread([&s] {
    while (!s.stopping.load()) {
      std::vector<uint64_t> ids = s.batcher->wait_completed(20000);
      if (ids.empty()) continue;
      {
        std::lock_guard<std::mutex> lk(s.done_mu);
        s.done_ids.insert(s.done_ids.end(), ids.begin(), ids.end());
      }
      uint64_t one = 1;
      ssize_t w = ::write(s.done_fd, &one, sizeof one);
      (void)w;
    }
  });
}

FloorServer::~FloorServer() {
  impl_->stopping.store(true);
  if (impl_->completer.joinable()) impl_->completer.join();
  // runs what is still queued: its buffers are the pending jobs', freed with impl_ after this
  impl_->batcher->close();
}

int FloorServer::port() const { return impl_->port; }
uint64_t FloorServer::requests() const { return impl_->responses.load(); }
uint64_t FloorServer::inline_runs() const { return impl_->batcher->stats().inline_runs; }

void FloorServer::stop() {
  impl_->stopping.store(true);
  uint64_t one = 1;
  ssize_t w = ::write(impl_->event_fd, &one, sizeof one);
  (void)w;
}

void FloorServer::serve() {
  Impl& s = *impl_;
  epoll_event evs[64];
  while (!s.stopping.load()) {
    int n = ::epoll_wait(s.epoll_fd, evs, 64, -1);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IOError(std::string("FloorServer: epoll_wait: ") + std::strerror(errno));
    }
    s.allow_inline = n == 1 && s.pending.empty();
    for (int i = 0; i < n && !s.stopping.load(); ++i) {
      int fd = evs[i].data.fd;
      if (fd == s.listen_fd) s.accept_all();
      else if (fd == s.done_fd) s.on_done();
      else if (fd != s.event_fd) s.on_conn(fd, evs[i].events);
    }
  }
}

}  // namespace aimass::serve
