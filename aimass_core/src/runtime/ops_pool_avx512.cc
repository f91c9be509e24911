// AVX-512 max pool row kernels (ops_pool.h).
#include <immintrin.h>

#include <cstdint>

#include "runtime/ops_pool.h"

namespace aimass::runtime::ops::pool {

namespace {
// max(a, b), NaN when either is (vmaxps returns its second operand when either is NaN)
inline __m512 max_nan(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
}
inline __mmask16 first(int64_t n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }
}  // namespace

void vmax_avx512(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t) {
  for (int64_t i = 0; i < W; i += 16) {
    const __mmask16 m = first(W - i);
    __m512 v = _mm512_maskz_loadu_ps(m, rows + i);
    for (int64_t r = 1; r < nrows; ++r) v = max_nan(v, _mm512_maskz_loadu_ps(m, rows + r * ld + i));
    _mm512_mask_storeu_ps(t + i, m, v);
  }
}

void hmax3s2_avx512(const float* t, int64_t OW, float* d) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t o = 0; o < OW; o += 16) {
    const float* p = t + 2 * o;
    const __m512 a = _mm512_loadu_ps(p), b = _mm512_loadu_ps(p + 16);
    const __m512 a2 = _mm512_loadu_ps(p + 2), b2 = _mm512_loadu_ps(p + 18);
    const __m512 e = _mm512_permutex2var_ps(a, ev, b), f = _mm512_permutex2var_ps(a, od, b);
    const __m512 g = _mm512_permutex2var_ps(a2, ev, b2);
    _mm512_mask_storeu_ps(d + o, first(OW - o), max_nan(max_nan(e, f), g));
  }
}

}  // namespace aimass::runtime::ops::pool
