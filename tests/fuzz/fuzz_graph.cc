// Fuzz target: the model graph JSON (the "aimass.graph" metadata of an .aimass file), in
// a fixed, valid file around it: tensors of several shapes and dtypes (fp32 weights for
// linear / conv / embedding / layer norm, int8 and packed-int4 quantized weights with
// scales) and the signature x f32 [-1, 2, 6, 6], v f32 [-1, 8], ids i64 [-1, 3] ->
// y f32 [-1, 8]. The input is the graph text; the target escapes it into the header,
// loads the file, builds the plan (8 MiB cap) and runs 2 rows. Anything but an aimass
// error traps. The custom mutator rewrites a number to a boundary value or swaps an op
// name (fuzz_model_util.h), else libFuzzer mutates the text.
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "fuzz_model_util.h"

namespace {

struct Fixed {
  const char* name;
  const char* dtype;
  std::vector<int64_t> shape;
  int item;
};

const std::vector<Fixed>& fixed_tensors() {
  static const std::vector<Fixed> t = {
      {"w8x8", "F32", {8, 8}, 4},   {"b8", "F32", {8}, 4},        {"w8x27", "F32", {8, 27}, 4},
      {"w8x24", "F32", {8, 24}, 4}, {"conv_w", "F32", {3, 2, 3, 3}, 4}, {"b3", "F32", {3}, 4},
      {"emb", "F32", {10, 8}, 4},   {"ln_w", "F32", {8}, 4},      {"ch2", "F32", {2}, 4},
      {"q8", "I8", {8, 8}, 1},      {"q8s", "F32", {8}, 4},       {"q4", "U8", {8, 4}, 1},
      {"q4s", "F32", {8}, 4},       {"one", "F32", {1}, 4},       {"f16", "F16", {8}, 2},
  };
  return t;
}

std::string json_escape(const std::string& s) {
  std::string o;
  for (unsigned char c : s) {
    if (c == '"' || c == '\\') {
      o += '\\';
      o += static_cast<char>(c);
    } else if (c < 0x20) {
      char b[8];
      std::snprintf(b, sizeof b, "\\u%04x", c);
      o += b;
    } else {
      o += static_cast<char>(c);
    }
  }
  return o;
}

// The .aimass bytes with `graph` as its graph.
std::string build_file(const std::string& graph) {
  std::string h = "{";
  std::string data;
  for (const auto& t : fixed_tensors()) {
    int64_t n = 1;
    for (auto d : t.shape) n *= d;
    const size_t begin = data.size();
    for (int64_t i = 0; i < n * t.item; ++i) {
      // small values (fp32 0.125 * k, int8 -3..3 (never -128), nibbles), fp16 1.0
      const int64_t e = i / t.item, b = i % t.item;
      uint8_t v = 0;
      if (t.item == 4) {
        float f = 0.125f * static_cast<float>((e % 9) - 4);
        if (t.name[0] == 'q') f = 0.01f;  // quantization scales must be > 0
        uint8_t fb[4];
        std::memcpy(fb, &f, 4);
        v = fb[b];
      } else if (t.item == 2) {
        v = b ? 0x3c : 0x00;
      } else {
        // int8 -3..3; packed int4 nibbles 0..6 (a nibble 8 = -8 is outside the symmetric range)
        v = static_cast<uint8_t>(std::strcmp(t.dtype, "I8") == 0 ? static_cast<int8_t>(e % 7 - 3) : (e % 7) * 0x11);
      }
      data += static_cast<char>(v);
    }
    h += "\"" + std::string(t.name) + "\": {\"dtype\": \"" + t.dtype + "\", \"shape\": [";
    for (size_t i = 0; i < t.shape.size(); ++i) h += (i ? ", " : "") + std::to_string(t.shape[i]);
    h += "], \"data_offsets\": [" + std::to_string(begin) + ", " + std::to_string(data.size()) + "]}, ";
  }
  static const std::string sig = json_escape(
      "{\"inputs\": [{\"name\": \"x\", \"dtype\": \"float32\", \"shape\": [-1, 2, 6, 6]}, "
      "{\"name\": \"v\", \"dtype\": \"float32\", \"shape\": [-1, 8]}, "
      "{\"name\": \"ids\", \"dtype\": \"int64\", \"shape\": [-1, 3]}], "
      "\"outputs\": [{\"name\": \"y\", \"dtype\": \"float32\", \"shape\": [-1, 8]}]}");
  h += "\"__metadata__\": {\"aimass.format_version\": \"1\", \"aimass.signature\": \"" + sig +
       "\", \"aimass.graph\": \"" + json_escape(graph) + "\"}}";
  const uint64_t n = h.size();
  std::string out(8, '\0');
  std::memcpy(&out[0], &n, 8);
  return out + h + data;
}

}  // namespace

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  aimass_fuzz::Rng r(seed);
  if (r.below(3) == 0) return LLVMFuzzerMutate(data, size, max_size);
  std::string s(reinterpret_cast<const char*>(data), size);
  if (!aimass_fuzz::mutate_json_text(s, r) || s.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, s.data(), s.size());
  return s.size();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  aimass_fuzz::load_and_run(build_file(std::string(reinterpret_cast<const char*>(data), size)));
  return 0;
}
