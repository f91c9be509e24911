// AVX-512 kernels (F/BW/VL); must match quantize_scalar.cc bit for bit.
// vpmovdb truncates int32 -> int8 lanes, which is the "low byte" the scalar
// reference stores, so one code path serves int8 and uint8 outputs.
// GCC 12's avx512fintrin.h fills "undefined" source operands with self-initialised
// variables, which -Wall reports; the warnings are about the header, not this code.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <cmath>

#include "quant/quantize_kernels.h"

namespace aimass {
namespace quant {
namespace detail {

MinMax minmax_avx512(const float* x, int64_t n) {
  __m512 mn0 = _mm512_set1_ps(INFINITY), mn1 = mn0, mx0 = _mm512_set1_ps(-INFINITY), mx1 = mx0;
  __mmask16 bad = 0;
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512 a = _mm512_loadu_ps(x + j), b = _mm512_loadu_ps(x + j + 16);
    bad |= _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q) | _mm512_cmp_ps_mask(b, b, _CMP_UNORD_Q);
    mn0 = _mm512_min_ps(mn0, a);
    mx0 = _mm512_max_ps(mx0, a);
    mn1 = _mm512_min_ps(mn1, b);
    mx1 = _mm512_max_ps(mx1, b);
  }
  const MinMax tail = minmax_scalar(x + j, n - j);
  // horizontal reduce through memory (GCC 12's _mm512_reduce_* trips -Wuninitialized)
  alignas(64) float lo[16], hi[16];
  _mm512_store_ps(lo, _mm512_min_ps(mn0, mn1));
  _mm512_store_ps(hi, _mm512_max_ps(mx0, mx1));
  float mn = INFINITY, mx = -INFINITY;
  for (int k = 0; k < 16; ++k) {
    mn = lo[k] < mn ? lo[k] : mn;
    mx = hi[k] > mx ? hi[k] : mx;
  }
  mn = tail.min < mn ? tail.min : mn;
  mx = tail.max > mx ? tail.max : mx;
  const bool finite = bad == 0 && tail.finite && (n == 0 || (mn > -INFINITY && mx < INFINITY));
  return {mn, mx, finite};
}

namespace {
inline __m512i quant16(__m512 v, __m512 vs, __m512 vz, __m512 vmin, __m512 vmax) {
  __m512 r = _mm512_roundscale_ps(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  r = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(r, vz), vmin), vmax);
  return _mm512_cvtps_epi32(r);
}
}  // namespace

void quantize_run_avx512(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                         int8_t* q) {
  const __m512 vs = _mm512_set1_ps(scale), vz = _mm512_set1_ps(static_cast<float>(zp));
  const __m512 vmin = _mm512_set1_ps(static_cast<float>(qmin)), vmax = _mm512_set1_ps(static_cast<float>(qmax));
  int64_t j = 0;
  for (; j + 32 <= n; j += 32) {
    const __m512i a = quant16(_mm512_loadu_ps(x + j), vs, vz, vmin, vmax);
    const __m512i b = quant16(_mm512_loadu_ps(x + j + 16), vs, vz, vmin, vmax);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j), _mm512_cvtepi32_epi8(a));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + j + 16), _mm512_cvtepi32_epi8(b));
  }
  if (j < n) {  // masked tail: lanes past n are neither read nor written
    for (; j < n; j += 16) {
      const int64_t left = n - j;
      const __mmask16 m = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1u);
      const __m512 v = _mm512_maskz_loadu_ps(m, x + j);
      _mm512_mask_cvtepi32_storeu_epi8(q + j, m, quant16(v, vs, vz, vmin, vmax));
    }
  }
}

void dequantize_run_avx512(const int8_t* q, int64_t n, bool is_unsigned, float scale, int32_t zp, float* out) {
  const __m512 vs = _mm512_set1_ps(scale);
  const __m512i vz = _mm512_set1_epi32(zp);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + j));
    const __m512i w = is_unsigned ? _mm512_cvtepu8_epi32(b) : _mm512_cvtepi8_epi32(b);
    _mm512_storeu_ps(out + j, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(w, vz)), vs));
  }
  dequantize_run_scalar(q + j, n - j, is_unsigned, scale, zp, out + j);
}

// Nibble (un)packing is a shuffle-bound byte kernel where AVX2 already saturates
// memory bandwidth; the AVX-512 level reuses it.
void pack_nibbles_avx512(const int8_t* q, int64_t n, uint8_t* out) { pack_nibbles_avx2(q, n, out); }
void unpack_nibbles_avx512(const uint8_t* in, int64_t n, bool is_signed, int8_t* q) {
  unpack_nibbles_avx2(in, n, is_signed, q);
}

void widen_to_f32_avx512(const uint16_t* in, int64_t n, bool is_bf16, float* out) {
  int64_t j = 0;
  if (is_bf16) {
    for (; j + 16 <= n; j += 16) {
      const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j));
      _mm512_storeu_ps(out + j, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16)));
    }
  } else {
    for (; j + 16 <= n; j += 16)
      _mm512_storeu_ps(out + j, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(in + j))));
  }
  widen_to_f32_scalar(in + j, n - j, is_bf16, out + j);
}

}  // namespace detail
}  // namespace quant
}  // namespace aimass
