// The C++ tests' tiny model (tiny_linear_model_bytes.h) written as an .aimass file under TempDir().
// The file name carries the process id: ctest runs tests as separate processes, two at a time.
#pragma once
#include <unistd.h>

#include <fstream>
#include <string>

#include <gtest/gtest.h>

#include "tiny_linear_model_bytes.h"

namespace aimass_test {

inline std::string write_linear_model(const std::string& name, const std::string& version = "1",
                                      const std::string& weight_ref = "fc.weight", size_t truncate_to = 0) {
  std::string bytes = linear_model_bytes(version, weight_ref, truncate_to);
  std::string path = ::testing::TempDir() + std::to_string(::getpid()) + "_" + name;
  std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
  return path;
}

}  // namespace aimass_test
