// Fuzz target: the native serve path's readers of network bytes (aimass/serve.h): the HTTP/1.1
// request parser under small limits, and the JSON number-body readers of the hot routes. The
// input is the raw bytes a client could send (the readers also get its body part). Whatever they
// accept must be self-consistent: a parsed request's views lie inside the input and its body
// matches Content-Length; a number body's values fill its shape exactly.
#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "aimass/serve.h"
#include "fuzz_util.h"

namespace sv = aimass::serve;

namespace {
bool inside(std::string_view v, const char* data, size_t size) {
  return v.empty() || (v.data() >= data && v.data() + v.size() <= data + size);
}

void check_numbers(const char* data, size_t size) {
  std::vector<double> values;
  std::vector<int64_t> shape;
  for (const char* key : {"input", "instances"}) {
    if (sv::read_number_body(data, size, key, values, shape)) {
      int64_t n = 1;
      for (int64_t d : shape) {
        FUZZ_CHECK(d >= 1);
        n *= d;
      }
      FUZZ_CHECK(!shape.empty() && n == static_cast<int64_t>(values.size()));
    } else {
      FUZZ_CHECK(values.empty() && shape.empty());
    }
  }
  std::vector<sv::V2JsonInput> ins;
  if (sv::read_v2_json_inputs(data, size, ins)) {
    FUZZ_CHECK(!ins.empty());
    for (const auto& in : ins) {
      int64_t n = 1;
      for (int64_t d : in.data_shape) n *= d;
      FUZZ_CHECK(in.datatype == "FP32" && n == static_cast<int64_t>(in.values.size()));
    }
  } else {
    FUZZ_CHECK(ins.empty());
  }
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* bytes, size_t size) {
  const char* data = reinterpret_cast<const char*>(bytes);
  sv::HttpLimits lim;
  lim.max_header_bytes = 512;
  lim.max_headers = 16;
  lim.max_body_bytes = 4096;
  size_t off = 0;
  // every pipelined request in the input, as a connection would take them
  while (off < size) {
    sv::HttpRequest req;
    sv::ParseResult r = sv::parse_request(data + off, size - off, lim, req);
    if (r.status != sv::ParseStatus::Ok) {
      if (r.status == sv::ParseStatus::Error)
        FUZZ_CHECK(!r.error.empty() && (r.http_status == 400 || r.http_status == 413 || r.http_status == 431 ||
                                        r.http_status == 501 || r.http_status == 505));
      break;
    }
    FUZZ_CHECK(req.consumed >= 1 && req.consumed <= size - off);
    FUZZ_CHECK(inside(req.method, data + off, req.consumed) && inside(req.target, data + off, req.consumed));
    FUZZ_CHECK(inside(req.body, data + off, req.consumed) && !req.method.empty() && !req.target.empty());
    FUZZ_CHECK(static_cast<int64_t>(req.body.size()) <= lim.max_body_bytes);
    for (const auto& h : req.headers) FUZZ_CHECK(inside(h.name, data + off, req.consumed) && !h.name.empty());
    check_numbers(req.body.data(), req.body.size());
    off += req.consumed;
  }
  check_numbers(data, size);
  return 0;
}
