// Shared by fuzz_model.cc and fuzz_graph.cc: load an .aimass file from memory, build
// the executor under a memory cap, run it on deterministic inputs, and a structure-aware
// mutation of the JSON text (numbers -> boundary values, op names swapped). Anything but
// an aimass error traps.
#pragma once
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <string>
#include <vector>

#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include "fuzz_util.h"

namespace aimass_fuzz {

namespace rt = aimass::runtime;

// Loads `bytes` as a model, builds an Executor (plan buffers capped at 8 MiB), and runs
// 2 rows of inputs holding finite values, NaN, +-inf and (int64) indices in and out of range.
inline void load_and_run(const std::string& bytes) {
  static const bool one_thread = (aimass::set_num_threads(1), true);  // no pool hand-offs: more execs/s
  (void)one_thread;
  try {
    MemFile f(bytes.data(), bytes.size());
    auto m = rt::Model::load(f.path());
    rt::ExecutorOptions o;
    o.max_batch_size = 2;
    o.max_memory_bytes = int64_t{8} << 20;  // bigger plans take the rejection path: more execs/s
    rt::Executor ex(m, o);
    uint64_t h = bytes.size() * 0x9E3779B97F4A7C15ull;
    for (size_t i = 0; i < m->inputs().size(); ++i) {
      const auto& spec = m->inputs()[i];
      const int64_t n = 2 * spec.row_numel();
      if (spec.dtype == rt::ValueType::Int64) {
        auto* p = static_cast<int64_t*>(ex.input_buffer(static_cast<int>(i)));
        for (int64_t k = 0; k < n; ++k) {  // mostly valid small indices, now and then -1 or 2^62
          const uint64_t r = (h = h * 6364136223846793005ull + 1) >> 40;
          p[k] = r % 61 == 0 ? -1 : r % 59 == 0 ? int64_t{1} << 62 : static_cast<int64_t>(r % 4);
        }
      } else {
        auto* p = static_cast<float*>(ex.input_buffer(static_cast<int>(i)));
        for (int64_t k = 0; k < n; ++k) {
          h = h * 6364136223846793005ull + 1;
          const uint32_t r = static_cast<uint32_t>(h >> 40);
          p[k] = r % 97 == 0   ? std::numeric_limits<float>::quiet_NaN()
                 : r % 89 == 0 ? std::numeric_limits<float>::infinity()
                 : r % 83 == 0 ? -std::numeric_limits<float>::infinity()
                               : static_cast<float>(r % 2001) / 500.f - 2.f;
        }
      }
    }
    ex.execute(2);
    for (size_t i = 0; i < m->outputs().size(); ++i) {  // outputs are readable
      volatile uint8_t sink = 0;
      const auto* o8 = static_cast<const uint8_t*>(ex.output_buffer(static_cast<int>(i)));
      for (int64_t k = 0; k < 2 * m->outputs()[i].row_bytes(); ++k) sink ^= o8[k];
      (void)sink;
    }
    if (std::getenv("AIMASS_FUZZ_VERBOSE")) std::fprintf(stderr, "ran\n");
  } catch (const aimass::Error& e) {
    // a typed error on bad input: the expected outcome
    if (std::getenv("AIMASS_FUZZ_VERBOSE")) std::fprintf(stderr, "error: %s\n", e.what());
  } catch (const std::exception& e) {
    std::fprintf(stderr, "fuzz target: untyped exception %s\n", e.what());
    __builtin_trap();
  }
}

// Replaces one JSON number of `s` (also inside embedded JSON strings) with a boundary
// value, or one op name with another; returns false when nothing applied.
inline bool mutate_json_text(std::string& s, Rng& r) {
  static const char* kNumbers[] = {"4611686018427387904", "9223372036854775807", "9223372036854775808",
                                   "18446744073709551616", "4294967296", "2147483648", "1099511627776",
                                   "1099511627777", "1e308", "-1e308", "1e999", "-1", "0", "0.5", "-0", "1", "2",
                                   "3", "7", "8", "16", "65", "-9223372036854775808", "NaN", "Infinity",
                                   "-Infinity"};
  static const char* kOps[] = {"linear", "conv2d", "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "reshape",
                               "identity", "activation", "softmax", "log_softmax", "layer_norm", "embedding",
                               "add", "sub", "mul", "div", "channel_affine"};
  if (r.below(5) != 0) {  // a number
    std::vector<size_t> starts;
    for (size_t i = 0; i < s.size(); ++i)
      if ((s[i] == '-' || (s[i] >= '0' && s[i] <= '9')) && (i == 0 || std::strchr(" :[,", s[i - 1])))
        starts.push_back(i);
    if (starts.empty()) return false;
    const size_t a = starts[r.below(starts.size())];
    size_t b = a + 1;
    while (b < s.size() && std::strchr("0123456789.eE+-", s[b])) ++b;
    std::string v = r.below(3) == 0 ? std::to_string(boundary_value(r, std::strtoull(s.c_str() + a, nullptr, 10)))
                                    : kNumbers[r.below(sizeof kNumbers / sizeof *kNumbers)];
    s.replace(a, b - a, v);
    return true;
  }
  // an op name (between escaped or plain quotes after "op")
  const size_t at = s.find("op\\\": \\\"", r.below(s.size() + 1));
  const size_t at2 = at == std::string::npos ? s.find("op\": \"") : at;
  if (at2 == std::string::npos) return false;
  const size_t q0 = s.find('"', at2 + 3);
  size_t q1 = s.find('"', q0 + 1);
  if (q0 == std::string::npos || q1 == std::string::npos) return false;
  if (s[q1 - 1] == '\\') --q1;
  s.replace(q0 + 1, q1 - q0 - 1, kOps[r.below(sizeof kOps / sizeof *kOps)]);
  return true;
}

}  // namespace aimass_fuzz
