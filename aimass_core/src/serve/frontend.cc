// The native front end of `aimass serve --http native` (aimass/serve.h, docs/serving.md "The native
// front end"). One epoll thread owns the public socket. A successful hot request (KServe v2 infer
// with binary or FP32 JSON tensors, TF-Serving row :predict, /predict) is decoded here exactly as
// aimass.serve.hot would decode it and runs through the version's Batcher: inline on this thread when
// it is the one thing to do, else queued with a completion hook that hands it back through an
// eventfd (the floor server's scheme). Everything else goes byte for byte to the uvicorn app on a
// private port over one upstream keep-alive connection per client connection, and its answer is
// relayed in order: errors keep Python's statuses and messages because Python words them.
#include <arpa/inet.h>
#include <fcntl.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <charconv>
#include <tuple>
#include <chrono>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <mutex>
#include <unordered_map>

#include "aimass/batcher.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include "aimass/serve.h"
#include "runtime/json.h"
#include "serve/wire.h"

#ifdef AIMASS_HAVE_OPENSSL
#include <openssl/sha.h>
#endif

namespace aimass::serve {
namespace rt = aimass::runtime;
namespace json = aimass::runtime::json;

// ---------------------------------------------------------------- orjson's number and string layout
void append_f32_json(std::string& out, float v) {
  if (!std::isfinite(v)) {  // orjson writes NaN and infinities as null
    out += "null";
    return;
  }
  if (v == 0) {
    out += std::signbit(v) ? "-0.0" : "0.0";
    return;
  }
  // shortest round-trip digits (what ryu finds), laid out as the ryu crate's format32 does
  char buf[32];
  auto r = std::to_chars(buf, buf + sizeof buf, v, std::chars_format::scientific);
  std::string_view sci(buf, static_cast<size_t>(r.ptr - buf));
  if (sci[0] == '-') {
    out += '-';
    sci.remove_prefix(1);
  }
  size_t e = sci.find('e');
  std::string digits;
  digits += sci[0];
  if (e > 1) digits.append(sci.substr(2, e - 2));
  int exp10 = 0;
  std::from_chars(sci.data() + e + 1 + (sci[e + 1] == '+'), sci.data() + sci.size(), exp10);
  int length = static_cast<int>(digits.size());
  int kk = exp10 + 1;          // 10^(kk-1) <= |v| < 10^kk
  int k = kk - length;         // v = digits * 10^k
  if (k >= 0 && kk <= 13) {
    out += digits;
    out.append(static_cast<size_t>(k), '0');
    out += ".0";
  } else if (kk > 0 && kk <= 13) {
    out.append(digits, 0, static_cast<size_t>(kk));
    out += '.';
    out.append(digits, static_cast<size_t>(kk));
  } else if (kk > -6 && kk <= 0) {
    out += "0.";
    out.append(static_cast<size_t>(-kk), '0');
    out += digits;
  } else {
    out += digits[0];
    if (length > 1) {
      out += '.';
      out.append(digits, 1);
    }
    out += 'e';
    out += std::to_string(kk - 1);
  }
}

namespace {

using Clock = std::chrono::steady_clock;

using wire::json_escape;

const char* v2_type(rt::ValueType t) { return t == rt::ValueType::Int64 ? "INT64" : "FP32"; }

// The model's tensors have no dynamic dimension after the batch: the native decoders check shapes
// exactly; other models are left to Python.
bool static_specs(const rt::Model& m) {
  for (const auto* specs : {&m.inputs(), &m.outputs()})
    for (const auto& s : *specs)
      for (size_t d = 1; d < s.shape.size(); ++d)
        if (s.shape[d] < 0) return false;
  return true;
}

// Integer JSON literals only: outside strings no '.', and no exponent after a digit (orjson makes
// those Python floats, which the Python decoder refuses where it wants ints).
bool integer_literals_only(std::string_view j) {
  bool in_str = false;
  for (size_t i = 0; i < j.size(); ++i) {
    char c = j[i];
    if (in_str) {
      if (c == '\\') ++i;
      else if (c == '"') in_str = false;
    } else if (c == '"') {
      in_str = true;
    } else if (c == '.') {
      return false;
    } else if ((c == 'e' || c == 'E') && i > 0 && j[i - 1] >= '0' && j[i - 1] <= '9') {
      return false;
    }
  }
  return true;
}

bool unique_keys(const json::Value& o) {
  for (size_t i = 0; i < o.obj.size(); ++i)
    for (size_t k = i + 1; k < o.obj.size(); ++k)
      if (o.obj[i].first == o.obj[k].first) return false;
  return true;
}

bool only_keys(const json::Value& o, std::initializer_list<const char*> allowed) {
  if (!o.is_object() || !unique_keys(o)) return false;
  for (const auto& kv : o.obj) {
    bool ok = false;
    for (const char* a : allowed) ok = ok || kv.first == a;
    if (!ok) return false;
  }
  return true;
}

bool small_int(const json::Value& v, int64_t& out) {
  if (!v.is_number() || !(v.num >= 0) || v.num > 1e12 || v.num != std::floor(v.num)) return false;
  out = static_cast<int64_t>(v.num);
  return true;
}

// Nested JSON lists of one output's rows, as orjson writes a numpy array of that shape.
void append_nested(std::string& out, const char* data, const rt::TensorSpec& s, const std::vector<int64_t>& shape,
                   size_t dim, int64_t& idx) {
  out += '[';
  for (int64_t i = 0; i < shape[dim]; ++i) {
    if (i) out += ',';
    if (dim + 1 < shape.size()) {
      append_nested(out, data, s, shape, dim + 1, idx);
    } else if (s.dtype == rt::ValueType::Int64) {
      out += std::to_string(reinterpret_cast<const int64_t*>(data)[idx++]);
    } else {
      append_f32_json(out, reinterpret_cast<const float*>(data)[idx++]);
    }
  }
  out += ']';
}

void append_flat(std::string& out, const char* data, const rt::TensorSpec& s, int64_t count) {
  out += '[';
  for (int64_t i = 0; i < count; ++i) {
    if (i) out += ',';
    if (s.dtype == rt::ValueType::Int64) out += std::to_string(reinterpret_cast<const int64_t*>(data)[i]);
    else append_f32_json(out, reinterpret_cast<const float*>(data)[i]);
  }
  out += ']';
}

enum Proto { kV2 = 0, kV1 = 1, kPredict = 2 };
const char* proto_name(int p) { return p == kV2 ? "v2" : p == kV1 ? "v1" : "predict"; }

// A request the front end can route: (protocol, model, version or -1, label or "").
struct Target {
  int proto = -1;
  std::string model, label;
  int64_t version = -1;
};

bool parse_version(std::string_view v, int64_t& out) {
  if (v.empty() || v.size() > 15) return false;
  int64_t n = 0;
  for (char c : v) {
    if (c < '0' || c > '9') return false;
    n = n * 10 + (c - '0');
  }
  out = n;
  return true;
}

// hot.py's _HOT routes, for paths without '%' (those are left to uvicorn's decoding).
bool route(std::string_view path, Target& t) {
  if (path == "/predict") {
    t.proto = kPredict;
    return true;
  }
  auto no_slash = [](std::string_view s) { return !s.empty() && s.find('/') == std::string_view::npos; };
  if (path.substr(0, 11) == "/v2/models/" && path.size() > 17 && path.substr(path.size() - 6) == "/infer") {
    std::string_view mid = path.substr(11, path.size() - 17);
    size_t vs = mid.find("/versions/");
    std::string_view name = vs == std::string_view::npos ? mid : mid.substr(0, vs);
    if (!no_slash(name)) return false;
    if (vs != std::string_view::npos) {
      std::string_view v = mid.substr(vs + 10);
      if (!no_slash(v) || !parse_version(v, t.version)) return false;  // Python words a bad version
    }
    t.proto = kV2;
    t.model = std::string(name);
    return true;
  }
  if (path.substr(0, 11) == "/v1/models/" && path.size() > 19 && path.substr(path.size() - 8) == ":predict") {
    std::string_view mid = path.substr(11, path.size() - 19);
    size_t s1 = mid.find('/');
    std::string_view name = mid.substr(0, s1);
    if (name.empty()) return false;
    if (s1 != std::string_view::npos) {
      std::string_view rest = mid.substr(s1 + 1);
      size_t s2 = rest.find('/');
      if (s2 == std::string_view::npos) return false;
      std::string_view kind = rest.substr(0, s2), val = rest.substr(s2 + 1);
      if (!no_slash(val)) return false;
      if (kind == "versions") {
        if (!parse_version(val, t.version)) return false;
      } else if (kind == "labels") {
        t.label = std::string(val);
      } else {
        return false;
      }
    }
    t.proto = kV1;
    t.model = std::string(name);
    return true;
  }
  return false;
}

// Bytes of the first complete HTTP response at the start of d (0: incomplete; -1: malformed).
// head_req: the request was HEAD (no body). close: the response ends the connection.
int64_t response_length(const char* d, size_t n, bool head_req, int& status, bool& close, bool& until_eof) {
  size_t end = std::string_view::npos;
  for (size_t i = 0; i + 3 < n; ++i)
    if (d[i] == '\r' && d[i + 1] == '\n' && d[i + 2] == '\r' && d[i + 3] == '\n') {
      end = i + 4;
      break;
    }
  if (end == std::string_view::npos) return n > (1 << 20) ? -1 : 0;
  std::string_view head(d, end);
  if (head.size() < 12 || head.substr(0, 5) != "HTTP/") return -1;
  status = 0;
  for (size_t i = 9; i < 12; ++i) {
    if (head[i] < '0' || head[i] > '9') return -1;
    status = status * 10 + (head[i] - '0');
  }
  close = false;
  until_eof = false;
  int64_t clen = -1;
  bool chunked = false;
  size_t pos = head.find("\r\n") + 2;
  while (pos + 2 < head.size()) {
    size_t e = head.find("\r\n", pos);
    std::string_view line = head.substr(pos, e - pos);
    pos = e + 2;
    size_t colon = line.find(':');
    if (colon == std::string_view::npos) continue;
    std::string name(line.substr(0, colon));
    for (auto& ch : name) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    std::string_view value = line.substr(colon + 1);
    while (!value.empty() && value.front() == ' ') value.remove_prefix(1);
    std::string lv(value);
    for (auto& ch : lv) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
    if (name == "content-length") {
      int64_t v = 0;
      if (std::from_chars(lv.data(), lv.data() + lv.size(), v).ec != std::errc()) return -1;
      clen = v;
    } else if (name == "transfer-encoding") {
      chunked = lv.find("chunked") != std::string::npos;
    } else if (name == "connection") {
      close = lv.find("close") != std::string::npos;
    }
  }
  if (status < 200 || head_req || status == 204 || status == 304) return static_cast<int64_t>(end);
  if (chunked) {
    size_t p = end;
    for (;;) {
      size_t e = std::string_view(d, n).find("\r\n", p);
      if (e == std::string_view::npos) return 0;
      uint64_t size = 0;
      auto r = std::from_chars(d + p, d + e, size, 16);
      if (r.ptr == d + p) return -1;
      p = e + 2;
      if (size == 0) {  // trailers, then the empty line
        for (;;) {
          size_t t = std::string_view(d, n).find("\r\n", p);
          if (t == std::string_view::npos) return 0;
          bool empty = t == p;
          p = t + 2;
          if (empty) return static_cast<int64_t>(p);
        }
      }
      if (n < p + size + 2) return 0;
      p += size + 2;
    }
  }
  if (clen < 0) {  // the body runs to the end of the connection
    until_eof = true;
    close = true;
    return 0;
  }
  return n >= end + static_cast<size_t>(clen) ? static_cast<int64_t>(end + clen) : 0;
}

bool head_expects_continue(std::string_view head) {
  std::string low(head);
  for (auto& ch : low) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  size_t p = low.find("\nexpect:");
  return p != std::string::npos && low.find("100-continue", p) != std::string::npos;
}

std::string sha256(std::string_view s) {
#ifdef AIMASS_HAVE_OPENSSL
  unsigned char md[SHA256_DIGEST_LENGTH];
  SHA256(reinterpret_cast<const unsigned char*>(s.data()), s.size(), md);
  return std::string(reinterpret_cast<const char*>(md), SHA256_DIGEST_LENGTH);
#else
  (void)s;
  return {};
#endif
}

}  // namespace

// One native request from decode to answer.
struct FJob {
  std::shared_ptr<RouteVersion> rv;
  std::shared_ptr<const Routes> routes;  // keeps the table it was routed with
  std::string model;
  int proto = kV2;
  std::vector<const void*> ptrs;
  std::vector<std::vector<char>> owned;
  std::vector<std::vector<char>> outs;
  int64_t rows = 0;
  std::vector<std::pair<size_t, bool>> v2_outs;  // (output index, binary) in response order
  std::shared_ptr<rt::Request> req;
  int fd = -1;
  uint64_t conn_id = 0;
  bool keep_alive = true;
  Clock::time_point t0;
  std::string path;
};

// Finished queued requests, filled by the batchers' scheduler threads (on_done hooks). Shared, so a
// hook that fires after the front end is gone writes into a live object.
struct DoneQueue {
  std::mutex mu;
  std::vector<uint64_t> ids;
  int fd = -1;
  ~DoneQueue() {
    if (fd >= 0) ::close(fd);
  }
  void push(uint64_t id) {
    {
      std::lock_guard<std::mutex> lk(mu);
      ids.push_back(id);
    }
    uint64_t one = 1;
    ssize_t w = ::write(fd, &one, sizeof one);
    (void)w;
  }
};

struct Frontend::Impl {
  FrontendOptions opts;
  std::vector<double> bounds;
  int listen_fd = -1, epoll_fd = -1, event_fd = -1, port = 0;
  std::shared_ptr<DoneQueue> done = std::make_shared<DoneQueue>();
  uint64_t next_conn_id = 0, next_job = 0;
  bool allow_inline = true;
  std::atomic<bool> stopping{false}, draining{false}, loop_done{false};
  std::atomic<int64_t> inflight_n{0}, held{0};
  std::atomic<uint64_t> answers{0}, forwards{0}, replies{0};
  bool local() const { return opts.upstream_port == 0; }  // no upstream: opts.local_* answer what it would take

  // routes: written by Python's thread, read by the loop (one atomic shared_ptr swap)
  std::shared_ptr<const Routes> routes = std::make_shared<Routes>();
  std::atomic<uint64_t> epoch{0};          // bumped by each set_routes
  std::atomic<uint64_t> seen_epoch{0};     // the epoch the loop read at the top of its last turn
  mutable std::mutex keys_mu;
  // key -> (slot, the epoch it was dropped at)
  std::unordered_map<int64_t, std::pair<std::shared_ptr<RouteVersion>, uint64_t>> dropped;
  std::unordered_map<int64_t, std::shared_ptr<RouteVersion>> live;

  // tokens
  mutable std::mutex tok_mu;
  bool tokens_on = false;
  struct Bucket {
    double rate = 0, burst = 0, level = 0;
    Clock::time_point stamp;
  };
  std::unordered_map<std::string, TokenEntry> tokens;
  std::unordered_map<std::string, Bucket> buckets;

  // metrics
  mutable std::mutex m_mu;
  std::map<std::tuple<std::string, int64_t, int, int>, uint64_t> counts;
  std::map<std::pair<std::string, int64_t>, std::vector<double>> lat;  // counts..., sum
  std::vector<FrontendError> errors;

  std::unordered_map<uint64_t, std::unique_ptr<FJob>> pending;  // queued jobs by job id (the on_done hook reports it)

  struct Conn {
    int fd = -1;
    uint64_t id = 0;
    std::string in, out;
    size_t out_off = 0;
    bool close_after = false, peer_closed = false;
    bool busy = false;           // a native request of this connection is queued: later ones wait
    int up_fd = -1;
    std::string up_out, up_in;
    size_t up_off = 0;
    bool awaiting = false;       // a forwarded request's answer is pending: later ones wait
    bool head_req = false;
    bool tunnel = false;         // byte for byte both ways from now on (a body Python must frame)
    bool up_eof = false;
    bool continued = false;      // 100 Continue sent for the request being received
    bool held = false;           // counted in `held`: a hot request's body is arriving
    bool pre_drain = false;      // that head arrived before draining began
    bool lingering = false;      // answered and half-closed: reading what the client still sends
    Clock::time_point active;
  };
  std::unordered_map<int, std::unique_ptr<Conn>> conns;  // by client fd
  std::unordered_map<int, int> up_owner;                  // upstream fd -> client fd

  ~Impl() {
    for (auto& kv : conns) {
      ::close(kv.first);
      if (kv.second->up_fd >= 0) ::close(kv.second->up_fd);
    }
    for (int fd : {listen_fd, epoll_fd, event_fd})
      if (fd >= 0) ::close(fd);
  }

  // ---------------------------------------------------------------- metrics
  void count(const std::string& model, int64_t version, int proto, int code, double seconds) {
    std::lock_guard<std::mutex> lk(m_mu);
    counts[{model, version, proto, code}]++;
    if (code != 200) return;
    auto& h = lat[{model, version}];
    if (h.empty()) h.assign(bounds.size() + 2, 0.0);
    size_t b = static_cast<size_t>(std::lower_bound(bounds.begin(), bounds.end(), seconds) - bounds.begin());
    h[b] += 1;
    h.back() += seconds;
  }

  // ---------------------------------------------------------------- tokens
  // auth.py's TokenTable.authorize for the infer scope, without the bucket (taken once the request
  // decoded): 0 when allowed (digest set), else 401/403 with auth.py's message in `msg`, or -1 for a
  // header that Python must read itself (non-ASCII: it decodes latin-1 and hashes UTF-8).
  int authorize(const HttpRequest& req, const std::string& model, std::string& digest, std::string& msg) {
    std::lock_guard<std::mutex> lk(tok_mu);
    if (!tokens_on) return 0;
    std::string_view h = req.header("authorization");
    if (h.empty()) {
      msg = "missing token: send 'Authorization: Bearer <token>'";
      return 401;
    }
    for (unsigned char c : h)
      if (c >= 0x80) return -1;
    size_t sp = h.find(' ');
    std::string_view kind = h.substr(0, sp), value = sp == std::string_view::npos ? "" : h.substr(sp + 1);
    bool bearer = kind.size() == 6;
    for (size_t i = 0; bearer && i < 6; ++i)
      bearer = std::tolower(static_cast<unsigned char>(kind[i])) == "bearer"[i];
    while (!value.empty() && (value.front() == ' ' || value.front() == '\t')) value.remove_prefix(1);
    while (!value.empty() && (value.back() == ' ' || value.back() == '\t')) value.remove_suffix(1);
    if (!bearer || value.empty()) {
      msg = "malformed Authorization header: expected 'Bearer <token>'";
      return 401;
    }
    digest = sha256(value);
    auto it = tokens.find(digest);
    if (it == tokens.end()) {
      msg = "unknown token";
      return 401;
    }
    if (!it->second.infer) {
      msg = it->second.scope_error;
      return 403;
    }
    if (!it->second.all_models &&
        std::find(it->second.models.begin(), it->second.models.end(), model) == it->second.models.end()) {
      msg = it->second.model_error_prefix + model + "'";
      return 403;
    }
    return 0;
  }

  // The answer to a request refused before it ran (auth), counted and logged like Python's.
  void refuse(Conn& c, const HttpRequest& req, int proto, const std::string& model, std::string_view path, int status,
              const std::string& msg, std::string_view extra = "") {
    std::string b = "{\"error\": \"";
    json_escape(b, msg, true);
    b += "\"}";
    wire::respond(c.out, status, "application/json", extra, b, req.keep_alive);
    if (!req.keep_alive) c.close_after = true;
    answers.fetch_add(1, std::memory_order_relaxed);
    replies.fetch_add(1, std::memory_order_relaxed);
    count(model, -1, proto, status, 0);
    std::lock_guard<std::mutex> lk(m_mu);
    if (errors.size() < 1000) errors.push_back({status, std::string(path), model, msg, "AuthError", -1});
  }

  double take_locked(const std::string& digest) {
    auto it = buckets.find(digest);
    if (it == buckets.end()) return 0;
    Bucket& b = it->second;
    auto now = Clock::now();
    b.level = std::min(b.burst, b.level + std::chrono::duration<double>(now - b.stamp).count() * b.rate);
    b.stamp = now;
    if (b.level >= 1.0) {
      b.level -= 1.0;
      return 0;
    }
    return (1.0 - b.level) / b.rate;
  }

  // One request from the token's bucket: 0 when allowed, else the seconds to wait and auth.py's 429
  // message in `msg`.
  double take(const std::string& digest, std::string& msg) {
    std::lock_guard<std::mutex> lk(tok_mu);
    if (!tokens_on) return 0;
    double wait = take_locked(digest);
    if (wait > 0) {
      auto it = tokens.find(digest);
      if (it != tokens.end()) msg = it->second.rate_error;
    }
    return wait;
  }

  // ---------------------------------------------------------------- decoding (false: Python's)
  static bool input_shape_ok(const rt::TensorSpec& s, const std::vector<int64_t>& shape, int64_t& rows) {
    if (shape.size() != s.shape.size() || shape.empty() || shape[0] < 1) return false;
    for (size_t d = 1; d < shape.size(); ++d)
      if (shape[d] != s.shape[d]) return false;
    rows = shape[0];
    return true;
  }

  static bool to_float(const std::vector<double>& vals, std::vector<char>& dst) {
    dst.resize(vals.size() * 4);
    auto* p = reinterpret_cast<float*>(dst.data());
    const double fmax = static_cast<double>(std::numeric_limits<float>::max());
    for (size_t i = 0; i < vals.size(); ++i) {
      if (std::fabs(vals[i]) > fmax) return false;  // numpy makes it inf with a warning: Python's path
      p[i] = static_cast<float>(vals[i]);
    }
    return true;
  }

  bool v2_binary(const HttpRequest& req, const rt::Model& m, FJob& job) {
    std::string_view hl = req.header("inference-header-content-length");
    int64_t n = 0;
    if (!parse_version(hl, n) || static_cast<size_t>(n) > req.body.size()) return false;
    std::string_view head = req.body.substr(0, static_cast<size_t>(n));
    if (!integer_literals_only(head)) return false;
    json::Value root;
    try {
      root = json::parse(head.data(), head.size(), "request");
    } catch (const std::exception&) {
      return false;
    }
    if (!only_keys(root, {"inputs", "outputs", "parameters"})) return false;
    bool all_binary = false;
    if (const json::Value* p = root.find("parameters")) {
      if (!only_keys(*p, {"binary_data_output"})) return false;
      if (const json::Value* b = p->find("binary_data_output")) {
        if (b->kind != json::Value::Bool) return false;
        all_binary = b->b;
      }
    }
    const json::Value* ins = root.find("inputs");
    if (!ins || !ins->is_array() || ins->arr.empty()) return false;
    const auto& specs = m.inputs();
    std::vector<const void*> ptrs(specs.size(), nullptr);
    size_t off = static_cast<size_t>(n);
    int64_t rows = -1;
    for (const auto& t : ins->arr) {
      if (!only_keys(t, {"name", "datatype", "shape", "parameters"})) return false;
      const json::Value *nm = t.find("name"), *dt = t.find("datatype"), *sh = t.find("shape"),
                        *pa = t.find("parameters");
      if (!nm || !nm->is_string() || !dt || !dt->is_string() || !sh || !sh->is_array() || !pa) return false;
      size_t k = 0;
      while (k < specs.size() && specs[k].name != nm->str) ++k;
      if (k == specs.size() || ptrs[k] || dt->str != v2_type(specs[k].dtype)) return false;
      std::vector<int64_t> shape;
      for (const auto& d : sh->arr) {
        int64_t v;
        if (!small_int(d, v)) return false;
        shape.push_back(v);
      }
      int64_t r;
      if (!input_shape_ok(specs[k], shape, r) || (rows >= 0 && r != rows)) return false;
      rows = r;
      if (!only_keys(*pa, {"binary_data_size"})) return false;
      const json::Value* bs = pa->find("binary_data_size");
      int64_t size;
      if (!bs || !small_int(*bs, size) || size != r * specs[k].row_bytes()) return false;
      if (req.body.size() - off < static_cast<size_t>(size)) return false;
      ptrs[k] = req.body.data() + off;
      off += static_cast<size_t>(size);
    }
    if (off != req.body.size()) return false;
    for (const void* p : ptrs)
      if (!p) return false;
    if (!v2_outputs(root, m, all_binary, job)) return false;
    job.ptrs = std::move(ptrs);
    job.rows = rows;
    return true;
  }

  static bool v2_outputs(const json::Value& root, const rt::Model& m, bool all_binary, FJob& job) {
    const auto& os = m.outputs();
    const json::Value* w = root.find("outputs");
    if (!w) {
      for (size_t i = 0; i < os.size(); ++i) job.v2_outs.push_back({i, all_binary});
      return true;
    }
    if (!w->is_array()) return false;
    for (const auto& o : w->arr) {
      if (!only_keys(o, {"name", "parameters"})) return false;
      const json::Value* nm = o.find("name");
      if (!nm || !nm->is_string()) return false;
      size_t i = 0;
      while (i < os.size() && os[i].name != nm->str) ++i;
      if (i == os.size()) return false;
      bool bin = all_binary;
      if (const json::Value* p = o.find("parameters")) {
        if (!only_keys(*p, {"binary_data"})) return false;
        if (const json::Value* b = p->find("binary_data")) {
          if (b->kind != json::Value::Bool) return false;
          bin = b->b;
        }
      }
      job.v2_outs.push_back({i, bin});
    }
    return true;
  }

  bool v2_json(const HttpRequest& req, const rt::Model& m, FJob& job) {
    std::vector<V2JsonInput> ins;
    if (!read_v2_json_inputs(req.body.data(), req.body.size(), ins) || ins.empty()) return false;
    const auto& specs = m.inputs();
    std::vector<const void*> ptrs(specs.size(), nullptr);
    job.owned.resize(specs.size());
    int64_t rows = -1;
    for (auto& in : ins) {
      size_t k = 0;
      while (k < specs.size() && specs[k].name != in.name) ++k;
      if (k == specs.size() || ptrs[k] || specs[k].dtype != rt::ValueType::Float32 || in.datatype != "FP32")
        return false;
      int64_t r;
      if (!input_shape_ok(specs[k], in.shape, r) || (rows >= 0 && r != rows)) return false;
      if (static_cast<int64_t>(in.values.size()) != r * specs[k].row_numel()) return false;
      rows = r;
      if (!to_float(in.values, job.owned[k])) return false;
      ptrs[k] = job.owned[k].data();
    }
    for (const void* p : ptrs)
      if (!p) return false;
    for (size_t i = 0; i < m.outputs().size(); ++i) job.v2_outs.push_back({i, false});
    job.ptrs = std::move(ptrs);
    job.rows = rows;
    return true;
  }

  // TF-Serving {"instances": numbers} and /predict {"input": numbers}: tfserving.coerce's rules.
  bool number_body(const HttpRequest& req, const rt::Model& m, const char* key, FJob& job) {
    if (m.inputs().size() != 1 || m.outputs().size() != 1) return false;
    const auto& s = m.inputs()[0];
    if (s.dtype != rt::ValueType::Float32) return false;
    std::vector<double> vals;
    std::vector<int64_t> shape;
    vals.reserve(static_cast<size_t>(s.row_numel()));
    if (!read_number_body(req.body.data(), req.body.size(), key, vals, shape)) return false;
    if (shape.size() + 1 == s.shape.size()) shape.insert(shape.begin(), 1);  // one example, no batch dim
    int64_t rows;
    if (!input_shape_ok(s, shape, rows)) return false;
    job.owned.resize(1);
    if (!to_float(vals, job.owned[0])) return false;
    job.ptrs = {job.owned[0].data()};
    job.rows = rows;
    return true;
  }

  // No upstream: opts.local_decode reads what the hot readers left into `job` (true), or its error is
  // answered (false).
  bool local_decode(Conn& c, const HttpRequest& req, const rt::Model& m, const char* key, FJob& job) {
    LocalAnswer la;
    try {
      opts.local_decode(req, m, key, la);
    } catch (const std::exception& e) {
      la = {};
      la.status = 500;
      la.text = std::string("internal error: ") + e.what();
    }
    if (la.status == 0 && (la.inputs.size() != m.inputs().size() || la.rows < 1)) {
      la.status = 500;
      la.text = "internal error: the local decoder gave no inputs";
    }
    if (la.status != 0) {
      error_reply(c, la.status, la.text, req.keep_alive && la.status != 500);
      return false;
    }
    int proto = job.proto;
    Clock::time_point t0 = job.t0;
    job = FJob{};  // what the hot readers left half filled
    job.proto = proto;
    job.t0 = t0;
    job.owned = std::move(la.inputs);
    for (const auto& in : job.owned) job.ptrs.push_back(in.data());
    job.rows = la.rows;
    for (size_t i = 0; i < m.outputs().size(); ++i) job.v2_outs.push_back({i, la.binary_out});
    return true;
  }

  // ---------------------------------------------------------------- encoding (hot.py's bytes)
  void encode(FJob& job, std::string& body, std::string& ctype, std::string& extra) {
    const rt::Model& m = job.rv->batcher->model();
    const auto& os = m.outputs();
    if (job.proto == kV2) {
      std::string head = "{\"model_name\":\"";
      json_escape(head, job.model, false);
      head += "\",\"model_version\":\"" + std::to_string(job.rv->version) + "\",\"outputs\":[";
      bool any_bin = false;
      for (size_t j = 0; j < job.v2_outs.size(); ++j) {
        auto [i, bin] = job.v2_outs[j];
        if (j) head += ',';
        head += "{\"name\":\"";
        json_escape(head, os[i].name, false);
        head += "\",\"datatype\":\"";
        head += v2_type(os[i].dtype);
        head += "\",\"shape\":[" + std::to_string(job.rows);
        for (size_t d = 1; d < os[i].shape.size(); ++d) head += "," + std::to_string(os[i].shape[d]);
        head += "],";
        if (bin) {
          head += "\"parameters\":{\"binary_data_size\":" + std::to_string(job.outs[i].size()) + "}}";
          any_bin = true;
        } else {
          head += "\"data\":";
          append_flat(head, job.outs[i].data(), os[i], job.rows * os[i].row_numel());
          head += '}';
        }
      }
      head += "]}";
      if (!any_bin) {
        body = std::move(head);
        ctype = "application/json";
        return;
      }
      extra = "inference-header-content-length: " + std::to_string(head.size()) + "\r\n";
      body = std::move(head);
      for (auto [i, bin] : job.v2_outs)
        if (bin) body.append(job.outs[i].data(), job.outs[i].size());
      ctype = "application/octet-stream";
      return;
    }
    body = job.proto == kV1 ? "{\"predictions\":" : "{\"output\":";
    std::vector<int64_t> shape = os[0].shape;
    shape[0] = job.rows;
    int64_t idx = 0;
    append_nested(body, job.outs[0].data(), os[0], shape, 0, idx);
    body += '}';
    ctype = "application/json";
  }

  // ---------------------------------------------------------------- connections
  Conn* conn_of(int fd) {
    auto it = conns.find(fd);
    return it == conns.end() ? nullptr : it->second.get();
  }

  void set_events(int fd, uint32_t ev) {
    epoll_event e{};
    e.events = ev;
    e.data.fd = fd;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_MOD, fd, &e);
  }

  void close_upstream(Conn& c) {
    if (c.up_fd < 0) return;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, c.up_fd, nullptr);
    ::close(c.up_fd);
    up_owner.erase(c.up_fd);
    c.up_fd = -1;
    c.up_out.clear();
    c.up_in.clear();
    c.up_off = 0;
    c.up_eof = false;
  }

  void drop(Conn& c) {
    int fd = c.fd;
    close_upstream(c);
    if (c.held) held.fetch_sub(1);
    ::epoll_ctl(epoll_fd, EPOLL_CTL_DEL, fd, nullptr);
    ::close(fd);
    conns.erase(fd);  // c is gone
  }

  void error_reply(Conn& c, int status, const std::string& msg, bool keep_alive, const char* extra = "") {
    std::string body = "{\"error\": \"";
    json_escape(body, msg, true);
    body += "\"}";
    wire::respond(c.out, status, "application/json", extra, body, keep_alive);
    if (!keep_alive) c.close_after = true;
    replies.fetch_add(1, std::memory_order_relaxed);
  }

  // A request a front end with no upstream would have forwarded: opts.local_other's answer.
  void answer_local(Conn& c, const HttpRequest& req) {
    LocalAnswer la;
    try {
      opts.local_other(req, req.target.substr(0, req.target.find('?')), la);
    } catch (const std::exception& e) {
      la = {};
      la.status = 500;
      la.text = std::string("internal error: ") + e.what();
    }
    if (req.method == "HEAD") {  // no body may follow (a pipelined client would read it as the next answer)
      wire::respond(c.out, la.status, "application/json", "", "", req.keep_alive);
      if (!req.keep_alive) c.close_after = true;
      replies.fetch_add(1, std::memory_order_relaxed);
    } else if (la.status == 200) {
      wire::respond(c.out, 200, "application/json", "", la.text, req.keep_alive);
      if (!req.keep_alive) c.close_after = true;
      replies.fetch_add(1, std::memory_order_relaxed);
    } else {
      error_reply(c, la.status, la.text, req.keep_alive && la.status != 500);
    }
  }

  bool connect_upstream(Conn& c) {
    if (c.up_fd >= 0) return true;
    addrinfo hints{}, *res = nullptr;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICHOST;
    std::string port = std::to_string(opts.upstream_port);
    if (::getaddrinfo(opts.upstream_host.c_str(), port.c_str(), &hints, &res) != 0 || !res) return false;
    int fd = ::socket(res->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    // loopback: a blocking connect completes at once (or is refused at once)
    bool ok = fd >= 0 && ::connect(fd, res->ai_addr, res->ai_addrlen) == 0;
    ::freeaddrinfo(res);
    if (!ok) {
      if (fd >= 0) ::close(fd);
      return false;
    }
    int one = 1;
    ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ::fcntl(fd, F_SETFL, ::fcntl(fd, F_GETFL) | O_NONBLOCK);
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.fd = fd;
    ::epoll_ctl(epoll_fd, EPOLL_CTL_ADD, fd, &e);
    c.up_fd = fd;
    up_owner[fd] = c.fd;
    return true;
  }

  // Sends the request bytes to uvicorn; the connection waits for the answer (false: no upstream).
  bool forward(Conn& c, std::string_view raw, bool head_req) {
    if (!connect_upstream(c)) return false;
    c.up_out.append(raw.data(), raw.size());
    c.awaiting = true;
    c.head_req = head_req;
    forwards.fetch_add(1, std::memory_order_relaxed);
    flush_upstream(c);
    return true;
  }

  void flush_upstream(Conn& c) {
    while (c.up_fd >= 0 && c.up_off < c.up_out.size()) {
      ssize_t w = ::send(c.up_fd, c.up_out.data() + c.up_off, c.up_out.size() - c.up_off, MSG_NOSIGNAL);
      if (w > 0) {
        c.up_off += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        set_events(c.up_fd, EPOLLIN | EPOLLOUT);
        return;
      }
      c.up_eof = true;  // uvicorn went away: answered below
      return;
    }
    c.up_out.clear();
    c.up_off = 0;
    if (c.up_fd >= 0) set_events(c.up_fd, EPOLLIN);
  }

  // Moves complete upstream answers to the client, in order.
  void relay(Conn& c) {
    if (c.tunnel) {
      c.out += c.up_in;
      c.up_in.clear();
      if (c.up_eof) c.close_after = true;
      return;
    }
    while (c.awaiting && !c.up_in.empty()) {
      int status = 0;
      bool close = false, until_eof = false;
      int64_t len = response_length(c.up_in.data(), c.up_in.size(), c.head_req, status, close, until_eof);
      if (len < 0) {
        c.up_in.clear();
        c.awaiting = false;
        close_upstream(c);
        error_reply(c, 502, "the server's upstream answered malformed HTTP", false);
        return;
      }
      if (len == 0) {
        if (until_eof && c.up_eof) {  // answered to the end of the connection
          c.out += c.up_in;
          c.up_in.clear();
          c.awaiting = false;
          c.close_after = true;
        }
        break;
      }
      c.out.append(c.up_in, 0, static_cast<size_t>(len));
      c.up_in.erase(0, static_cast<size_t>(len));
      if (status >= 200) {
        c.awaiting = false;
        if (close) {
          c.close_after = true;
          close_upstream(c);
        }
      }
    }
    if (c.awaiting && c.up_eof) {  // uvicorn closed before answering
      c.awaiting = false;
      close_upstream(c);
      error_reply(c, 502, "the server's upstream closed the connection before answering", false);
    }
  }

  void on_upstream(int ufd, uint32_t events) {
    auto it = up_owner.find(ufd);
    if (it == up_owner.end()) return;
    Conn* cp = conn_of(it->second);
    if (!cp) return;
    Conn& c = *cp;
    if (events & EPOLLOUT) flush_upstream(c);
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      char buf[65536];
      for (;;) {
        ssize_t r = ::recv(ufd, buf, sizeof buf, 0);
        if (r > 0) {
          c.up_in.append(buf, static_cast<size_t>(r));
          if (c.up_in.size() > (8u << 20)) break;  // relay what is complete first
          continue;
        }
        if (r == 0) c.up_eof = true;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) c.up_eof = true;
        break;
      }
    }
    relay(c);
    if (c.up_eof && c.up_fd >= 0 && !c.awaiting) close_upstream(c);
    pump(c);
  }

  // ---------------------------------------------------------------- requests
  // Answers (or forwards) every complete request buffered on c, in order.
  void process(Conn& c) {
    while (!c.close_after && !c.busy && !c.awaiting && !c.tunnel && c.out.size() < (1u << 20)) {
      HttpRequest req;
      ParseResult pr = parse_request(c.in.data(), c.in.size(), opts.limits, req);
      if (pr.status == ParseStatus::Incomplete) {
        size_t hl = request_head_length(c.in.data(), c.in.size());
        if (hl && !c.held) {  // a request whose body is still arriving: in flight for the drain
          c.held = true;
          c.pre_drain = !draining.load();
          held.fetch_add(1);
          if (!c.continued && head_expects_continue(std::string_view(c.in.data(), hl))) {
            c.out += "HTTP/1.1 100 Continue\r\n\r\n";
            c.continued = true;
          }
        }
        break;
      }
      bool pre_drain = c.held ? c.pre_drain : false;
      if (c.held) {
        c.held = false;
        held.fetch_sub(1);
      }
      c.continued = false;
      if (pr.status == ParseStatus::Error) {
        if (pr.http_status == 501 && !local()) {  // Transfer-Encoding: uvicorn frames it; byte for byte from here on
          if (!connect_upstream(c)) {
            error_reply(c, 502, "the server's upstream is not reachable", false);
            c.in.clear();
            break;
          }
          c.tunnel = true;
          c.up_out += c.in;
          c.in.clear();
          forwards.fetch_add(1, std::memory_order_relaxed);
          flush_upstream(c);
          break;
        }
        error_reply(c, pr.http_status, pr.error, false);
        c.in.clear();
        break;
      }
      bool queued = false;
      if (!handle(c, req, pre_drain, queued)) {
        if (local()) {
          answer_local(c, req);
        } else if (!forward(c, std::string_view(c.in.data(), req.consumed), req.method == "HEAD")) {
          error_reply(c, 502, "the server's upstream is not reachable", false);
          c.in.clear();
          break;
        }
      }
      c.in.erase(0, req.consumed);
      if (queued) break;
    }
  }

  // A hot request answered natively (true), or false: forward it.
  bool handle(Conn& c, const HttpRequest& req, bool pre_drain, bool& queued) {
    if (req.method != "POST") return false;
    if (draining.load() && !pre_drain) return false;
    std::string_view path = req.target.substr(0, req.target.find('?'));
    for (unsigned char ch : path)
      if (ch == '%' || ch >= 0x80) return false;
    // what the hot readers take as Python would (else Python's, or with no upstream opts.local_decode's)
    bool plain = req.header("content-encoding").empty() || req.header("content-encoding") == "identity";
    // Python keeps the last of repeated headers, this parser the first: leave repeats to Python
    int seen[3] = {0, 0, 0};
    for (const auto& h : req.headers) {
      static const char* const kRead[3] = {"authorization", "content-encoding", "inference-header-content-length"};
      for (int i = 0; i < 3; ++i)
        if (h.name.size() == std::strlen(kRead[i]) &&
            std::equal(h.name.begin(), h.name.end(), kRead[i],
                       [](char a, char b) { return std::tolower(static_cast<unsigned char>(a)) == b; }) &&
            ++seen[i] > 1)
          plain = false;
    }
    if (!plain && !local()) return false;
    Target t;
    if (!route(path, t)) return false;
    std::shared_ptr<const Routes> r = std::atomic_load(&routes);
    if (t.proto == kPredict) t.model = r->predict_model;
    auto mit = r->models.find(t.model);
    if (mit == r->models.end()) return false;
    const RouteModel& rm = mit->second;
    if (rm.default_version < 0) return false;
    int64_t v = rm.default_version;
    if (!t.label.empty()) {
      auto l = rm.labels.find(t.label);
      if (l == rm.labels.end()) return false;
      v = l->second;
    } else if (t.version >= 0) {
      v = t.version;
    }
    auto vit = rm.versions.find(v);
    if (vit == rm.versions.end() || !vit->second || !vit->second->batcher) return false;
    std::shared_ptr<RouteVersion> rv = vit->second;
    const rt::Model& m = rv->batcher->model();
    plain = plain && static_specs(m);
    if (!plain && !local()) return false;
    std::string digest, why;
    int denied = authorize(req, t.model, digest, why);
    if (denied < 0) return false;
    if (denied > 0) {  // 401/403 as Python words them, before the body is looked at (its order)
      refuse(c, req, t.proto, t.model, path, denied, why);
      return true;
    }
    auto job = std::make_unique<FJob>();
    job->t0 = Clock::now();
    job->proto = t.proto;
    const char* key = t.proto == kV2 ? nullptr : t.proto == kV1 ? "instances" : "input";
    bool ok = plain && (t.proto == kV2 ? (req.has_header("inference-header-content-length") ? v2_binary(req, m, *job)
                                                                                            : v2_json(req, m, *job))
                                       : number_body(req, m, key, *job));
    if (!ok && local()) {
      if (!local_decode(c, req, m, key, *job)) return true;  // answered with its error
      ok = true;
    }
    if (!ok) return false;
    // The bucket is taken once the body decoded: a request that goes to Python is charged there, once.
    // Over its rate: auth.py's 429 from the bucket Python shares; Python checks the rate before the
    // body, so a body it would refuse gets the same 429 there.
    if (double wait = take(digest, why); wait > 0) {
      if (why.empty()) return false;  // no words from Python for it: its answer
      char ra[340];  // Retry-After as auth.py writes it: str(max(1, int(wait + 0.999)))
      std::snprintf(ra, sizeof ra, "retry-after: %.0f\r\n", std::max(1.0, std::floor(wait + 0.999)));
      refuse(c, req, t.proto, t.model, path, 429, why, ra);
      return true;
    }
    job->rv = rv;
    job->routes = r;
    job->model = t.model;
    job->keep_alive = req.keep_alive;
    job->path = std::string(path);
    rv->inflight.fetch_add(1);
    inflight_n.fetch_add(1);
    // run
    job->outs.assign(m.outputs().size(), {});
    std::vector<void*> optr;
    for (size_t i = 0; i < job->outs.size(); ++i) {
      job->outs[i].resize(static_cast<size_t>(job->rows * m.outputs()[i].row_bytes()));
      optr.push_back(job->outs[i].data());
    }
    try {
      aimass::wake_workers();  // their wake-up overlaps the copy into the arena
      if (allow_inline && opts.run_inline && rv->batcher->try_run_inline(job->ptrs, optr, job->rows, 0, opts.deadline_us)) {
        finish(c, *job, nullptr);
        return true;
      }
      // queued: the inputs must outlive the connection's buffer
      const auto& specs = m.inputs();
      for (size_t k = 0; k < job->ptrs.size(); ++k) {
        bool owned = k < job->owned.size() && !job->owned[k].empty() && job->owned[k].data() == job->ptrs[k];
        if (owned) continue;
        const char* p = static_cast<const char*>(job->ptrs[k]);
        if (job->owned.size() < job->ptrs.size()) job->owned.resize(job->ptrs.size());
        job->owned[k].assign(p, p + job->rows * specs[k].row_bytes());
        job->ptrs[k] = job->owned[k].data();
      }
      uint64_t jid = ++next_job;
      std::weak_ptr<DoneQueue> dq = done;
      job->fd = c.fd;
      job->conn_id = c.id;
      FJob* raw = job.get();
      pending[jid] = std::move(job);
      try {
        raw->req = rv->batcher->submit_then(raw->ptrs, optr, raw->rows, 0, opts.deadline_us, [dq, jid](uint64_t) {
          if (auto q = dq.lock()) q->push(jid);
        });
      } catch (...) {
        auto j = std::move(pending[jid]);
        pending.erase(jid);
        finish(c, *j, std::current_exception());
        return true;
      }
      c.busy = true;
      queued = true;
    } catch (...) {
      finish(c, *job, std::current_exception());
    }
    return true;
  }

  // The answer of a native request (err: the batcher's exception), counted and released.
  void finish(Conn& c, FJob& job, std::exception_ptr err) {
    int status = 200;
    std::string body, ctype, extra, msg, type;
    const std::string& name = job.model;
    if (err) {
      try {
        std::rethrow_exception(err);
      } catch (const QueueFullError& e) {
        status = 503, type = "QueueFullError";
        msg = "model '" + name + "' is overloaded (queue full): " + e.what() + "; retry later";
        extra = "retry-after: 1\r\n";
      } catch (const TimeoutError& e) {
        status = 504, type = "TimeoutError";
        msg = "deadline passed before model '" + name + "' ran the request: " + e.what();
      } catch (const ClosedError& e) {
        status = 503, type = "ClosedError";
        msg = "model '" + name + "' version " + std::to_string(job.rv->version) + " was closed: " + e.what();
      } catch (const std::exception& e) {
        status = 400, type = "ValueError";
        msg = "model '" + name + "' rejected the inputs: " + e.what();
      }
      std::string b = "{\"error\": \"";
      json_escape(b, msg, true);
      b += "\"}";
      wire::respond(c.out, status, "application/json", extra, b, job.keep_alive);
      std::lock_guard<std::mutex> lk(m_mu);
      if (errors.size() < 1000) errors.push_back({status, job.path, name, msg, type, job.rv->version});
    } else {
      encode(job, body, ctype, extra);
      wire::respond(c.out, 200, ctype, extra, body, job.keep_alive);
    }
    if (!job.keep_alive) c.close_after = true;
    answers.fetch_add(1, std::memory_order_relaxed);
    replies.fetch_add(1, std::memory_order_relaxed);
    count(name, job.rv->version, job.proto, status,
          std::chrono::duration<double>(Clock::now() - job.t0).count());
    job.rv->inflight.fetch_sub(1);
    inflight_n.fetch_sub(1);
  }

  void on_done() {
    uint64_t n;
    ssize_t r = ::read(done->fd, &n, sizeof n);
    (void)r;
    std::vector<uint64_t> ids;
    {
      std::lock_guard<std::mutex> lk(done->mu);
      ids.swap(done->ids);
    }
    for (uint64_t id : ids) {
      auto it = pending.find(id);
      if (it == pending.end()) continue;
      std::unique_ptr<FJob> job = std::move(it->second);
      pending.erase(it);
      Conn* cp = conn_of(job->fd);
      std::exception_ptr err;
      try {
        job->req->rethrow();
      } catch (...) {
        err = std::current_exception();
      }
      if (!cp || cp->id != job->conn_id) {  // the client went away: count and release only
        job->rv->inflight.fetch_sub(1);
        inflight_n.fetch_sub(1);
        continue;
      }
      cp->busy = false;
      finish(*cp, *job, err);
      pump(*cp);
    }
  }

  // Sends what is pending; false when the connection was dropped.
  bool flush(Conn& c) {
    while (c.out_off < c.out.size()) {
      ssize_t w = ::send(c.fd, c.out.data() + c.out_off, c.out.size() - c.out_off, MSG_NOSIGNAL);
      if (w > 0) {
        c.out_off += static_cast<size_t>(w);
        continue;
      }
      if (w < 0 && errno == EINTR) continue;
      if (w < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
        set_events(c.fd, EPOLLIN | EPOLLOUT);
        return true;
      }
      drop(c);
      return false;
    }
    c.out.clear();
    c.out_off = 0;
    if (c.close_after && !c.awaiting) {
      if (c.peer_closed || c.tunnel) {
        drop(c);
        return false;
      }
      // Half-close and read on until the client closes (or the idle timeout): closing with its
      // unread body in the socket would reset the connection and lose the answer (an early 413).
      ::shutdown(c.fd, SHUT_WR);
      c.lingering = true;
      c.in.clear();
      close_upstream(c);
      set_events(c.fd, EPOLLIN);
      return false;
    }
    set_events(c.fd, EPOLLIN);
    return true;
  }

  void pump(Conn& c) {
    if (c.lingering) return;
    for (int guard = 0; guard < 64; ++guard) {
      size_t before = c.in.size();
      if (c.tunnel && !c.in.empty()) {
        c.up_out += c.in;
        c.in.clear();
        flush_upstream(c);
      }
      if (c.out_off == 0) process(c);
      if (c.out.empty()) {
        bool idle = !c.busy && !c.awaiting;
        if ((c.peer_closed && idle) || (c.close_after && idle) || (c.tunnel && c.up_eof && c.up_in.empty())) drop(c);
        return;
      }
      if (!flush(c)) return;
      if (!c.out.empty() || c.in.size() == before || c.in.empty()) return;
    }
  }

  void on_conn(int fd, uint32_t events) {
    Conn* cp = conn_of(fd);
    if (!cp) return;
    Conn& c = *cp;
    c.active = Clock::now();
    if (c.lingering) {
      char buf[65536];
      for (;;) {
        ssize_t r = ::recv(fd, buf, sizeof buf, 0);
        if (r > 0) continue;
        if (r < 0 && errno == EINTR) continue;
        if (r == 0 || (errno != EAGAIN && errno != EWOULDBLOCK) || (events & (EPOLLHUP | EPOLLERR))) drop(c);
        return;
      }
    }
    if (events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
      const size_t cap = opts.limits.max_header_bytes + static_cast<size_t>(opts.limits.max_body_bytes) + 8;
      char buf[65536];
      while (!c.close_after && (c.tunnel || c.in.size() < cap)) {
        size_t want = c.tunnel ? sizeof buf : std::min(sizeof buf, cap - c.in.size());
        ssize_t r = ::recv(fd, buf, want, 0);
        if (r > 0) {
          c.in.append(buf, static_cast<size_t>(r));
          if (c.tunnel && c.in.size() > (8u << 20)) break;
          continue;
        }
        if (r == 0) c.peer_closed = true;
        else if (errno == EINTR) continue;
        else if (errno != EAGAIN && errno != EWOULDBLOCK) c.peer_closed = true;
        break;
      }
    }
    if (c.tunnel && c.peer_closed && c.up_fd >= 0) ::shutdown(c.up_fd, SHUT_WR);
    pump(c);
  }

  void accept_all() {
    for (;;) {
      int c = ::accept4(listen_fd, nullptr, nullptr, SOCK_NONBLOCK | SOCK_CLOEXEC);
      if (c < 0) {
        if (errno == EINTR) continue;
        return;
      }
      if (static_cast<int>(conns.size()) >= opts.max_connections) {  // the connection cap
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
      auto conn = std::make_unique<Conn>();
      conn->fd = c;
      conn->id = ++next_conn_id;
      conn->active = Clock::now();
      conns[c] = std::move(conn);
    }
  }

  // Closes connections with nothing in progress for longer than the idle timeout.
  void sweep_idle() {
    if (opts.idle_timeout_s <= 0) return;
    auto limit =
        Clock::now() - std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(opts.idle_timeout_s));
    std::vector<int> idle;
    for (auto& kv : conns) {
      Conn& c = *kv.second;
      if ((c.lingering || (!c.busy && !c.awaiting && !c.tunnel && c.out.empty())) && c.active < limit)
        idle.push_back(kv.first);
    }
    for (int fd : idle)
      if (Conn* c = conn_of(fd)) drop(*c);
  }
};

bool frontend_available() {
#ifdef AIMASS_HAVE_OPENSSL
  return true;
#else
  return false;
#endif
}

Frontend::Frontend(FrontendOptions opts, std::vector<double> latency_bounds) : impl_(new Impl) {
#ifndef AIMASS_HAVE_OPENSSL
  throw IOError("the native front end was compiled out: OpenSSL's libcrypto (libssl-dev) was missing "
                            "when aimass was built; install it and rebuild, or use --http uvicorn");
#endif
  Impl& s = *impl_;
  AIMASS_CHECK(opts.port >= 0 && opts.port <= 65535, ValueError, "Frontend: port=", opts.port, " not in [0, 65535]");
  bool local = opts.upstream_port == 0 && opts.local_decode && opts.local_other;
  AIMASS_CHECK(local || (opts.upstream_port > 0 && opts.upstream_port <= 65535), ValueError,
               "Frontend: upstream_port=", opts.upstream_port, " not in [1, 65535]");
  AIMASS_CHECK(opts.max_connections >= 1, ValueError, "Frontend: max_connections must be >= 1");
  AIMASS_CHECK(opts.limits.max_body_bytes >= 0 && opts.limits.max_header_bytes >= 64, ValueError,
               "Frontend: limits must be max_body_bytes >= 0 and max_header_bytes >= 64");
  s.opts = opts;
  s.bounds = std::move(latency_bounds);
  s.listen_fd = wire::listen_on(opts.host, opts.port, 1024, "Frontend", s.port);
  s.epoll_fd = ::epoll_create1(EPOLL_CLOEXEC);
  s.event_fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  s.done->fd = ::eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  AIMASS_CHECK(s.epoll_fd >= 0 && s.event_fd >= 0 && s.done->fd >= 0, IOError, "Frontend: epoll/eventfd: ",
               std::strerror(errno));
  for (int fd : {s.listen_fd, s.event_fd, s.done->fd}) {
    epoll_event e{};
    e.events = EPOLLIN;
    e.data.fd = fd;
    ::epoll_ctl(s.epoll_fd, EPOLL_CTL_ADD, fd, &e);
  }
}

Frontend::~Frontend() {
  // queued requests still hold buffers of their jobs: let their batchers finish them first
  for (auto& kv : impl_->pending)
    if (kv.second->req) kv.second->req->wait_for(5000000);
}

int Frontend::port() const { return impl_->port; }

void Frontend::stop() {
  impl_->stopping.store(true);
  uint64_t one = 1;
  ssize_t w = ::write(impl_->event_fd, &one, sizeof one);
  (void)w;
}

void Frontend::set_routes(std::shared_ptr<const Routes> routes) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lk(s.keys_mu);
  uint64_t e = s.epoch.load() + 1;
  std::unordered_map<int64_t, std::shared_ptr<RouteVersion>> now;
  for (const auto& m : routes->models)
    for (const auto& v : m.second.versions)
      if (v.second) now[v.second->key] = v.second;
  for (auto& kv : s.live)
    if (!now.count(kv.first)) s.dropped[kv.first] = {kv.second, e};
  for (auto& kv : now) s.dropped.erase(kv.first);
  s.live = std::move(now);
  std::atomic_store(&s.routes, std::move(routes));
  s.epoch.store(e);
  uint64_t one = 1;  // the loop reads the new table at its next turn: wake it
  ssize_t w = ::write(s.event_fd, &one, sizeof one);
  (void)w;
}

bool Frontend::version_busy(int64_t key) const {
  const Impl& s = *impl_;
  std::lock_guard<std::mutex> lk(s.keys_mu);
  if (s.live.count(key)) return true;
  auto it = s.dropped.find(key);
  if (it == s.dropped.end()) return false;
  // a request routed before the swap may not have counted itself yet: wait for the loop's next turn
  if (!s.loop_done.load() && s.seen_epoch.load() < it->second.second) return true;
  return it->second.first->inflight.load() > 0;
}

void Frontend::set_tokens(std::vector<TokenEntry> tokens, bool enabled) {
  Impl& s = *impl_;
  std::lock_guard<std::mutex> lk(s.tok_mu);
  s.tokens_on = enabled;
  std::unordered_map<std::string, Impl::Bucket> keep;
  s.tokens.clear();
  for (auto& t : tokens) {
    if (t.rate > 0) {
      auto old = s.buckets.find(t.digest);
      Impl::Bucket b;
      if (old != s.buckets.end() && old->second.rate == t.rate && old->second.burst == t.burst) {
        b = old->second;
      } else {
        b.rate = t.rate;
        b.burst = t.burst;
        b.level = t.burst;
        b.stamp = Clock::now();
      }
      keep[t.digest] = b;
    }
    std::string d = t.digest;
    s.tokens[d] = std::move(t);
  }
  s.buckets = std::move(keep);
}

double Frontend::take_token(const std::string& digest) {
  std::lock_guard<std::mutex> lk(impl_->tok_mu);
  return impl_->take_locked(digest);
}

void Frontend::set_draining(bool on) { impl_->draining.store(on); }
int64_t Frontend::inflight() const { return impl_->inflight_n.load() + impl_->held.load(); }
uint64_t Frontend::native_answers() const { return impl_->answers.load(); }
uint64_t Frontend::forwarded() const { return impl_->forwards.load(); }
uint64_t Frontend::replies() const { return impl_->replies.load(); }

std::vector<FrontendCount> Frontend::counts() const {
  std::lock_guard<std::mutex> lk(impl_->m_mu);
  std::vector<FrontendCount> out;
  for (const auto& kv : impl_->counts)
    out.push_back({std::get<0>(kv.first), proto_name(std::get<2>(kv.first)), std::get<1>(kv.first),
                   std::get<3>(kv.first), kv.second});
  return out;
}

std::vector<FrontendLatency> Frontend::latency() const {
  std::lock_guard<std::mutex> lk(impl_->m_mu);
  std::vector<FrontendLatency> out;
  for (const auto& kv : impl_->lat) {
    FrontendLatency l;
    l.model = kv.first.first;
    l.version = kv.first.second;
    for (size_t i = 0; i + 1 < kv.second.size(); ++i) l.counts.push_back(static_cast<uint64_t>(kv.second[i]));
    l.sum_s = kv.second.back();
    out.push_back(std::move(l));
  }
  return out;
}

std::vector<FrontendError> Frontend::take_errors() {
  std::lock_guard<std::mutex> lk(impl_->m_mu);
  std::vector<FrontendError> out;
  out.swap(impl_->errors);
  return out;
}

void Frontend::serve() {
  Impl& s = *impl_;
  epoll_event evs[64];
  auto last_sweep = Clock::now();
  while (!s.stopping.load()) {
    s.seen_epoch.store(s.epoch.load());  // requests of this turn see at least this table
    int n = ::epoll_wait(s.epoll_fd, evs, 64, s.conns.empty() ? -1 : 1000);
    if (n < 0) {
      if (errno == EINTR) continue;
      throw IOError(std::string("Frontend: epoll_wait: ") + std::strerror(errno));
    }
    // A request may run inline only when it is the one thing to do (the floor server's rule).
    s.allow_inline = n == 1 && s.pending.empty();
    for (int i = 0; i < n && !s.stopping.load(); ++i) {
      int fd = evs[i].data.fd;
      if (fd == s.listen_fd) s.accept_all();
      else if (fd == s.done->fd) s.on_done();
      else if (fd == s.event_fd) {
        uint64_t v;
        ssize_t r = ::read(s.event_fd, &v, sizeof v);
        (void)r;
      } else if (s.up_owner.count(fd)) s.on_upstream(fd, evs[i].events);
      else s.on_conn(fd, evs[i].events);
    }
    auto now = Clock::now();
    if (now - last_sweep > std::chrono::seconds(1)) {
      last_sweep = now;
      s.sweep_idle();
    }
  }
  s.loop_done.store(true);  // no request starts any more: retirement waits only for the in-flight ones
}

}  // namespace aimass::serve
