// The native floor server (aimass/serve.h): the bench's configuration of the front end (frontend.cc)
// with no upstream. One model, routed as version 1 of `model_name` and as /predict; the front end's hot
// readers, event loop, batching and encoder answer what it can, and this file words the rest as a
// standalone server would: health checks, 404/405, and the general JSON readers' 400s naming the input
// (a body the hot readers leave, such as nested data with other keys, or INT64 tensors).
#include <cmath>
#include <string>
#include <vector>

#include "aimass/batcher.h"
#include "aimass/error.h"
#include "aimass/runtime.h"
#include "aimass/serve.h"
#include "runtime/json.h"

namespace aimass::serve {
namespace rt = aimass::runtime;
namespace json = aimass::runtime::json;

namespace {

struct HttpError {
  int status;
  std::string message;
};

const char* v2_type(rt::ValueType t) { return t == rt::ValueType::Int64 ? "INT64" : "FP32"; }

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

// Numbers from JSON into the bytes of one input (FP32 or INT64).
void from_numbers(const std::vector<double>& nums, const rt::TensorSpec& s, std::vector<char>& dst,
                  const std::string& what) {
  if (s.dtype == rt::ValueType::Int64) {
    dst.resize(nums.size() * 8);
    auto* p = reinterpret_cast<int64_t*>(dst.data());
    for (size_t i = 0; i < nums.size(); ++i) {
      double v = nums[i];
      if (!(std::fabs(v) < 9.2e18) || v != std::floor(v)) throw HttpError{400, what + ": INT64 data must hold integers"};
      p[i] = static_cast<int64_t>(v);
    }
  } else {
    dst.resize(nums.size() * 4);
    auto* p = reinterpret_cast<float*>(dst.data());
    for (size_t i = 0; i < nums.size(); ++i) p[i] = static_cast<float>(nums[i]);
  }
}

// ---------------------------------------------------------------- KServe v2 infer (the general reader)
void v2_infer(const HttpRequest& req, const rt::Model& model, LocalAnswer& out) {
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
  const auto& specs = model.inputs();
  std::vector<std::vector<char>> owned(specs.size());
  std::vector<bool> given(specs.size(), false);
  size_t bin_off = json_len;
  int64_t rows = -1;
  for (const auto& t : ins->arr) {
    const json::Value* nm = t.is_object() ? t.find("name") : nullptr;
    if (!nm || !nm->is_string()) throw HttpError{400, "each input needs a 'name'"};
    size_t k = 0;
    while (k < specs.size() && specs[k].name != nm->str) ++k;
    std::string what = "input '" + nm->str + "'";
    if (k == specs.size()) throw HttpError{400, "unknown " + what};
    if (given[k]) throw HttpError{400, what + " given twice"};
    given[k] = true;
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
      else if (n != s.shape[d])
        throw HttpError{400, what + ": wrong shape (dim " + std::to_string(d) + " is " + std::to_string(n) +
                                 ", the model takes " + std::to_string(s.shape[d]) + ")"};
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
      owned[k].assign(req.body.data() + bin_off, req.body.data() + bin_off + need);
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
    }
  }
  for (size_t k = 0; k < specs.size(); ++k)
    if (!given[k]) throw HttpError{400, "missing input '" + specs[k].name + "'"};
  if (bin_off != req.body.size())
    throw HttpError{400, std::to_string(req.body.size() - bin_off) + " bytes after the binary inputs"};
  bool binary_out = false;
  if (const json::Value* p = root.find("parameters"); p && p->is_object())
    if (const json::Value* b = p->find("binary_data_output"); b && b->kind == json::Value::Bool) binary_out = b->b;
  out.inputs = std::move(owned);
  out.rows = rows;
  out.binary_out = binary_out;
}

// ---------------------------------------------------------------- {key: numbers} (/predict, TF-Serving rows)
void number_body(const HttpRequest& req, const rt::Model& model, const char* key, LocalAnswer& out) {
  if (model.inputs().size() != 1) throw HttpError{400, "/predict serves single-input models"};
  const auto& s = model.inputs()[0];
  json::Value root;
  try {
    root = json::parse(req.body.data(), req.body.size(), "request");
  } catch (const std::exception& e) {
    throw HttpError{400, std::string("malformed JSON: ") + e.what()};
  }
  const json::Value* in = root.is_object() ? root.find(key) : nullptr;
  if (!in || !(in->is_array() || in->is_number()))
    throw HttpError{400, std::string("the request needs '") + key + "': a list"};
  std::vector<double> nums;
  flatten(*in, nums, "input '" + s.name + "'");
  int64_t per = s.row_numel();
  if (nums.empty() || static_cast<int64_t>(nums.size()) % per)
    throw HttpError{400, "input '" + s.name + "': " + std::to_string(nums.size()) + " values are not whole rows of " +
                             std::to_string(per)};
  out.inputs.resize(1);
  from_numbers(nums, s, out.inputs[0], "input '" + s.name + "'");
  out.rows = static_cast<int64_t>(nums.size()) / per;
}

}  // namespace

struct FloorServer::Impl {
  std::shared_ptr<rt::Batcher> batcher;
  std::unique_ptr<Frontend> front;  // destroyed first: it waits for the requests it queued
};

FloorServer::FloorServer(const std::string& model_path, FloorOptions opts) : impl_(new Impl) {
  AIMASS_CHECK(opts.port >= 0 && opts.port <= 65535, ValueError, "FloorServer: port=", opts.port, " not in [0, 65535]");
  AIMASS_CHECK(opts.max_connections >= 1, ValueError, "FloorServer: max_connections must be >= 1");
  AIMASS_CHECK(opts.limits.max_body_bytes >= 0 && opts.limits.max_header_bytes >= 64, ValueError,
               "FloorServer: limits must be max_body_bytes >= 0 and max_header_bytes >= 64");
  AIMASS_CHECK(!opts.model_name.empty() && opts.model_name.find('/') == std::string::npos, ValueError,
               "FloorServer: model_name must be non-empty without '/'");
  auto model = rt::Model::load(model_path);
  AIMASS_CHECK(!rt::has_dynamic_seq(*model), ValueError, "FloorServer: serves models without a dynamic sequence dimension");
  rt::ExecutorOptions eo;
  eo.max_batch_size = opts.max_batch_size;
  impl_->batcher = std::make_shared<rt::Batcher>(
      std::make_shared<rt::Executor>(model, eo),
      rt::BatcherOptions{opts.max_batch_size, opts.max_queue_delay_us, opts.queue_capacity});

  FrontendOptions fo;
  fo.host = opts.host;
  fo.port = opts.port;
  fo.upstream_port = 0;  // no upstream: the two hooks below answer the rest
  fo.max_connections = opts.max_connections;
  fo.idle_timeout_s = 0;  // a measuring tool: connections stay until the client closes
  fo.run_inline = opts.run_inline;
  fo.limits = opts.limits;
  fo.local_decode = [](const HttpRequest& req, const rt::Model& m, const char* key, LocalAnswer& out) {
    try {
      if (key) number_body(req, m, key, out);
      else v2_infer(req, m, out);
    } catch (const HttpError& e) {
      out = {};
      out.status = e.status;
      out.text = e.message;
    }
  };
  const std::string v2 = "/v2/models/" + opts.model_name + "/infer";
  fo.local_other = [v2](const HttpRequest& req, std::string_view path, LocalAnswer& out) {
    if (path == v2 || path == "/predict") {  // a POST is answered by the front end
      out.status = 405;
      out.text = "use POST";
    } else if (path == "/v2/health/live" || path == "/v2/health/ready" || path == "/") {
      out.status = 200;
      out.text = "{}";
    } else {
      out.status = 404;
      out.text = "not found (this server answers POST " + v2 + " and /predict)";
    }
    (void)req;
  };
  impl_->front = std::make_unique<Frontend>(std::move(fo), std::vector<double>{});

  auto routes = std::make_shared<Routes>();
  RouteModel rm;
  rm.name = opts.model_name;
  rm.default_version = 1;
  auto rv = std::make_shared<RouteVersion>();
  rv->key = 1;
  rv->version = 1;
  rv->batcher = impl_->batcher;
  rm.versions[1] = rv;
  routes->models[opts.model_name] = std::move(rm);
  routes->predict_model = opts.model_name;
  impl_->front->set_routes(std::move(routes));
}

FloorServer::~FloorServer() {
  impl_->front.reset();     // waits for what it queued: its buffers are the front end's jobs'
  impl_->batcher->close();  // runs what is still queued
}

int FloorServer::port() const { return impl_->front->port(); }
uint64_t FloorServer::requests() const { return impl_->front->replies(); }
uint64_t FloorServer::inline_runs() const { return impl_->batcher->stats().inline_runs; }
void FloorServer::stop() { impl_->front->stop(); }
void FloorServer::serve() { impl_->front->serve(); }

}  // namespace aimass::serve
