// Max pool row kernels (ResNet's 3x3/2 pad 1 stem pool): the runtime's max_pool2d (ops.cc)
// reduces each output row's in-image input rows into one row padded with -inf (`t`), then
// the max over each window's 3 columns at stride 2. These are the two passes, per SIMD level;
// the scalar ones are the reference (max is exact: every level gives identical results).
// NaN propagates as torch's max pool does: a NaN anywhere in a window makes its output NaN.
// Raw pointers only in the SIMD translation units.
#pragma once
#include <cstdint>

#include "aimass/cpu_features.h"

namespace aimass::runtime::ops::pool {

// t[i] = max over r < nrows of rows[r][i], i < W (nrows >= 1; rows[r] are W floats apart by `ld`).
// d[ow] = max(t[2ow], t[2ow + 1], t[2ow + 2]) for ow < OW; t holds at least 2 * OW + 1 floats,
// readable (any values, never used for a stored output) up to 2 * OW + 48 floats.
struct RowFns {
  void (*vmax)(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t);
  void (*hmax3s2)(const float* t, int64_t OW, float* d);
};
// Floats of padding a `t` row needs past 2 * OW + 1 for every level's hmax3s2.
constexpr int64_t kRowSlack = 48;

void vmax_scalar(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t);
void hmax3s2_scalar(const float* t, int64_t OW, float* d);
void vmax_avx2(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t);
void hmax3s2_avx2(const float* t, int64_t OW, float* d);
void vmax_avx512(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t);
void hmax3s2_avx512(const float* t, int64_t OW, float* d);

inline RowFns row_fns(SimdLevel lvl) {
  if (lvl >= SimdLevel::AVX512) return {vmax_avx512, hmax3s2_avx512};
  if (lvl >= SimdLevel::AVX2) return {vmax_avx2, hmax3s2_avx2};
  return {vmax_scalar, hmax3s2_scalar};
}

}  // namespace aimass::runtime::ops::pool
