#include <immintrin.h>

#include "runtime/gemv.h"

namespace aimass::runtime::gemv {

namespace {
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}
}  // namespace

void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, int64_t N, float* y) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k < K16; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k), _mm256_loadu_ps(xr + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(wr + k + 8), _mm256_loadu_ps(xr + k + 8), a1);
      }
      float acc = hsum(_mm256_add_ps(a0, a1));
      for (; k < K; ++k) acc += wr[k] * xr[k];
      y[m * N + n] = acc;
    }
  }
}

}  // namespace aimass::runtime::gemv
