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
  // transpose through a small tile: t[j][c] = acc (+ bias), then each channel's R pixels are one
  // masked gather, + residual, ReLU (max(0, NaN) keeps the NaN, as torch does), one masked store
  alignas(64) float t[kCLPix * kCLRows];
  const __mmask16 k0 = ov >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ov) - 1);
  const __mmask16 k1 = ov >= 32 ? __mmask16(0xFFFF) : ov > 16 ? __mmask16((1u << (ov - 16)) - 1) : 0;
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias) : _mm512_setzero_ps();
  const __m512 b1 = bias ? _mm512_maskz_loadu_ps(k1, bias + 16) : _mm512_setzero_ps();
  for (int64_t j = 0; j < R; ++j) {
    _mm512_store_ps(t + j * kCLRows, bias ? _mm512_add_ps(acc[2 * j], b0) : acc[2 * j]);
    _mm512_store_ps(t + j * kCLRows + 16, bias ? _mm512_add_ps(acc[2 * j + 1], b1) : acc[2 * j + 1]);
  }
  const __mmask16 pm = static_cast<__mmask16>((1u << R) - 1);
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(kCLRows)));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t m = 0; m < ov; ++m) {
    __m512 v = _mm512_mask_i32gather_ps(zero, pm, idx, t + m, 4);
    if (resb) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(pm, resb + m * P));
    if (relu) v = _mm512_max_ps(zero, v);
    _mm512_mask_storeu_ps(yb + m * P, pm, v);
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
