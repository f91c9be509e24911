#include "aimass/cpu_features.h"

#include <atomic>
#include <cstdlib>

#include "aimass/error.h"

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif

namespace aimass {
namespace {

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // GCC's checks include the OS (XCR0) state for the AVX/AVX-512 registers.
  f.sse42 = __builtin_cpu_supports("sse4.2");
  f.avx2 = __builtin_cpu_supports("avx2");
  f.fma = __builtin_cpu_supports("fma");
#if defined(__clang__) && __clang_major__ < 16
  {  // clang < 16 has no "f16c" for __builtin_cpu_supports (the fuzz build uses clang 14)
    unsigned a, b, c, d;
    f.f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
  }
#else
  f.f16c = __builtin_cpu_supports("f16c");
#endif
  f.avx512f = __builtin_cpu_supports("avx512f");
  f.avx512bw = __builtin_cpu_supports("avx512bw");
  f.avx512vl = __builtin_cpu_supports("avx512vl");
  f.avx512dq = __builtin_cpu_supports("avx512dq");
  f.avx512vnni = __builtin_cpu_supports("avx512vnni");
  f.avx512bf16 = __builtin_cpu_supports("avx512bf16");
#endif
  return f;
}

SimdLevel best_supported(const CpuFeatures& f) {
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni && f.avx2 && f.fma && f.f16c)
    return SimdLevel::AVX512;
  if (f.avx2 && f.fma && f.f16c) return SimdLevel::AVX2;
  return SimdLevel::Scalar;
}

SimdLevel initial_level() {
  SimdLevel best = best_supported(cpu_features());
  if (const char* env = std::getenv("AIMASS_SIMD")) {
    if (*env) {
      SimdLevel cap = parse_simd_level(env);
      if (static_cast<int>(cap) < static_cast<int>(best)) best = cap;
    }
  }
  return best;
}

std::atomic<int>& level_slot() {
  static std::atomic<int> slot{static_cast<int>(initial_level())};
  return slot;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

SimdLevel simd_level() { return static_cast<SimdLevel>(level_slot().load(std::memory_order_relaxed)); }

SimdLevel set_simd_level(SimdLevel cap) {
  SimdLevel best = best_supported(cpu_features());
  SimdLevel now = static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
  level_slot().store(static_cast<int>(now));
  return now;
}

const char* simd_level_name(SimdLevel level) {
  switch (level) {
    case SimdLevel::AVX512: return "avx512";
    case SimdLevel::AVX2: return "avx2";
    default: return "scalar";
  }
}

SimdLevel parse_simd_level(const std::string& name) {
  if (name == "scalar") return SimdLevel::Scalar;
  if (name == "avx2") return SimdLevel::AVX2;
  if (name == "avx512") return SimdLevel::AVX512;
  throw ValueError("SIMD level '" + name + "' is unknown: use 'scalar', 'avx2' or 'avx512' (AIMASS_SIMD)");
}

}  // namespace aimass
