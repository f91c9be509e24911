// Run-time CPU feature detection and the SIMD level every kernel dispatches on.
// One place decides; kernels ask simd_level() and call their _avx512/_avx2/scalar
// variant. AIMASS_SIMD=scalar|avx2|avx512 caps the level (tests use it to run
// each path on one machine).
#pragma once
#include <string>

namespace aimass {

enum class SimdLevel : int { Scalar = 0, AVX2 = 1, AVX512 = 2 };

struct CpuFeatures {
  bool sse42 = false;
  bool avx2 = false;
  bool fma = false;
  bool f16c = false;
  bool avx512f = false;
  bool avx512bw = false;
  bool avx512vl = false;
  bool avx512dq = false;
  bool avx512vnni = false;
  bool avx512bf16 = false;
};

// What the processor and OS support (cached after the first call).
const CpuFeatures& cpu_features();
// The level kernels use: the best supported, capped by AIMASS_SIMD or set_simd_level.
SimdLevel simd_level();
// Cap the level at run time (never raises it above what the CPU supports).
// Returns the level now in force.
SimdLevel set_simd_level(SimdLevel cap);
const char* simd_level_name(SimdLevel level);
// Parses "scalar", "avx2", "avx512"; throws ValueError otherwise.
SimdLevel parse_simd_level(const std::string& name);

}  // namespace aimass
