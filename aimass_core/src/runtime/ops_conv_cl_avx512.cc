// AVX-512 CL tile (ops_conv.h "1x1 convs on small planes"): R pixels x 32 output channels in
// 2R zmm accumulators, all taps summed in registers (tile_cl_scalar in ops_conv_cl.cc is the reference).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // _mm512_castps256_ps512 leaves the upper half undefined
#include <immintrin.h>

#include <cstdint>

#include "runtime/ops_conv.h"

namespace aimass::runtime::conv {

namespace {

// acc[2j + h] (pixel j, channels 16h..16h+15) = sum over the taps of w x x, in tap order. Tap k of
// pixel j is xb[k * HW + j]: one broadcast feeds two FMAs; tap k's 32 channels are one aligned line
// pair at wb + k * kCLRows.
template <int R>
inline void cl_core(const float* wb, int64_t Kc, const float* xb, int64_t HW, __m512 (&acc)[2 * kCLPix]) {
#pragma GCC unroll 24
  for (int j = 0; j < 2 * R; ++j) acc[j] = _mm512_setzero_ps();
  constexpr int64_t kPfW = 8;  // taps ahead (2 KiB) in the weight stream
  const float* xk = xb;
  for (int64_t k = 0; k < Kc; ++k, xk += HW) {
    const float* ak = wb + k * kCLRows;
    _mm_prefetch(reinterpret_cast<const char*>(ak + kPfW * kCLRows), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(ak + kPfW * kCLRows + 16), _MM_HINT_T0);
    const __m512 lo = _mm512_load_ps(ak), hi = _mm512_load_ps(ak + 16);
#pragma GCC unroll 12
    for (int j = 0; j < R; ++j) {
      const __m512 xv = _mm512_set1_ps(xk[j]);
      acc[2 * j] = _mm512_fmadd_ps(lo, xv, acc[2 * j]);
      acc[2 * j + 1] = _mm512_fmadd_ps(hi, xv, acc[2 * j + 1]);
    }
  }
}

// r[i][j] -> r[j][i] for a 16 x 16 block: unpack pairs of rows, then pairs of pairs, then 128-bit
// lanes (after the second step u[4g + q] holds, in lane L, rows 4g..4g+3 of column 4L + q).
inline void transpose16(__m512 (&r)[16]) {
  __m512 t[16], u[16];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
  }
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512d a = _mm512_castps_pd(t[4 * g]), b = _mm512_castps_pd(t[4 * g + 1]);
    const __m512d c = _mm512_castps_pd(t[4 * g + 2]), d = _mm512_castps_pd(t[4 * g + 3]);
    u[4 * g] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
    u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
    u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
    u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
  }
#pragma GCC unroll 4
  for (int q = 0; q < 4; ++q) {
    const __m512 v = _mm512_shuffle_f32x4(u[q], u[4 + q], 0x88), w = _mm512_shuffle_f32x4(u[q], u[4 + q], 0xdd);
    const __m512 v2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0x88);
    const __m512 w2 = _mm512_shuffle_f32x4(u[8 + q], u[12 + q], 0xdd);
    r[q] = _mm512_shuffle_f32x4(v, v2, 0x88);
    r[4 + q] = _mm512_shuffle_f32x4(w, w2, 0x88);
    r[8 + q] = _mm512_shuffle_f32x4(v, v2, 0xdd);
    r[12 + q] = _mm512_shuffle_f32x4(w, w2, 0xdd);
  }
}

}  // namespace

void tile_cl_avx512(const float* wb, int64_t Kc, const float* bias, const float* xb, int64_t HW, int64_t R, float* yb,
                    int64_t P, int64_t ov, const float* resb, bool relu) {
  __m512 acc[2 * kCLPix];
  switch (R) {
#define AIMASS_CL_CASE(r) \
  case r:                 \
    cl_core<r>(wb, Kc, xb, HW, acc); \
    break;
    AIMASS_CL_CASE(1) AIMASS_CL_CASE(2) AIMASS_CL_CASE(3) AIMASS_CL_CASE(4) AIMASS_CL_CASE(5) AIMASS_CL_CASE(6)
    AIMASS_CL_CASE(7) AIMASS_CL_CASE(8) AIMASS_CL_CASE(9) AIMASS_CL_CASE(10) AIMASS_CL_CASE(11) AIMASS_CL_CASE(12)
#undef AIMASS_CL_CASE
    default:
      return;
  }
  // Transpose each 16-channel half in registers (rows: pixels, zero past R) so every channel's R
  // pixels are one vector: + residual, ReLU (max(0, NaN) keeps the NaN, as torch does), one masked
  // store per channel row. (Gathers from a stored tile took 18% of a 256-tap tile's time.)
  const __mmask16 pm = static_cast<__mmask16>((1u << R) - 1);
  const __m512 zero = _mm512_setzero_ps();
  for (int h = 0; h < 2 && 16 * h < ov; ++h) {
    const int64_t mv = ov - 16 * h < 16 ? ov - 16 * h : 16;
    const __mmask16 km = static_cast<__mmask16>(mv >= 16 ? 0xFFFF : (1u << mv) - 1);
    const __m512 bv = bias ? _mm512_maskz_loadu_ps(km, bias + 16 * h) : zero;
    __m512 r[16];
#pragma GCC unroll 16
    for (int j = 0; j < 16; ++j) r[j] = j < R ? _mm512_add_ps(acc[2 * j + h], bv) : zero;
    transpose16(r);
    for (int64_t m = 0; m < mv; ++m) {
      const int64_t row = (16 * h + m) * P;
      __m512 v = r[m];
      if (resb) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(pm, resb + row));
      if (relu) v = _mm512_max_ps(zero, v);
      _mm512_mask_storeu_ps(yb + row, pm, v);
    }
  }
}

void decimate_row_avx512(const float* src, int64_t SW, int64_t OW, float* dst) {
  if (SW != 2) {
    decimate_row_scalar(src, SW, OW, dst);
    return;
  }
  // 16 outputs from 32 inputs: two masked loads (elements < 2 OW - 1 only: nothing past the last
  // tap is read) and one permute
  const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const int64_t n_in = 2 * OW - 1;
  for (int64_t j = 0; j < OW; j += 16) {
    const int64_t e = 2 * j, left = n_in - e;  // input elements readable from src + e
    const __mmask16 m0 = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
    const __mmask16 m1 = left >= 32 ? __mmask16(0xFFFF) : left > 16 ? __mmask16((1u << (left - 16)) - 1) : 0;
    const __m512 a = _mm512_maskz_loadu_ps(m0, src + e), b = _mm512_maskz_loadu_ps(m1, src + e + 16);
    const int64_t nout = OW - j < 16 ? OW - j : 16;
    const __mmask16 mo = nout >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << nout) - 1);
    _mm512_mask_storeu_ps(dst + j, mo, _mm512_permutex2var_ps(a, idx, b));
  }
}

}  // namespace aimass::runtime::conv
