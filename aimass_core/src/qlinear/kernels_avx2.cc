// AVX2/FMA kernels. Weight-only: int8/int4 widened to fp32 and FMA'd with fp32
// activations. Dynamic: s8*s8 via _mm256_sign_epi8 + _mm256_maddubs_epi16 +
// _mm256_madd_epi16 (|x| as u8 times sign-adjusted w; both in [-127, 127] so a
// pair sum is at most 2*127*127 = 32258 and int16 never saturates).
#include <immintrin.h>

#include <algorithm>

// GCC 12 flags its own _mm512_undefined_* helpers inside the reduce intrinsics.
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "qlinear/kernels.h"

namespace aimass::quant::detail {
namespace {

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline int32_t hsum_i32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

inline float hmax(__m256 v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  s = _mm_max_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// ---------------------------------------------------------------- weight-only
template <int MR, int NR, bool Grouped, int Bits>
inline void wo_tile(const WeightView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  __m256 acc[MR][NR], ga[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_ps();
  for (int64_t g = 0; g < w.ngk; ++g) {
    if (Grouped)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) ga[i][j] = _mm256_setzero_ps();
    auto& A = Grouped ? ga : acc;
    const int64_t k0 = g * w.Gk, k1 = k0 + w.Gk;
    if (Bits == 8) {
      for (int64_t k = k0; k < k1; k += 8) {
        __m256 wv[NR];
        for (int j = 0; j < NR; ++j)
          wv[j] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(
              _mm_loadl_epi64(reinterpret_cast<const __m128i*>(w.w8 + (n + j) * w.Kp + k))));
        for (int i = 0; i < MR; ++i) {
          const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);
          for (int j = 0; j < NR; ++j) A[i][j] = _mm256_fmadd_ps(wv[j], xv, A[i][j]);
        }
      }
    } else {
      // 128 elements per row per step: two 256-bit halves (dwords 0-7, 8-15) of the block;
      // nibble v of each dword, masked and converted, is 8 consecutive elements.
      const __m256i low4 = _mm256_set1_epi32(0x0F);
      const __m256 eight = _mm256_set1_ps(8.f);
      for (int64_t k = k0; k < k1; k += 128) {
        for (int j = 0; j < NR; ++j) {
          const uint8_t* blk = w.w4 + (n + j) * (w.Kp / 2) + k / 2;
          const __m256i h0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk));
          const __m256i h1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 32));
          for (int v = 0; v < 8; ++v) {
            const __m256 w0 = _mm256_sub_ps(
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(h0, 4 * v), low4)), eight);
            const __m256 w1 = _mm256_sub_ps(
                _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(h1, 4 * v), low4)), eight);
            for (int i = 0; i < MR; ++i) {
              const float* xr = x + i * ldx + k + 16 * v;
              A[i][j] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xr + 8), _mm256_fmadd_ps(w0, _mm256_loadu_ps(xr), A[i][j]));
            }
          }
        }
      }
    }
    if (Grouped)
      for (int j = 0; j < NR; ++j) {
        const __m256 s = _mm256_set1_ps(w.scale[(n + j) * w.ng + g]);
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_fmadd_ps(ga[i][j], s, acc[i][j]);
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const float r = hsum(acc[i][j]);
      y[i * ldy + n + j] = Grouped ? r : r * w.scale[n + j];
    }
}

template <int NR, bool Grouped, int Bits>
inline void wo_rows(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy, int64_t n) {
  constexpr int MRmax = Grouped ? 1 : 2;
  int64_t m = 0;
  for (; m + MRmax <= M; m += MRmax) wo_tile<MRmax, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
  if (M - m == 1) wo_tile<1, NR, Grouped, Bits>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
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
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* q = qx + m * Kp;
    __m256 amax = zero, poison = zero;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v, absmask));
      poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
    }
    float a = hmax(amax), p = hsum(poison);
    for (; k < K; ++k) {
      const float av = xr[k] < 0 ? -xr[k] : xr[k];
      a = a > av ? a : av;
      p += xr[k] * 0.f;
    }
    if (p != 0.f || p != p) {
      sx[m] = __builtin_nanf("");
      a = 0.f;
    } else {
      sx[m] = a / 127.f;
    }
    const float invs = a > 0.f ? 127.f / a : 0.f;
    const __m256 inv = _mm256_set1_ps(invs);
    k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv));  // nearest even
      r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
      const __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(p16, p16));
    }
    for (; k < K; ++k) {
      int r = _mm_cvtss_si32(_mm_set_ss(xr[k] * invs));
      r = r < -127 ? -127 : (r > 127 ? 127 : r);
      q[k] = static_cast<int8_t>(r);
    }
    for (; k < Kp; ++k) q[k] = 0;
  }
}

// ---------------------------------------------------------------- dynamic int8 (sign trick)
inline __m256i dot_s8(__m256i acc, __m256i ax, __m256i xv, __m256i wv, __m256i ones) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(wv, xv)), ones));
}

// 2x4 per-channel tile with named accumulators (arrays made GCC spill them every step).
inline void dyn_tile_channel_2x4(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy,
                                 int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i c00 = _mm256_setzero_si256(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00, c13 = c00;
  const int64_t Kp = w.Kp;
  const int8_t *x0 = qx, *x1 = qx + Kp;
  const int8_t *w0 = w.wq + n * Kp, *w1 = w0 + Kp, *w2 = w1 + Kp, *w3 = w2 + Kp;
  for (int64_t k = 0; k < Kp; k += 32) {
    const __m256i a0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x0 + k));
    const __m256i a1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x1 + k));
    const __m256i u0 = _mm256_abs_epi8(a0), u1 = _mm256_abs_epi8(a1);
    __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w0 + k));
    c00 = dot_s8(c00, u0, a0, b, ones);
    c10 = dot_s8(c10, u1, a1, b, ones);
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w1 + k));
    c01 = dot_s8(c01, u0, a0, b, ones);
    c11 = dot_s8(c11, u1, a1, b, ones);
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w2 + k));
    c02 = dot_s8(c02, u0, a0, b, ones);
    c12 = dot_s8(c12, u1, a1, b, ones);
    b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w3 + k));
    c03 = dot_s8(c03, u0, a0, b, ones);
    c13 = dot_s8(c13, u1, a1, b, ones);
  }
  const __m256i acc[2][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}};
  for (int i = 0; i < 2; ++i)
    for (int j = 0; j < 4; ++j)
      y[i * ldy + n + j] = (static_cast<float>(hsum_i32(acc[i][j])) * w.scale[n + j]) * sx[i];
}

template <int MR, int NR, bool Grouped>
inline void dyn_tile(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy, int64_t n) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 facc[MR][NR];
  __m256i acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      facc[i][j] = _mm256_setzero_ps();
      acc[i][j] = _mm256_setzero_si256();
    }
  const int64_t gl = Grouped ? w.G : w.Kp, ng = Grouped ? w.ng : 1;
  for (int64_t g = 0; g < ng; ++g) {
    if (Grouped)
      for (int i = 0; i < MR; ++i)
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int64_t k = g * gl; k < (g + 1) * gl; k += 32) {
      __m256i xv[MR], ax[MR];
      for (int i = 0; i < MR; ++i) {
        xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qx + i * w.Kp + k));
        ax[i] = _mm256_abs_epi8(xv[i]);
      }
      for (int j = 0; j < NR; ++j) {
        const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.wq + (n + j) * w.Kp + k));
        for (int i = 0; i < MR; ++i) acc[i][j] = dot_s8(acc[i][j], ax[i], xv[i], wv, ones);
      }
    }
    if (Grouped)
      for (int j = 0; j < NR; ++j) {
        const __m256 s = _mm256_set1_ps(w.scale[(n + j) * w.ng + g]);
        for (int i = 0; i < MR; ++i) facc[i][j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[i][j]), s, facc[i][j]);
      }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      if (Grouped) y[i * ldy + n + j] = hsum(facc[i][j]) * sx[i];
      else y[i * ldy + n + j] = (static_cast<float>(hsum_i32(acc[i][j])) * w.scale[n + j]) * sx[i];
    }
}

template <int NR, bool Grouped>
inline void dyn_rows(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
                     int64_t n) {
  constexpr int MRmax = Grouped ? 1 : 2;
  int64_t m = 0;
  for (; m + MRmax <= M; m += MRmax) {
    if (!Grouped && NR == 4) dyn_tile_channel_2x4(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
    else dyn_tile<MRmax, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
  }
  if (M - m == 1) dyn_tile<1, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
}

template <bool Grouped>
void dyn_range(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy, int64_t n0,
               int64_t n1) {
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

// ---------------------------------------------------------------- weight-only int8, int16 activations
// vpmaddwd on int16 q x int16-widened weights: pair sums <= 2 * 32767 * 127, exact in int32.
// A lane gathers 2 products per 16 k, so K is walked in chunks of 2048 (<= 1.07e9 per
// lane) and each chunk's lanes are summed into an int64 total.
void quant_rows16(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  const __m256 zero = _mm256_setzero_ps();
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256i lo = _mm256_set1_epi32(-32767), hi = _mm256_set1_epi32(32767);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int16_t* q = static_cast<int16_t*>(qa) + m * Kp;
    __m256 amax = zero, poison = zero;
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      const __m256 v = _mm256_loadu_ps(xr + k);
      amax = _mm256_max_ps(amax, _mm256_and_ps(v, absmask));
      poison = _mm256_add_ps(poison, _mm256_mul_ps(v, zero));
    }
    float a = hmax(amax), p = hsum(poison);
    for (; k < K; ++k) {
      const float av = xr[k] < 0 ? -xr[k] : xr[k];
      a = a > av ? a : av;
      p += xr[k] * 0.f;
    }
    if (p != 0.f || p != p) {
      sx[m] = __builtin_nanf("");
      a = 0.f;
    } else {
      sx[m] = a / 32767.f;
    }
    const float invs = a > 0.f ? 32767.f / a : 0.f;
    const __m256 inv = _mm256_set1_ps(invs);
    k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(xr + k), inv));  // nearest even
      r = _mm256_min_epi32(_mm256_max_epi32(r, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + k),
                       _mm_packs_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
    }
    for (; k < K; ++k) {
      int r = _mm_cvtss_si32(_mm_set_ss(xr[k] * invs));
      r = r < -32767 ? -32767 : (r > 32767 ? 32767 : r);
      q[k] = static_cast<int16_t>(r);
    }
    for (; k < Kp; ++k) q[k] = 0;
  }
}

inline int64_t hsum_i64(__m256i v) {
  const __m256i s = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(v)),
                                     _mm256_cvtepi32_epi64(_mm256_extracti128_si256(v, 1)));
  const __m128i t = _mm_add_epi64(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  return _mm_cvtsi128_si64(t) + _mm_extract_epi64(t, 1);
}

template <int MR, int NR>
inline void wo16_tile(const WeightView& w, const int16_t* q, const float* sx, float* y, int64_t ldy, int64_t n) {
  constexpr int64_t kChunk = 2048;
  const int64_t Kp = w.Kp;
  const int8_t* wr = w.w8 + n * Kp;
  int64_t tot[MR][NR] = {};
  for (int64_t k0 = 0; k0 < Kp; k0 += kChunk) {
    const int64_t k1 = Kp - k0 < kChunk ? Kp : k0 + kChunk;
    __m256i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm256_setzero_si256();
    for (int64_t k = k0; k < k1; k += 16) {
      __m256i xv[MR];
      for (int i = 0; i < MR; ++i) xv[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + i * Kp + k));
      for (int j = 0; j < NR; ++j) {
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wr + j * Kp + k)));
        for (int i = 0; i < MR; ++i) acc[i][j] = _mm256_add_epi32(acc[i][j], _mm256_madd_epi16(xv[i], wv));
      }
    }
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) tot[i][j] += hsum_i64(acc[i][j]);
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j)
      y[i * ldy + n + j] =
          static_cast<float>(static_cast<double>(tot[i][j]) * static_cast<double>(sx[i] * w.scale[n + j]));
}

template <int MR, int NR>
inline void wo16_cols(const WeightView& w, const int16_t* q, const float* sx, float* y, int64_t ldy, int64_t n0,
                      int64_t n1) {
  int64_t n = n0;
  for (; n + NR <= n1; n += NR) wo16_tile<MR, NR>(w, q, sx, y, ldy, n);
  for (; n < n1; ++n) wo16_tile<MR, 1>(w, q, sx, y, ldy, n);
}

void weight_only_int8_a16(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  const int16_t* q = static_cast<const int16_t*>(qa);
  // 16 ymm: MR * NR accumulators + MR activations + 1 weight.
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) wo16_cols<2, 4>(w, q + m * w.Kp, sx + m, y + m * ldy, ldy, n0, n1);
  if (m < M) wo16_cols<1, 4>(w, q + m * w.Kp, sx + m, y + m * ldy, ldy, n0, n1);
}

// ---------------------------------------------------------------- weight-only int4, int16 activations
// The AVX-512 kernel's column panels (kernels.h: int4_panel_*) and x layout, a 64-byte
// panel line as two registers of 8 columns. vpdpbusd is emulated exactly: vpmaddubsw pair
// sums (low plane u8 x u <= 2 * 255 * 15, u x high plane s8 <= 2 * 15 * 128; the two nibble
// halves added stay < 2^15), then vpmaddwd with 1 for the low plane and 256 for the high
// plane into one int32 accumulator per 8 columns (a chunk's dot stays below 2^26). Same
// integers, same chunk order: the scalar reference's bits.
void quant_rows16_int4(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  const __m256i byte = _mm256_set1_epi16(0xFF), ones = _mm256_set1_epi16(1);
  for (int64_t m = 0; m < M; ++m) {
    uint8_t* row = static_cast<uint8_t*>(qa) + m * int4_a16_row_bytes(Kp);
    // the corrections go to [2Kp, ...) once q (which lies there too) is read
    int32_t corr[65536 / 128];
    // int16 q into the row's last 2 * Kp bytes ([Kp, 3Kp)); the planes are written from the
    // front, each 32-element step reading q before the hi plane ([Kp, 2Kp)) overwrites it:
    // plane bytes [Kp + k, Kp + k + 32) lie below q's bytes [Kp + 2k, ...) of later steps.
    const int16_t* q = reinterpret_cast<const int16_t*>(row + Kp);
    quant_rows16(x + m * ldx, ldx, 1, K, Kp, row + Kp, sx + m);
    for (int64_t k0 = 0; k0 < Kp; k0 += 128) {
      __m256i sum = _mm256_setzero_si256();
      for (int64_t k = k0; k < k0 + 128; k += 32) {
        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k));
        const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + k + 16));
        sum = _mm256_add_epi32(sum, _mm256_add_epi32(_mm256_madd_epi16(a, ones), _mm256_madd_epi16(b, ones)));
        // packus / packs work per 128-bit lane: permute the quadwords back to k order
        const __m256i l = _mm256_permute4x64_epi64(
            _mm256_packus_epi16(_mm256_and_si256(a, byte), _mm256_and_si256(b, byte)), 0xD8);
        const __m256i h = _mm256_permute4x64_epi64(_mm256_packs_epi16(_mm256_srai_epi16(a, 8), _mm256_srai_epi16(b, 8)), 0xD8);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + k), l);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(row + Kp + k), h);
      }
      const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
      const __m128i u = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      corr[k0 / 128] = -8 * _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
    }
    __builtin_memcpy(row + 2 * Kp, corr, static_cast<size_t>(Kp / 128) * 4);
  }
}

inline __m256i bcast4(const uint8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm256_set1_epi32(v);
}

// One x row, NP panels from P0 (2 registers of 8 columns each) of the 64-column block.
template <int P0, int NP>
inline void wo4a16_panels(const WeightView& w, const uint8_t* qa, float sx, float* y, int64_t n, const uint8_t* blk) {
  const int64_t Kp = w.Kp;
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1), c256 = _mm256_set1_epi16(256);
  __m256 f[2 * NP];
  for (int r = 0; r < 2 * NP; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t c = 0; c < Kp / 128; ++c) {
    const uint8_t* ch = blk + c * kInt4PanelChunkBytes;
    __m256i acc[2 * NP];
    const __m256i c0 = _mm256_set1_epi32(reinterpret_cast<const int32_t*>(qa + 2 * Kp)[c]);
    for (int r = 0; r < 2 * NP; ++r) acc[r] = c0;
    for (int s = 0; s < 16; ++s) {
      const uint8_t* q = qa + 128 * c + 8 * s;
      const __m256i bl0 = bcast4(q), bl1 = bcast4(q + 4), bh0 = bcast4(q + Kp), bh1 = bcast4(q + Kp + 4);
      const uint8_t* ws = ch + s * kInt4PanelStepBytes + 64 * P0;
      for (int r = 0; r < 2 * NP; ++r) {
        const __m256i v = _mm256_load_si256(reinterpret_cast<const __m256i*>(ws + 32 * r));
        const __m256i u0 = _mm256_and_si256(v, low4), u1 = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
        const __m256i pl = _mm256_add_epi16(_mm256_maddubs_epi16(bl0, u0), _mm256_maddubs_epi16(bl1, u1));
        const __m256i ph = _mm256_add_epi16(_mm256_maddubs_epi16(u0, bh0), _mm256_maddubs_epi16(u1, bh1));
        acc[r] = _mm256_add_epi32(acc[r], _mm256_add_epi32(_mm256_madd_epi16(pl, ones), _mm256_madd_epi16(ph, c256)));
      }
    }
    const float* sc = reinterpret_cast<const float*>(ch + 16 * kInt4PanelStepBytes) + 16 * P0;
    for (int r = 0; r < 2 * NP; ++r)
      f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r]), _mm256_load_ps(sc + 8 * r), f[r]);
  }
  const __m256 sv = _mm256_set1_ps(sx);
  for (int r = 0; r < 2 * NP; ++r) {
    const int64_t col = n + 16 * P0 + 8 * r, left = w.N - col;
    if (left <= 0) break;
    alignas(32) float out[8];
    _mm256_store_ps(out, _mm256_mul_ps(f[r], sv));
    for (int64_t e = 0; e < std::min<int64_t>(8, left); ++e) y[col + e] = out[e];
  }
}

// n0 is a multiple of 64 (the driver splits on blocks); n1 is one or N.
void weight_only_int4_a16(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  const uint8_t* q = static_cast<const uint8_t*>(qa);
  const int64_t rs = int4_a16_row_bytes(w.Kp), bb = int4_panel_block_bytes(w.Kp);
  for (int64_t n = n0; n < n1; n += 64) {
    const uint8_t* blk = w.w4p + (n / 64) * bb;
    for (int64_t m = 0; m < M; ++m) {
      wo4a16_panels<0, 2>(w, q + m * rs, sx[m], y + m * ldy, n, blk);
      if (n + 32 < w.N) wo4a16_panels<2, 2>(w, q + m * rs, sx[m], y + m * ldy, n, blk);
    }
  }
}

}  // namespace

const KernelTable& avx2_kernels() {
  static const KernelTable t{weight_only_int8, weight_only_int4, quant_rows, dynamic, 8, 128, nullptr, nullptr,
                             quant_rows16, weight_only_int8_a16, nullptr, quant_rows16_int4, weight_only_int4_a16};
  return t;
}

}  // namespace aimass::quant::detail
