// AVX-512 (F/BW/VL + VNNI) kernels. Weight-only: int8/int4 widened to fp32 and
// FMA'd with fp32 activations, 4 weight rows x up to 4 activation rows per tile.
// Dynamic: vpdpbusd on (qx + 128) as u8 times s8 weights; the +128 is removed
// with precomputed column sums (int32-exact per channel, fp32 per group).
#include <immintrin.h>

// GCC 12 flags its own _mm512_undefined_* helpers inside the reduce intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "qlinear/kernels.h"

namespace aimass::quant::detail {
namespace {

// ---------------------------------------------------------------- weight-only
template <int MR, int NR, bool Grouped, int Bits>
inline void wo_tile(const WeightView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  __m512 acc[MR][NR], ga[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m128i low4 = _mm_set1_epi8(0x0F);
  const __m512i eight = _mm512_set1_epi32(8);
  for (int64_t g = 0; g < w.ngk; ++g) {
    if (Grouped)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) ga[i][j] = _mm512_setzero_ps();
    auto& A = Grouped ? ga : acc;
    const int64_t k0 = g * w.Gk, k1 = k0 + w.Gk;
    if (Bits == 8) {
      for (int64_t k = k0; k < k1; k += 16) {
        __m512 wv[NR];
        for (int j = 0; j < NR; ++j)
          wv[j] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.w8 + (n + j) * w.Kp + k))));
        for (int i = 0; i < MR; ++i) {
          const __m512 xv = _mm512_loadu_ps(x + i * ldx + k);
          for (int j = 0; j < NR; ++j) A[i][j] = _mm512_fmadd_ps(wv[j], xv, A[i][j]);
        }
      }
    } else {
      for (int64_t k = k0; k < k1; k += 32) {
        __m512 wl[NR], wh[NR];
        for (int j = 0; j < NR; ++j) {
          const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w.w4 + (n + j) * (w.Kp / 2) + k / 2));
          const __m128i lo = _mm_and_si128(b, low4), hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4);
          wl[j] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(lo), eight));
          wh[j] = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_cvtepu8_epi32(hi), eight));
        }
        for (int i = 0; i < MR; ++i) {
          const __m512 xl = _mm512_loadu_ps(x + i * ldx + k), xh = _mm512_loadu_ps(x + i * ldx + k + 16);
          for (int j = 0; j < NR; ++j) A[i][j] = _mm512_fmadd_ps(wh[j], xh, _mm512_fmadd_ps(wl[j], xl, A[i][j]));
        }
      }
    }
    if (Grouped)
      for (int j = 0; j < NR; ++j) {
        const __m512 s = _mm512_set1_ps(w.scale[(n + j) * w.ng + g]);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_fmadd_ps(ga[i][j], s, acc[i][j]);
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float r = _mm512_reduce_add_ps(acc[i][j]);
      y[i * ldy + n + j] = Grouped ? r : r * w.scale[n + j];
    }
}

template <int NR, bool Grouped, int Bits>
inline void wo_rows(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n) {
  constexpr int MRmax = Grouped ? 2 : 4;
  int64_t m = 0;
  for (; m + MRmax <= M; m += MRmax) wo_tile<MRmax, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
  switch (M - m) {
    case 3: wo_tile<3, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
    case 2: wo_tile<2, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
    case 1: wo_tile<1, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n); break;
    default: break;
  }
}

template <bool Grouped, int Bits>
void wo_range(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n0,
              int64_t n1) {
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) wo_rows<4, Grouped, Bits>(w, x, ldx, M, y, ldy, n);
  for (; n < n1; ++n) wo_rows<1, Grouped, Bits>(w, x, ldx, M, y, ldy, n);
}

void weight_only_int8(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                      int64_t n0, int64_t n1) {
  if (w.per_channel) wo_range<false, 8>(w, x, ldx, M, y, ldy, n0, n1);
  else wo_range<true, 8>(w, x, ldx, M, y, ldy, n0, n1);
}

void weight_only_int4(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                      int64_t n0, int64_t n1) {
  if (w.per_channel) wo_range<false, 4>(w, x, ldx, M, y, ldy, n0, n1);
  else wo_range<true, 4>(w, x, ldx, M, y, ldy, n0, n1);
}

// ---------------------------------------------------------------- activation quantization
void quant_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int8_t* qx, float* sx) {
  const __m512 zero = _mm512_setzero_ps();
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m128i offset = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* q = qx + m * Kp;
    __m512 amax = zero, poison = zero;
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);
      amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
      poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
    }
    float a = _mm512_reduce_max_ps(amax);
    const float p = _mm512_reduce_add_ps(poison);
    if (p != 0.f || p != p) {
      sx[m] = __builtin_nanf("");
      a = 0.f;
    } else {
      sx[m] = a / 127.f;
    }
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 127.f / a : 0.f);
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1);
      const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);
      __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(v, inv));  // round to nearest even (MXCSR default)
      r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
      const __m128i b = _mm_xor_si128(_mm512_cvtepi32_epi8(r), offset);  // store qx + 128 as u8
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k), b);
    }
  }
}

// ---------------------------------------------------------------- dynamic int8 (VNNI)
template <int MR, int NR>
inline void dyn_tile_channel(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy,
                             int64_t n) {
  __m512i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
  for (int64_t k = 0; k < w.Kp; k += 64) {
    __m512i xv[MR];
    for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512(qx + i * w.Kp + k);
    for (int j = 0; j < NR; ++j) {
      const __m512i wv = _mm512_loadu_si512(w.wq + (n + j) * w.Kp + k);
      for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[i][j]) - 128 * w.colsum[n + j];
      y[i * ldy + n + j] = (static_cast<float>(dot) * w.scale[n + j]) * sx[i];
    }
}

template <int MR, int NR>
inline void dyn_tile_group(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy,
                           int64_t n) {
  __m512 facc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) facc[i][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.ng; ++g) {
    __m512i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = g * w.G; k < (g + 1) * w.G; k += 64) {
      __m512i xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm512_loadu_si512(qx + i * w.Kp + k);
      for (int j = 0; j < NR; ++j) {
        const __m512i wv = _mm512_loadu_si512(w.wq + (n + j) * w.Kp + k);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], xv[i], wv);
      }
    }
    for (int j = 0; j < NR; ++j) {
      const __m512 s = _mm512_set1_ps(w.scale[(n + j) * w.ng + g]);
      for (int i = 0; i < MR; ++i) facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, facc[i][j]);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + n + j] = (_mm512_reduce_add_ps(facc[i][j]) - w.corr[n + j]) * sx[i];
}

template <int MR, int NR, bool Grouped>
inline void dyn_tile(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy, int64_t n) {
  if (Grouped) dyn_tile_group<MR, NR>(w, qx, sx, y, ldy, n);
  else dyn_tile_channel<MR, NR>(w, qx, sx, y, ldy, n);
}

template <int NR, bool Grouped>
inline void dyn_rows(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
                     int64_t n) {
  constexpr int MRmax = Grouped ? 2 : 4;
  int64_t m = 0;
  for (; m + MRmax <= M; m += MRmax) dyn_tile<MRmax, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
  switch (M - m) {
    case 3: dyn_tile<3, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n); break;
    case 2: dyn_tile<2, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n); break;
    case 1: dyn_tile<1, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n); break;
    default: break;
  }
}

template <bool Grouped>
void dyn_range(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
  // Block over M so a block of quantized activations stays in L2 while 4 weight rows sweep it.
  constexpr int64_t kMBlock = 128;
  for (int64_t mb = 0; mb < M; mb += kMBlock) {
    const int64_t mlen = M - mb < kMBlock ? M - mb : kMBlock;
    const int8_t* q = qx + mb * w.Kp;
    float* yb = y + mb * ldy;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) dyn_rows<4, Grouped>(w, q, sx + mb, mlen, yb, ldy, n);
    for (; n < n1; ++n) dyn_rows<1, Grouped>(w, q, sx + mb, mlen, yb, ldy, n);
  }
}

void dynamic(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy, int64_t n0,
             int64_t n1) {
  if (w.per_channel) dyn_range<false>(w, qx, sx, M, y, ldy, n0, n1);
  else dyn_range<true>(w, qx, sx, M, y, ldy, n0, n1);
}

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable t{weight_only_int8, weight_only_int4, quant_rows, dynamic, 16, 32};
  return t;
}

}  // namespace aimass::quant::detail
