// The u8 -> f32 Cast/Normalize kernel of the loader's fused transforms, AVX2:
// o[k] = float(src[k]) * a[k] + b[k]. Compiled with -mavx2; called only at the AVX2
// level or above (loader.cc holds the scalar reference, affine_u8_f32_scalar).
#include <immintrin.h>

#include <cstdint>

// Multiply then add, never fused: the same roundings as the scalar reference.
#pragma GCC optimize("fp-contract=off")

namespace aimass {
namespace data {

void affine_u8_f32_avx2(const uint8_t* src, const float* a, const float* b, float* o, int64_t n) {
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m128i u8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(src + k));
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(u8));
    _mm256_storeu_ps(o + k, _mm256_add_ps(_mm256_mul_ps(x, _mm256_loadu_ps(a + k)), _mm256_loadu_ps(b + k)));
  }
  for (; k < n; ++k) o[k] = static_cast<float>(src[k]) * a[k] + b[k];
}

}  // namespace data
}  // namespace aimass
