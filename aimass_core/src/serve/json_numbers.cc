// read_number_body (aimass/serve.h): the numeric body of /predict and TF-Serving rows without a
// document tree. Strict JSON: anything it does not take returns false and goes to the general
// parser, so it never accepts a body that the general path would refuse.
#include <charconv>
#include <cstring>

#include "aimass/serve.h"

namespace aimass::serve {
namespace {

constexpr size_t kMaxDepth = 32;

struct Reader {
  const char* p;
  const char* end;
  std::vector<double>& values;
  std::vector<int64_t>& shape;
  size_t leaf_depth = 0;  // depth of the numbers (0: not seen yet)

  void ws() {
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t')) ++p;
  }
  bool eat(char c) {
    if (p < end && *p == c) {
      ++p;
      return true;
    }
    return false;
  }
  bool number() {
    // JSON's grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?; from_chars alone would also
    // take "inf", "nan", hex floats, leading zeros and "1." which JSON does not.
    const char* s = p;
    if (p < end && *p == '-') ++p;
    if (p >= end || *p < '0' || *p > '9') return false;
    if (*p == '0') {
      ++p;
    } else {
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    bool integral = true;
    if (p < end && *p == '.') {
      ++p;
      integral = false;
      if (p >= end || *p < '0' || *p > '9') return false;
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
      ++p;
      integral = false;
      if (p < end && (*p == '+' || *p == '-')) ++p;
      if (p >= end || *p < '0' || *p > '9') return false;
      while (p < end && *p >= '0' && *p <= '9') ++p;
    }
    if (integral && p - s > 15 + (*s == '-')) return false;
    double v;
    auto r = std::from_chars(s, p, v);
    if (r.ec != std::errc() || r.ptr != p) return false;  // out of double's range
    values.push_back(v);
    return true;
  }
  // A string without escapes or control characters (anything else: the general path).
  bool string(std::string& out) {
    if (!eat('"')) return false;
    const char* s = p;
    while (p < end && *p != '"') {
      if (*p == '\\' || static_cast<unsigned char>(*p) < 0x20) return false;
      ++p;
    }
    if (p >= end) return false;
    out.assign(s, p);
    ++p;
    return true;
  }
  // [int, ...] of non-negative integers of at most 15 digits (empty allowed: a scalar's shape).
  bool int_list(std::vector<int64_t>& out) {
    if (!eat('[')) return false;
    ws();
    if (eat(']')) return true;
    for (;;) {
      const char* s = p;
      while (p < end && *p >= '0' && *p <= '9') ++p;
      if (p == s || p - s > 15 || (*s == '0' && p - s > 1)) return false;
      int64_t v = 0;
      for (const char* q = s; q < p; ++q) v = v * 10 + (*q - '0');
      out.push_back(v);
      ws();
      if (eat(']')) return true;
      if (!eat(',')) return false;
      ws();
    }
  }
  // One array at nesting depth d (1 for the outermost).
  bool array(size_t d) {
    if (d > kMaxDepth || !eat('[')) return false;
    ws();
    if (p < end && *p == ']') return false;  // empty: the general path says why
    int64_t n = 0;
    for (;;) {
      if (p < end && *p == '[') {
        if (leaf_depth && leaf_depth <= d) return false;  // numbers and lists mixed
        if (!array(d + 1)) return false;
      } else {
        if (leaf_depth == 0) leaf_depth = d;
        if (leaf_depth != d) return false;
        if (!number()) return false;
      }
      ++n;
      ws();
      if (eat(']')) break;
      if (!eat(',')) return false;
      ws();
    }
    if (shape.size() < d) shape.resize(d, -1);
    if (shape[d - 1] == -1) shape[d - 1] = n;
    return shape[d - 1] == n;  // rectangular
  }
};

bool read_body(const char* data, size_t len, std::string_view key, std::vector<double>& values,
               std::vector<int64_t>& shape) {
  Reader r{data, data + len, values, shape};
  r.ws();
  if (!r.eat('{')) return false;
  r.ws();
  if (!r.eat('"')) return false;
  if (static_cast<size_t>(r.end - r.p) < key.size() + 1 || std::memcmp(r.p, key.data(), key.size()) != 0 ||
      r.p[key.size()] != '"')
    return false;
  r.p += key.size() + 1;
  r.ws();
  if (!r.eat(':')) return false;
  r.ws();
  if (!r.array(1)) return false;
  r.ws();
  if (!r.eat('}')) return false;
  r.ws();
  return r.p == r.end && shape.size() == r.leaf_depth;
}

// {"name", "datatype", "shape", "data"} of one v2 input, each key once, in any order.
bool read_v2_input(Reader& r, V2JsonInput& in) {
  if (!r.eat('{')) return false;
  r.ws();
  bool got[4] = {false, false, false, false};
  for (;;) {
    std::string key;
    if (!r.string(key)) return false;
    r.ws();
    if (!r.eat(':')) return false;
    r.ws();
    int k = key == "name" ? 0 : key == "datatype" ? 1 : key == "shape" ? 2 : key == "data" ? 3 : -1;
    if (k < 0 || got[k]) return false;
    got[k] = true;
    bool ok = k == 0 ? r.string(in.name) : k == 1 ? r.string(in.datatype) : k == 2 ? r.int_list(in.shape) : false;
    if (k == 3) {
      // a fresh reader state per tensor: its own values, nesting and leaf depth
      Reader d{r.p, r.end, in.values, in.data_shape};
      ok = d.array(1) && in.data_shape.size() == d.leaf_depth;
      r.p = d.p;
    }
    if (!ok) return false;
    r.ws();
    if (r.eat('}')) break;
    if (!r.eat(',')) return false;
    r.ws();
  }
  return got[0] && got[1] && got[2] && got[3] && in.datatype == "FP32";
}

bool read_v2(const char* data, size_t len, std::vector<V2JsonInput>& out) {
  std::vector<double> unused_v;
  std::vector<int64_t> unused_s;
  Reader r{data, data + len, unused_v, unused_s};
  r.ws();
  if (!r.eat('{')) return false;
  r.ws();
  std::string key;
  if (!r.string(key) || key != "inputs") return false;
  r.ws();
  if (!r.eat(':')) return false;
  r.ws();
  if (!r.eat('[')) return false;
  r.ws();
  for (;;) {
    if (out.size() >= 64) return false;
    out.emplace_back();
    if (!read_v2_input(r, out.back())) return false;
    r.ws();
    if (r.eat(']')) break;
    if (!r.eat(',')) return false;
    r.ws();
  }
  r.ws();
  if (!r.eat('}')) return false;
  r.ws();
  return r.p == r.end;
}

}  // namespace

bool read_v2_json_inputs(const char* data, size_t len, std::vector<V2JsonInput>& out) {
  out.clear();
  if (read_v2(data, len, out)) return true;
  out.clear();
  return false;
}

bool read_number_body(const char* data, size_t len, std::string_view key, std::vector<double>& values,
                      std::vector<int64_t>& shape) {
  values.clear();
  shape.clear();
  if (read_body(data, len, key, values, shape)) return true;
  values.clear();
  shape.clear();
  return false;
}

}  // namespace aimass::serve
