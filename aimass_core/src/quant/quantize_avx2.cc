// AVX2 kernels; must match quantize_scalar.cc bit for bit. Division and
// round-to-nearest-even are exact IEEE operations in both, so they do.
#include <immintrin.h>

#include <cmath>

#include "quant/quantize_kernels.h"

namespace aimass {
namespace quant {
namespace detail {

MinMax minmax_avx2(const float* x, int64_t n) {
  __m256 mn0 = _mm256_set1_ps(INFINITY), mn1 = mn0, mx0 = _mm256_set1_ps(-INFINITY), mx1 = mx0;
  __m256 bad = _mm256_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + 8);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(a, a, _CMP_UNORD_Q), _mm256_cmp_ps(b, b, _CMP_UNORD_Q)));
    mn0 = _mm256_min_ps(mn0, a);
    mx0 = _mm256_max_ps(mx0, a);
    mn1 = _mm256_min_ps(mn1, b);
    mx1 = _mm256_max_ps(mx1, b);
  }
  mn0 = _mm256_min_ps(mn0, mn1);
  mx0 = _mm256_max_ps(mx0, mx1);
  alignas(32) float lo[8], hi[8];
  _mm256_store_ps(lo, mn0);
  _mm256_store_ps(hi, mx0);
  MinMax tail = minmax_scalar(x + j, n - j);
  float mn = tail.min, mx = tail.max;
  for (int k = 0; k < 8; ++k) {
    mn = lo[k] < mn ? lo[k] : mn;
    mx = hi[k] > mx ? hi[k] : mx;
  }
  // NaN: the unordered self-compare (or the scalar tail); Inf shows up in min/max
  const bool finite = _mm256_movemask_ps(bad) == 0 && tail.finite && (n == 0 || (mn > -INFINITY && mx < INFINITY));
  return {mn, mx, finite};
}

namespace {
// 32 fp32 lanes -> 32 int8 lanes (low byte of each int32; values are within -127..255)
inline __m256i narrow_to_bytes(__m256i a, __m256i b, __m256i c, __m256i d, bool is_unsigned) {
  const __m256i ab = _mm256_packs_epi32(a, b), cd = _mm256_packs_epi32(c, d);  // exact: |v| <= 255
  const __m256i r = is_unsigned ? _mm256_packus_epi16(ab, cd) : _mm256_packs_epi16(ab, cd);
  return _mm256_permutevar8x32_epi32(r, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
}
inline __m256i quant8(const float* x, __m256 vs, __m256 vz, __m256 vmin, __m256 vmax) {
  __m256 r = _mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x), vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm256_add_ps(r, vz);
  r = _mm256_min_ps(_mm256_max_ps(r, vmin), vmax);
  return _mm256_cvtps_epi32(r);
}
}  // namespace

void quantize_run_avx2(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax, int8_t* q) {
  const __m256 vs = _mm256_set1_ps(scale), vz = _mm256_set1_ps(static_cast<float>(zp));
  const __m256 vmin = _mm256_set1_ps(static_cast<float>(qmin)), vmax = _mm256_set1_ps(static_cast<float>(qmax));
  const bool is_unsigned = qmin >= 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m256i a = quant8(x + j, vs, vz, vmin, vmax), b = quant8(x + j + 8, vs, vz, vmin, vmax);
    const __m256i c = quant8(x + j + 16, vs, vz, vmin, vmax), d = quant8(x + j + 24, vs, vz, vmin, vmax);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), narrow_to_bytes(a, b, c, d, is_unsigned));
  }
  quantize_run_scalar(x + j, n - j, scale, zp, qmin, qmax, q + j);
}

void dequantize_run_avx2(const int8_t* q, int64_t n, bool is_unsigned, float scale, int32_t zp, float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  const __m256i vz = _mm256_set1_epi32(zp);
  int64_t j = 0;
  for (; j + 8 <= n; j += 8) {
    const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j));
    const __m256i w = is_unsigned ? _mm256_cvtepu8_epi32(b) : _mm256_cvtepi8_epi32(b);
    _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(w, vz)), vs));
  }
  dequantize_run_scalar(q + j, n - j, is_unsigned, scale, zp, out + j);
}

void pack_nibbles_avx2(const int8_t* q, int64_t n, uint8_t* out) {
  const __m256i lo_mask = _mm256_set1_epi16(0x000F), hi_mask = _mm256_set1_epi16(0x00F0);
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    // each 16-bit lane holds (even, odd): byte = (even & 0xF) | (odd & 0xF) << 4
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j));
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j + 32));
    const __m256i pa = _mm256_or_si256(_mm256_and_si256(a, lo_mask), _mm256_and_si256(_mm256_srli_epi16(a, 4), hi_mask));
    const __m256i pb = _mm256_or_si256(_mm256_and_si256(b, lo_mask), _mm256_and_si256(_mm256_srli_epi16(b, 4), hi_mask));
    const __m256i r = _mm256_permute4x64_epi64(_mm256_packus_epi16(pa, pb), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + j / 2), r);
  }
  pack_nibbles_scalar(q + j, n - j, out + j / 2);
}

void unpack_nibbles_avx2(const uint8_t* in, int64_t n, bool is_signed, int8_t* q) {
  const __m256i mask = _mm256_set1_epi8(0x0F), eight = _mm256_set1_epi8(8);
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j / 2));
    __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
    if (is_signed) {
      lo = _mm256_sub_epi8(_mm256_xor_si256(lo, eight), eight);
      hi = _mm256_sub_epi8(_mm256_xor_si256(hi, eight), eight);
    }
    // interleave per 128-bit lane, then put the lanes in order
    const __m256i x0 = _mm256_unpacklo_epi8(lo, hi), x1 = _mm256_unpackhi_epi8(lo, hi);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j), _mm256_permute2x128_si256(x0, x1, 0x20));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + j + 32), _mm256_permute2x128_si256(x0, x1, 0x31));
  }
  unpack_nibbles_scalar(in + j / 2, n - j, is_signed, q + j);
}

void widen_to_f32_avx2(const uint16_t* in, int64_t n, bool is_bf16, float* out) {
  int64_t j = 0;
  if (is_bf16) {
    for (; j + 8 <= n; j += 8) {  // bf16 is the high half of an fp32
      const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j));
      _mm256_storeu_ps(out + j, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16)));
    }
  } else {
    for (; j + 8 <= n; j += 8)  // F16C: exact, subnormals included
      _mm256_storeu_ps(out + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(in + j))));
  }
  widen_to_f32_scalar(in + j, n - j, is_bf16, out + j);
}

}  // namespace detail
}  // namespace quant
}  // namespace aimass
