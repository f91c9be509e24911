// The bytes of the C++ tests' tiny model, y = relu(x @ W^T + b), x [B, 3], W [2, 3]: an .aimass file
// (safetensors header + graph and signature metadata). No gtest here: the fuzz targets use it too
// (tests/fuzz/fuzz_frontend.cc); tiny_linear_model.h writes it under the test's TempDir().
#pragma once
#include <cstdint>
#include <cstring>
#include <string>

namespace aimass_test {

inline constexpr float kW[6] = {1, -2, 0.5f, 0, 1, -1};
inline constexpr float kB[2] = {0.25f, -0.5f};

// version: aimass.format_version; weight_ref: the tensor name the graph asks for (a missing one makes a
// bad file); truncate_to: cut the file after that many bytes (0: whole).
inline std::string linear_model_bytes(const std::string& version = "1", const std::string& weight_ref = "fc.weight",
                                      size_t truncate_to = 0) {
  std::string graph =
      R"({\"nodes\":[{\"op\":\"linear\",\"name\":\"fc\",\"inputs\":[\"x\"],\"outputs\":[\"h\"],)"
      R"(\"params\":{\"weight\":\")" + weight_ref + R"(\",\"bias\":\"fc.bias\"},\"attrs\":{}},)"
      R"({\"op\":\"activation\",\"name\":\"act\",\"inputs\":[\"h\"],\"outputs\":[\"y\"],\"attrs\":{\"kind\":\"relu\"}}]})";
  std::string sig =
      R"({\"inputs\":[{\"name\":\"x\",\"dtype\":\"float32\",\"shape\":[-1,3]}],)"
      R"(\"outputs\":[{\"name\":\"y\",\"dtype\":\"float32\",\"shape\":[-1,2]}]})";
  std::string header = R"({"fc.weight":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},)"
                       R"("fc.bias":{"dtype":"F32","shape":[2],"data_offsets":[24,32]},)"
                       R"("__metadata__":{"aimass.format_version":")" + version +
                       R"(","aimass.producer":"test","aimass.graph":")" + graph + R"(","aimass.signature":")" +
                       sig + R"("}})";
  while (header.size() % 8) header += ' ';
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  std::memcpy(&bytes[0], &n, 8);
  bytes += header;
  bytes.append(reinterpret_cast<const char*>(kW), sizeof(kW));
  bytes.append(reinterpret_cast<const char*>(kB), sizeof(kB));
  if (truncate_to) bytes.resize(truncate_to);
  return bytes;
}

}  // namespace aimass_test
