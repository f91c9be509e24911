// Native HTTP pieces for serving: an HTTP/1.1 request parser with limits, the native front end of
// `aimass serve` (Frontend, below), and the bench's "native floor" server, a thin configuration of that
// front end with no upstream: one model, no tokens, metrics or label switches, its errors worded here.
// Its p50 at one connection, minus Session.run's, is what the compiled front end costs per request
// (aimass.bench.serve, docs/serving.md "Where the time goes").
#pragma once
#include <atomic>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace aimass::serve {

struct HttpLimits {
  size_t max_header_bytes = 16384;     // request line + headers; above: 431
  size_t max_headers = 100;            // header lines; above: 431
  int64_t max_body_bytes = 64 << 20;   // Content-Length above: 413
};

struct HttpHeader {
  std::string_view name, value;  // views into the parsed buffer; value without surrounding spaces
};

struct HttpRequest {
  std::string_view method, target, body;
  int minor_version = 1;       // HTTP/1.<minor>
  bool keep_alive = true;      // HTTP/1.1 unless "Connection: close"; HTTP/1.0 only with keep-alive
  size_t consumed = 0;         // bytes of the buffer this request took (head + body)
  std::vector<HttpHeader> headers;
  // The value of the first header named `name` (case-insensitive); empty view when absent.
  std::string_view header(std::string_view name) const;
  bool has_header(std::string_view name) const;
};

enum class ParseStatus { Incomplete, Ok, Error };

struct ParseResult {
  ParseStatus status = ParseStatus::Incomplete;
  int http_status = 0;   // with Error: 400, 413, 431, 501 or 505
  std::string error;     // with Error: what was wrong, for the response body
};

// Parses one request from the start of data[0, len). Incomplete: more bytes are needed (the
// head so far is within the limits). Ok: `out` holds views into data, out.consumed bytes.
// Error: the request is malformed or over a limit; the connection should answer
// http_status and close. Bodies need Content-Length (Transfer-Encoding: 501).
ParseResult parse_request(const char* data, size_t len, const HttpLimits& limits, HttpRequest& out);

// Length of the request head (request line + headers + the empty line) at the start of data, or
// 0 while it is incomplete. The front end uses it to tell a request whose body is still arriving.
size_t request_head_length(const char* data, size_t len);

// Reads a body that is exactly {"<key>": <nested arrays of JSON numbers>} (any JSON whitespace):
// the numbers in order into `values` (as doubles, correctly rounded) and the nesting's extents
// into `shape`. Returns false, leaving the general JSON path to parse the body and word any error,
// for anything else: other keys, a non-rectangular or empty nesting, nesting deeper than 32,
// booleans, strings, NaN/Infinity, numbers out of double range, and integers of more than 15
// digits (which a float conversion through double could round differently from an integer one).
// The hot /predict and TF-Serving row bodies of a float model: their 784 floats cost ~70 us
// through a document tree and Python objects, a few us here.
bool read_number_body(const char* data, size_t len, std::string_view key, std::vector<double>& values,
                      std::vector<int64_t>& shape);

// One tensor of a KServe v2 JSON request read by read_v2_json_inputs.
struct V2JsonInput {
  std::string name, datatype;
  std::vector<int64_t> shape;       // the "shape" field
  std::vector<double> values;       // "data", flattened
  std::vector<int64_t> data_shape;  // the nesting of "data"
};

// Reads a KServe v2 JSON body that is exactly {"inputs": [{"name", "datatype": "FP32", "shape",
// "data"}, ...]} (keys in any order, each once; names without escapes; shape of integers up to 15
// digits, >= 0; data as in read_number_body). Returns false for anything else (other keys such as
// "outputs", "parameters" or "id", other datatypes, binary inputs), which then take the general path.
bool read_v2_json_inputs(const char* data, size_t len, std::vector<V2JsonInput>& out);

struct FloorOptions {
  std::string host = "127.0.0.1";
  int port = 0;                      // 0: any free port (see FloorServer::port)
  std::string model_name = "model";  // the {name} of /v2/models/{name}/infer
  int64_t max_batch_size = 32;
  int64_t max_queue_delay_us = 500;
  int64_t queue_capacity = 1024;
  int max_connections = 1024;        // more are accepted and closed at once
  bool run_inline = true;            // false: every request goes through the batcher's queue
  HttpLimits limits;
};

class FloorServer {
 public:
  // Loads the model (the runtime's checks) and binds + listens; throws IOError when it cannot.
  FloorServer(const std::string& model_path, FloorOptions opts);
  ~FloorServer();
  FloorServer(const FloorServer&) = delete;
  FloorServer& operator=(const FloorServer&) = delete;
  int port() const;
  // Runs the front end's event loop on the calling thread until stop(). A lone request runs the
  // model on this thread (inline in the batcher when idle); when several are at hand they are queued
  // and batched, and the batcher's completion hook hands the answers back to the loop (a
  // connection's next request waits for its previous answer).
  void serve();
  // Makes serve() return (from any thread, or a signal handler's thread).
  void stop();
  uint64_t requests() const;  // responses sent, any status
  uint64_t inline_runs() const;  // requests run on the loop's thread (the rest were queued)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace aimass::serve

namespace aimass::runtime {
class Batcher;
class Model;
}

namespace aimass::serve {

// ---------------------------------------------------------------- `aimass serve --http native`
// The public socket of `aimass serve --http native` (docs/serving.md, "The native front end").
// Python keeps the control plane (loading, label switches, admin, /metrics, the dashboard) in its
// uvicorn app on a private loopback port; this front end answers the successful hot requests
// (KServe v2 infer binary/JSON, TF-Serving row :predict, /predict) through each version's Batcher,
// and forwards every other request byte for byte to uvicorn over one upstream keep-alive connection
// per client connection, relaying the answers in order. Anything it does not decode exactly as the
// Python path would (an error of any kind, gzip, chunked, other keys) is forwarded, so every error
// status and message stays Python's.

// One loaded version as Python pushes it. `key` is Python's handle for it (retirement checks).
struct RouteVersion {
  int64_t key = 0;
  int64_t version = 0;
  std::shared_ptr<runtime::Batcher> batcher;
  std::atomic<int64_t> inflight{0};  // native requests holding it
};

struct RouteModel {
  std::string name;
  int64_t default_version = -1;  // -1: none (not loaded): forwarded
  std::map<int64_t, std::shared_ptr<RouteVersion>> versions;
  std::map<std::string, int64_t> labels;
};

struct Routes {
  std::map<std::string, RouteModel> models;
  std::string predict_model;  // the model of /predict ("" : forwarded)
};

struct TokenEntry {
  std::string name;
  std::string digest;              // 32 bytes: sha256 of the token
  bool infer = false;              // has the infer scope
  bool all_models = true;
  std::vector<std::string> models;
  double rate = 0, burst = 0;      // rate 0: no bucket
  // auth.py's 403 and 429 messages for this token, made by Python so that they are its words exactly:
  // "token '<name>' lacks scope 'infer' (has [...])", "token '<name>' may not use model '" (+ model + "'")
  // and "token '<name>' is over its rate of <rate:g> requests/s (burst <burst:g>)"
  std::string scope_error, model_error_prefix, rate_error;
};

// What a front end with no upstream (FrontendOptions::upstream_port 0) does with a request it would
// have forwarded; the floor server's words (floor_server.cc).
struct LocalAnswer {
  int status = 0;  // 0 (local_decode only): run `inputs`; else answer this status
  std::string text;  // status 200: the JSON body; else the error's words ({"error": text})
  std::vector<std::vector<char>> inputs;  // one buffer per model input, `rows` rows each
  int64_t rows = 0;
  bool binary_out = false;  // KServe v2: every output as binary tensor data
};

struct FrontendOptions {
  std::string host = "127.0.0.1";
  int port = 0;
  std::string upstream_host = "127.0.0.1";
  int upstream_port = 0;              // uvicorn's private port
  int max_connections = 1024;         // more are accepted and closed at once
  double idle_timeout_s = 5.0;        // a connection with no request in progress for this long is closed
  int64_t deadline_us = -1;           // default request deadline (--deadline-ms), -1: none
  bool run_inline = true;             // false: every native request goes through the batcher's queue
  HttpLimits limits;
  // No upstream (upstream_port 0): both must be set. local_decode reads a routed POST that the hot
  // readers left (key: nullptr for KServe v2, else "instances" or "input"); local_other answers any
  // other request. Neither may keep a reference to `req` past the call.
  std::function<void(const HttpRequest& req, const runtime::Model& m, const char* key, LocalAnswer& out)> local_decode;
  std::function<void(const HttpRequest& req, std::string_view path, LocalAnswer& out)> local_other;
};

// Counts of native answers, merged into /metrics by Python at scrape time.
struct FrontendCount {
  std::string model, protocol;
  int64_t version = 0;
  int code = 0;
  uint64_t n = 0;
};
struct FrontendLatency {
  std::string model;
  int64_t version = 0;
  std::vector<uint64_t> counts;  // per bucket of latency_bounds() (le), then the overflow bucket
  double sum_s = 0;
};
// One error the front end answered itself (401/403 with tokens, 503 queue full / closed, 504), for
// Python's error log. version -1: none was resolved (an auth failure).
struct FrontendError {
  int status = 0;
  std::string path, model, message, type;
  int64_t version = 0;
};

class Frontend {
 public:
  // Binds + listens on host:port (IOError when it cannot). latency_bounds: the upper bounds (s) of
  // the request latency histogram (ServerMetrics' buckets).
  Frontend(FrontendOptions opts, std::vector<double> latency_bounds);
  ~Frontend();
  Frontend(const Frontend&) = delete;
  Frontend& operator=(const Frontend&) = delete;
  int port() const;
  // Runs the event loop on the calling thread until stop().
  void serve();
  void stop();
  // Replaces the routing table (one atomic swap); in-flight requests keep the versions they hold.
  void set_routes(std::shared_ptr<const Routes> routes);
  // true while the version `key` may still be used by a native request: it is routed, or a request
  // that may hold it has not finished. Python closes a retired Session only when this is false.
  bool version_busy(int64_t key) const;
  // The token table (empty: no tokens, every request allowed). Buckets live here, shared with
  // Python's TokenTable through take_token.
  void set_tokens(std::vector<TokenEntry> tokens, bool enabled);
  // Takes one request from the bucket of the token with this digest: 0 when allowed, else the
  // seconds to wait (auth.py's TokenBucket.take).
  double take_token(const std::string& digest);
  // SIGTERM: new hot requests are forwarded (Python answers 503 "draining"); requests whose head
  // arrived before keep running natively.
  void set_draining(bool on);
  int64_t inflight() const;  // native requests started and not answered (bodies still arriving included)
  std::vector<FrontendCount> counts() const;
  std::vector<FrontendLatency> latency() const;
  std::vector<FrontendError> take_errors();
  uint64_t native_answers() const;
  uint64_t forwarded() const;
  uint64_t replies() const;  // responses written here, any status (native answers, refusals, errors, 502s)

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

// false when the front end was compiled out (no OpenSSL libcrypto at build time).
bool frontend_available();

// Writes a float32 as orjson does (ryu's shortest digits and layout; NaN/inf as null), so native
// JSON answers are byte for byte the Python path's.
void append_f32_json(std::string& out, float v);

}  // namespace aimass::serve
