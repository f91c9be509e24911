// Fuzz target: an .aimass model file (safetensors: 8-byte little-endian header length,
// JSON header with tensors and the graph / signature in __metadata__, then the data) as
// aimass::runtime::Model::load reads it, then Executor plan build (8 MiB cap) and one
// execute of 2 rows. Anything but an aimass error traps (fuzz_model_util.h).
//
// The custom mutator keeps the framing valid: it rewrites one number of the header
// (shapes, data_offsets, attrs and signature dims inside the embedded JSON strings) to a
// boundary value (2^62, 2^63, 2^64, 2^40 + 1, 1e308, NaN, 0.5, -1, ...), swaps an op
// name, or lets libFuzzer mutate the header or the data region, and then rewrites the
// header length so the file still parses as safetensors framing.
#include <cstdint>
#include <cstring>
#include <string>

#include "fuzz_model_util.h"

extern "C" size_t LLVMFuzzerMutate(uint8_t* data, size_t size, size_t max_size);

extern "C" size_t LLVMFuzzerCustomMutator(uint8_t* data, size_t size, size_t max_size, unsigned seed) {
  aimass_fuzz::Rng r(seed);
  uint64_t hlen = 0;
  if (size >= 8) std::memcpy(&hlen, data, 8);
  if (size < 8 || hlen > size - 8 || r.below(16) == 0) return LLVMFuzzerMutate(data, size, max_size);
  std::string header(reinterpret_cast<const char*>(data) + 8, hlen);
  std::string body(reinterpret_cast<const char*>(data) + 8 + hlen, size - 8 - hlen);
  switch (r.below(4)) {
    case 0:
    case 1:
      if (!aimass_fuzz::mutate_json_text(header, r)) return LLVMFuzzerMutate(data, size, max_size);
      break;
    case 2: {  // libFuzzer's byte mutations inside the header text
      header.resize(header.size() + 64);
      header.resize(LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(&header[0]), header.size() - 64, header.size()));
      break;
    }
    default: {  // inside the data region
      if (body.empty()) return LLVMFuzzerMutate(data, size, max_size);
      body.resize(body.size() + 16);
      body.resize(LLVMFuzzerMutate(reinterpret_cast<uint8_t*>(&body[0]), body.size() - 16, body.size()));
    }
  }
  const uint64_t nh = header.size();
  if (8 + nh + body.size() > max_size) return LLVMFuzzerMutate(data, size, max_size);
  std::memcpy(data, &nh, 8);
  std::memcpy(data + 8, header.data(), nh);
  std::memcpy(data + 8 + nh, body.data(), body.size());
  return 8 + nh + body.size();
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  aimass_fuzz::load_and_run(std::string(reinterpret_cast<const char*>(data), size));
  return 0;
}
