// AVX2 max pool row kernels (ops_pool.h).
#include <immintrin.h>

#include <cstdint>

#include "runtime/ops_pool.h"

namespace aimass::runtime::ops::pool {

namespace {
// max(a, b), NaN when either is (vmaxps returns its second operand when either is NaN)
inline __m256 max_nan(__m256 a, __m256 b) {
  return _mm256_blendv_ps(_mm256_max_ps(a, b), a, _mm256_cmp_ps(a, a, _CMP_UNORD_Q));
}
}  // namespace

void vmax_avx2(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t) {
  int64_t i = 0;
  for (; i + 8 <= W; i += 8) {
    __m256 v = _mm256_loadu_ps(rows + i);
    for (int64_t r = 1; r < nrows; ++r) v = max_nan(v, _mm256_loadu_ps(rows + r * ld + i));
    _mm256_storeu_ps(t + i, v);
  }
  if (i < W) vmax_scalar(rows + i, ld, nrows, W - i, t + i);
}

void hmax3s2_avx2(const float* t, int64_t OW, float* d) {
  int64_t o = 0;
  for (; o + 8 <= OW; o += 8) {
    const float* p = t + 2 * o;
    const __m256 a = _mm256_loadu_ps(p), b = _mm256_loadu_ps(p + 8);
    const __m256 a2 = _mm256_loadu_ps(p + 2), b2 = _mm256_loadu_ps(p + 10);
    // shuffle_ps picks within 128-bit lanes: [a0 a2 b0 b2 | a4 a6 b4 b6] -> 64-bit order 0 2 1 3
    const __m256 e = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    const __m256 f = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a, b, _MM_SHUFFLE(3, 1, 3, 1))), 0xD8));
    const __m256 g = _mm256_castpd_ps(
        _mm256_permute4x64_pd(_mm256_castps_pd(_mm256_shuffle_ps(a2, b2, _MM_SHUFFLE(2, 0, 2, 0))), 0xD8));
    _mm256_storeu_ps(d + o, max_nan(max_nan(e, f), g));
  }
  if (o < OW) hmax3s2_scalar(t + 2 * o, OW - o, d + o);
}

}  // namespace aimass::runtime::ops::pool
