#pragma once
// Off switches for A/B runs: a path stays on unless its variable is exactly "0".
// Callers cache the answer in a function-local static, so each is read once per process.
#include <cstdlib>
#include <cstring>

namespace aimass::runtime {

inline bool env_switch_on(const char* name) {
  const char* e = std::getenv(name);
  return !(e && std::strcmp(e, "0") == 0);
}

}  // namespace aimass::runtime
