// AVX2 conv tile (ops_conv.h): the 8 x 32 tile as four 4 x 16 sub-tiles (8 ymm
// accumulators each, 16 registers in all with the panel and broadcast operands).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "runtime/ops_conv.h"

namespace aimass::runtime::conv {

namespace {

inline void sub_tile(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid,
                     int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu) {
  // rows a[k * kMR + 0..3], columns b[k * kNR + 0..15]; mvalid <= 4, ncols <= 16 here
  __m256 acc[4][2];
#pragma GCC unroll 4
  for (int m = 0; m < 4; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const __m256 b0 = _mm256_load_ps(b + k * kNR), b1 = _mm256_load_ps(b + k * kNR + 8);
    const float* ak = a + k * kMR;
#pragma GCC unroll 4
    for (int m = 0; m < 4; ++m) {
      const __m256 av = _mm256_broadcast_ss(ak + m);
      acc[m][0] = _mm256_fmadd_ps(av, b0, acc[m][0]);
      acc[m][1] = _mm256_fmadd_ps(av, b1, acc[m][1]);
    }
  }
  const __m256 zero = _mm256_setzero_ps();
  for (int m = 0; m < 4 && m < mvalid; ++m) {
    float* cr = c + m * ldc;
    const float* rr = res ? res + m * ldc : nullptr;
    for (int h = 0; h < 2; ++h) {
      const int64_t j0 = 8 * h;
      if (j0 >= ncols) break;
      __m256 v = acc[m][h];
      if (ncols - j0 >= 8) {
        if (accumulate) v = _mm256_add_ps(_mm256_loadu_ps(cr + j0), v);
        if (bias) v = _mm256_add_ps(v, _mm256_set1_ps(bias[m]));
        if (rr) v = _mm256_add_ps(v, _mm256_loadu_ps(rr + j0));
        if (relu) v = _mm256_max_ps(zero, v);  // NaN stays NaN
        _mm256_storeu_ps(cr + j0, v);
      } else {
        alignas(32) float t[8];
        _mm256_store_ps(t, v);
        for (int64_t j = 0; j < ncols - j0; ++j) {
          float u = t[j];
          if (accumulate) u = cr[j0 + j] + u;
          if (bias) u += bias[m];
          if (rr) u += rr[j0 + j];
          if (relu) u = u < 0.f ? 0.f : u;
          cr[j0 + j] = u;
        }
      }
    }
  }
}

}  // namespace

void tile_avx2(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
               bool accumulate, const float* bias, const float* res, bool relu) {
  static_assert(kMR == 8 && kNR == 32, "the tile is written for 8 x 32");
  for (int64_t mh = 0; mh < 2 && 4 * mh < mvalid; ++mh)
    for (int64_t ch = 0; ch < 2 && 16 * ch < ncols; ++ch)
      sub_tile(kc, a + 4 * mh, b + 16 * ch, c + 4 * mh * ldc + 16 * ch, ldc, mvalid - 4 * mh, ncols - 16 * ch,
               accumulate, bias ? bias + 4 * mh : nullptr, res ? res + 4 * mh * ldc + 16 * ch : nullptr, relu);
}

}  // namespace aimass::runtime::conv
