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

// acc += dot4(u8 a, s8 b) in place. GCC does not coalesce the intrinsic's destructive
// accumulator when accumulators live in arrays and copies each one every step.
inline void dpbusd(__m512i& acc, __m512i a, __m512i b) { asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(a), "v"(b)); }

// ---------------------------------------------------------------- weight-only
template <int MR, int NR, bool Grouped, int Bits>
inline void wo_tile(const WeightView& w, const float* x, int64_t ldx, float* y, int64_t ldy, int64_t n) {
  __m512 acc[MR][NR], ga[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
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
      // 128 elements per row per step: 8 vectors, each a shift plus a table lookup
      // (vpermps reads only the low 4 bits of each index) giving (q + 8) - 8 exactly.
      const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
      for (int64_t k = k0; k < k1; k += 128) {
        __m512i packed[NR];
        for (int j = 0; j < NR; ++j) packed[j] = _mm512_loadu_si512(w.w4 + (n + j) * (w.Kp / 2) + k / 2);
        for (int v = 0; v < 8; ++v) {
          __m512 wv[NR];
          for (int j = 0; j < NR; ++j)
            wv[j] = _mm512_permutexvar_ps(v == 0 ? packed[j] : _mm512_srli_epi32(packed[j], 4 * v), table);
          for (int i = 0; i < MR; ++i) {
            const __m512 xv = _mm512_loadu_ps(x + i * ldx + k + 16 * v);
            for (int j = 0; j < NR; ++j) A[i][j] = _mm512_fmadd_ps(wv[j], xv, A[i][j]);
          }
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

// int4 with groups smaller than a 128-element block (group_size % 16 == 0): every 16-wide
// vector lies in one group, so its scale is folded into the decoded weights. x is
// zero-padded to Kp by the caller; vectors past K are skipped.
template <int MR, int NR>
inline void wo4_small_groups_tile(const WeightView& w, const float* x, int64_t ldx, float* y, int64_t ldy,
                                  int64_t n) {
  __m512 acc[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_ps();
  const __m512 table = _mm512_setr_ps(-8, -7, -6, -5, -4, -3, -2, -1, 0, 1, 2, 3, 4, 5, 6, 7);
  for (int64_t k = 0; k < w.K; k += 128) {
    __m512i packed[NR];
    for (int j = 0; j < NR; ++j) packed[j] = _mm512_loadu_si512(w.w4 + (n + j) * (w.Kp / 2) + k / 2);
    for (int v = 0; v < 8 && k + 16 * v < w.K; ++v) {
      const int64_t g = (k + 16 * v) / w.G;
      __m512 wv[NR];
      for (int j = 0; j < NR; ++j)
        wv[j] = _mm512_mul_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(packed[j], 4 * v), table),
                              _mm512_set1_ps(w.scale[(n + j) * w.ng + g]));
      for (int i = 0; i < MR; ++i) {
        const __m512 xv = _mm512_loadu_ps(x + i * ldx + k + 16 * v);
        for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_fmadd_ps(wv[j], xv, acc[i][j]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + n + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int NR>
inline void wo4_small_groups_rows(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                                  int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2) wo4_small_groups_tile<2, NR>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
  if (m < M) wo4_small_groups_tile<1, NR>(w, x + m * ldx, ldx, y + m * ldy, ldy, n);
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
  if (!w.per_channel && w.G % 128 != 0) {
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4) wo4_small_groups_rows<4>(w, x, ldx, M, y, ldy, n);
    for (; n < n1; ++n) wo4_small_groups_rows<1>(w, x, ldx, M, y, ldy, n);
    return;
  }
  if (w.per_channel) wo_range<false, 4>(w, x, ldx, M, y, ldy, n0, n1);
  else wo_range<true, 4>(w, x, ldx, M, y, ldy, n0, n1);
}

// ---------------------------------------------------------------- activation quantization
// One row's max|x| (a) and NaN/inf probe (p = sum of x * 0: nonzero or NaN iff some value is
// not finite), in two independent chains: one max / add chain (4-cycle latency per 16 values)
// bounded the pass.
inline void scan_row(const float* xr, int64_t K, float& a, float& p) {
  const __m512 zero = _mm512_setzero_ps();
  __m512 amax = zero, poison = zero, amax1 = zero, poison1 = zero;
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    const __m512 v = _mm512_loadu_ps(xr + k), v1 = _mm512_loadu_ps(xr + k + 16);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    amax1 = _mm512_max_ps(amax1, _mm512_abs_ps(v1));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
    poison1 = _mm512_add_ps(poison1, _mm512_mul_ps(v1, zero));
  }
  for (; k < K; k += 16) {
    const __mmask16 mk = K - k >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
    poison = _mm512_add_ps(poison, _mm512_mul_ps(v, zero));
  }
  a = _mm512_reduce_max_ps(_mm512_max_ps(amax, amax1));
  p = _mm512_reduce_add_ps(_mm512_add_ps(poison, poison1));
}

void quant_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int8_t* qx, float* sx) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  const __m128i offset = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    int8_t* q = qx + m * Kp;
    float a, p;
    scan_row(xr, K, a, p);
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
      for (int i = 0; i < MR; ++i) dpbusd(acc[i][j], xv[i], wv);
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      const int32_t dot = _mm512_reduce_add_epi32(acc[i][j]) - 128 * w.colsum[n + j];
      y[i * ldy + n + j] = (static_cast<float>(dot) * w.scale[n + j]) * sx[i];
    }
}

// The 4x4 per-channel tile written out with named accumulators: with arrays GCC
// copies every accumulator through another register after each vpdpbusd.
inline void dyn_tile_channel_4x4(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy,
                                 int64_t n) {
  __m512i c00 = _mm512_setzero_si512(), c01 = c00, c02 = c00, c03 = c00, c10 = c00, c11 = c00, c12 = c00,
          c13 = c00, c20 = c00, c21 = c00, c22 = c00, c23 = c00, c30 = c00, c31 = c00, c32 = c00, c33 = c00;
  const int64_t Kp = w.Kp;
  const int8_t *x0 = qx, *x1 = qx + Kp, *x2 = qx + 2 * Kp, *x3 = qx + 3 * Kp;
  const int8_t *w0 = w.wq + n * Kp, *w1 = w0 + Kp, *w2 = w1 + Kp, *w3 = w2 + Kp;
  for (int64_t k = 0; k < Kp; k += 64) {
    const __m512i a0 = _mm512_loadu_si512(x0 + k), a1 = _mm512_loadu_si512(x1 + k);
    const __m512i a2 = _mm512_loadu_si512(x2 + k), a3 = _mm512_loadu_si512(x3 + k);
    __m512i b = _mm512_loadu_si512(w0 + k);
    c00 = _mm512_dpbusd_epi32(c00, a0, b);
    c10 = _mm512_dpbusd_epi32(c10, a1, b);
    c20 = _mm512_dpbusd_epi32(c20, a2, b);
    c30 = _mm512_dpbusd_epi32(c30, a3, b);
    b = _mm512_loadu_si512(w1 + k);
    c01 = _mm512_dpbusd_epi32(c01, a0, b);
    c11 = _mm512_dpbusd_epi32(c11, a1, b);
    c21 = _mm512_dpbusd_epi32(c21, a2, b);
    c31 = _mm512_dpbusd_epi32(c31, a3, b);
    b = _mm512_loadu_si512(w2 + k);
    c02 = _mm512_dpbusd_epi32(c02, a0, b);
    c12 = _mm512_dpbusd_epi32(c12, a1, b);
    c22 = _mm512_dpbusd_epi32(c22, a2, b);
    c32 = _mm512_dpbusd_epi32(c32, a3, b);
    b = _mm512_loadu_si512(w3 + k);
    c03 = _mm512_dpbusd_epi32(c03, a0, b);
    c13 = _mm512_dpbusd_epi32(c13, a1, b);
    c23 = _mm512_dpbusd_epi32(c23, a2, b);
    c33 = _mm512_dpbusd_epi32(c33, a3, b);
  }
  const __m512i acc[4][4] = {{c00, c01, c02, c03}, {c10, c11, c12, c13}, {c20, c21, c22, c23}, {c30, c31, c32, c33}};
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j) {
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
        for (int i = 0; i < MR; ++i) dpbusd(acc[i][j], xv[i], wv);
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
  else if (MR == 4 && NR == 4) dyn_tile_channel_4x4(w, qx, sx, y, ldy, n);
  else dyn_tile_channel<MR, NR>(w, qx, sx, y, ldy, n);
}

template <int NR, bool Grouped>
inline void dyn_rows(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
                     int64_t n) {
  constexpr int MRmax = Grouped ? 2 : 4;
  int64_t m = 0;
  for (; m + MRmax <= M; m += MRmax) dyn_tile<MRmax, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
  // Leftover rows one at a time: single-row tiles keep every accumulator in a register
  // (2- and 3-row array tiles made GCC keep them on the stack); the weight rows are in L1.
  for (; m < M; ++m) dyn_tile<1, NR, Grouped>(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n);
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
    // Few rows: 8 weight rows per tile give more independent streams and accumulators.
    if (!Grouped && mlen < 4)
      for (; n + 8 <= n1; n += 8) dyn_rows<8, Grouped>(w, q, sx + mb, mlen, yb, ldy, n);
    for (; n + 4 <= n1; n += 4) dyn_rows<4, Grouped>(w, q, sx + mb, mlen, yb, ldy, n);
    for (; n < n1; ++n) dyn_rows<1, Grouped>(w, q, sx + mb, mlen, yb, ldy, n);
  }
}

void dynamic(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy, int64_t n0,
             int64_t n1) {
  if (w.per_channel) dyn_range<false>(w, qx, sx, M, y, ldy, n0, n1);
  else dyn_range<true>(w, qx, sx, M, y, ldy, n0, n1);
}


// ---------------------------------------------------------------- dynamic int8, VNNI panels
// Outer-product tile: MR rows of qx (4 bytes broadcast per k step) x NP panels of 16
// columns, all MR * NP int32 accumulators in registers; no horizontal sums, and the
// epilogue (+128 column-sum correction, weight scale, row scale) is 16 columns at a time.
template <int MR>
inline void panel_epilogue(const WeightView& w, const __m512i (&acc)[MR][4], const float* sx, float* y, int64_t ldy,
                           int64_t n, int64_t n1) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c = n + 16 * j, left = n1 - c;
    if (left <= 0) break;
    const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i cs = _mm512_slli_epi32(_mm512_maskz_loadu_epi32(mk, w.colsum + c), 7);
    const __m512 sc = _mm512_maskz_loadu_ps(mk, w.scale + c);
    if (w.bias) {
      const __m512 bv = _mm512_maskz_loadu_ps(mk, w.bias + c);
      for (int i = 0; i < MR; ++i) {
        const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], cs)), sc);
        _mm512_mask_storeu_ps(y + i * ldy + c, mk, _mm512_add_ps(_mm512_mul_ps(v, _mm512_set1_ps(sx[i])), bv));
      }
      continue;
    }
    for (int i = 0; i < MR; ++i) {
      const __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], cs)), sc);
      _mm512_mask_storeu_ps(y + i * ldy + c, mk, _mm512_mul_ps(v, _mm512_set1_ps(sx[i])));
    }
  }
}

// Row tails (1-5 rows): accumulators as arrays, fine at this size.
template <int MR>
inline void panel_tile(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy, int64_t n,
                       int64_t n1) {
  const int64_t Kp = w.Kp;
  const int8_t* wp = w.wvnni + (n / 64) * 64 * Kp;  // n is a multiple of 64 (see kernels.h)
  __m512i acc[MR][4];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < 4; ++j) acc[i][j] = _mm512_setzero_si512();
#pragma GCC unroll 2
  for (int64_t k = 0; k < Kp; k += 4) {
    __m512i b[4];
    for (int j = 0; j < 4; ++j) b[j] = _mm512_loadu_si512(wp + k * 64 + j * 64);
    for (int i = 0; i < MR; ++i) {
      int32_t a4;
      __builtin_memcpy(&a4, qx + i * Kp + k, 4);
      const __m512i a = _mm512_set1_epi32(a4);
      for (int j = 0; j < 4; ++j) dpbusd(acc[i][j], a, b[j]);
    }
  }
  panel_epilogue<MR>(w, acc, sx, y, ldy, n, n1);
}

// Named accumulators for the full tiles (macros shared by the dynamic 6-row tile and the
// int16 weight-only 1-3-row tiles below): with arrays GCC keeps them on the stack and
// reloads/stores each one every k step (6 x 4 at M = 256: 30 vs 24 ms; int16 1 x 4 at
// batch 1: 0.45 vs 0.25 ms).
#define AIMASS_Z4(p, r) \
  __m512i p##r##0 = _mm512_setzero_si512(), p##r##1 = _mm512_setzero_si512(), p##r##2 = _mm512_setzero_si512(), \
          p##r##3 = _mm512_setzero_si512()
#define AIMASS_Q(p, r) {p##r##0, p##r##1, p##r##2, p##r##3}
// The k loop over one block (64 columns, the 4 panels' vectors b0..b3 per 4 k); ROWS
// issues each row's vpdpbusd.
#define AIMASS_BLOCK_LOOP(ROWS)                                                                   \
  const int64_t Kp = w.Kp;                                                                        \
  const int8_t* wp = w.wvnni + (n / 64) * 64 * Kp;                                                \
  for (int64_t k = 0; k < Kp; k += 4) {                                                           \
    const int8_t* b = wp + k * 64;                                                                \
    const __m512i b0 = _mm512_loadu_si512(b), b1 = _mm512_loadu_si512(b + 64);                    \
    const __m512i b2 = _mm512_loadu_si512(b + 128), b3 = _mm512_loadu_si512(b + 192);             \
    ROWS                                                                                          \
  }
// Dynamic row r: 4 bytes of qx broadcast, 4 vpdpbusd.
#define AIMASS_DYN_ROW(r)                                                                       \
  {                                                                                             \
    int32_t av;                                                                                 \
    __builtin_memcpy(&av, qx + (r) * Kp + k, 4);                                                \
    const __m512i a = _mm512_set1_epi32(av);                                                    \
    dpbusd(c##r##0, a, b0); dpbusd(c##r##1, a, b1); dpbusd(c##r##2, a, b2); dpbusd(c##r##3, a, b3); \
  }

inline void panel_tile_6x4(const WeightView& w, const int8_t* qx, const float* sx, float* y, int64_t ldy, int64_t n,
                           int64_t n1) {
  AIMASS_Z4(c, 0); AIMASS_Z4(c, 1); AIMASS_Z4(c, 2); AIMASS_Z4(c, 3); AIMASS_Z4(c, 4); AIMASS_Z4(c, 5);
  AIMASS_BLOCK_LOOP(AIMASS_DYN_ROW(0) AIMASS_DYN_ROW(1) AIMASS_DYN_ROW(2) AIMASS_DYN_ROW(3) AIMASS_DYN_ROW(4)
                        AIMASS_DYN_ROW(5))
  const __m512i acc[6][4] = {AIMASS_Q(c, 0), AIMASS_Q(c, 1), AIMASS_Q(c, 2),
                             AIMASS_Q(c, 3), AIMASS_Q(c, 4), AIMASS_Q(c, 5)};
  panel_epilogue<6>(w, acc, sx, y, ldy, n, n1);
}
#undef AIMASS_DYN_ROW

inline void panel_rows(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
                       int64_t n, int64_t n1) {
  constexpr int MR = 6;  // 6 x 4 accumulators + 4 weight vectors + 1 broadcast = 29 zmm
  int64_t m = 0;
  for (; m + MR <= M; m += MR) panel_tile_6x4(w, qx + m * w.Kp, sx + m, y + m * ldy, ldy, n, n1);
  const int8_t* q = qx + m * w.Kp;
  float* yr = y + m * ldy;
  switch (M - m) {
    case 5: panel_tile<5>(w, q, sx + m, yr, ldy, n, n1); break;
    case 4: panel_tile<4>(w, q, sx + m, yr, ldy, n, n1); break;
    case 3: panel_tile<3>(w, q, sx + m, yr, ldy, n, n1); break;
    case 2: panel_tile<2>(w, q, sx + m, yr, ldy, n, n1); break;
    case 1: panel_tile<1>(w, q, sx + m, yr, ldy, n, n1); break;
    default: break;
  }
}

void dynamic_panels(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
                    int64_t n0, int64_t n1) {
  // 64 columns (one block, 256 KiB of weights at K = 4096) stay in L2 while every row
  // sweeps them; the block is zero padded past N, so the last one is a full tile too.
  for (int64_t n = n0; n < n1; n += 64) panel_rows(w, qx, sx, M, y, ldy, n, n1);
}

// ---------------------------------------------------------------- weight-only int8, int16 activations (VNNI)
// q (int16) = 256 * (q >> 8) + (q & 0xFF): two u8 planes, lo = q & 0xFF and hi = (q >> 8) + 128,
// each a vpdpbusd operand against the s8 weight rows (exact int32, no saturation);
// dot = 256 * (acc_hi - 128 * wsum[n]) + acc_lo. One 64-byte weight load feeds 2 * MR vpdpbusd.
void quant_rows16(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  const __m512i lo = _mm512_set1_epi32(-32767), hi = _mm512_set1_epi32(32767);
  const __m128i flip = _mm_set1_epi8(static_cast<char>(0x80));
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    uint8_t* plo = static_cast<uint8_t*>(qa) + m * 2 * Kp;
    uint8_t* phi = plo + Kp;
    float a, p;
    scan_row(xr, K, a, p);
    if (p != 0.f || p != p) {
      sx[m] = __builtin_nanf("");
      a = 0.f;
    } else {
      sx[m] = a / 32767.f;
    }
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 32767.f / a : 0.f);
    for (int64_t k = 0; k < Kp; k += 16) {
      const int64_t left = K - k;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                      : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1);
      __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), inv));  // nearest even
      r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(plo + k), _mm512_cvtepi32_epi8(r));  // low byte
      _mm_storeu_si128(reinterpret_cast<__m128i*>(phi + k),
                       _mm_xor_si128(_mm512_cvtepi32_epi8(_mm512_srai_epi32(r, 8)), flip));  // (q >> 8) + 128
    }
  }
}

// The int16-activation kernel over the VNNI blocks (w.wvnni; at this level int8 per-channel
// weights are always packed so): MR rows x 64 columns, the activations' 4-byte groups
// broadcast, 2 * 4 * MR int32 accumulators in registers and no horizontal sums. The block
// is one sequential stream, so batch 1 runs at the read roof of the weights (see
// kernels.h). Per-column sums fit int32: |sum| <= 255 * 127 * Kp < 2^31 for Kp <= 65536
// (checked by the driver). Results equal the scalar reference bit for bit.
template <int MR>
inline void wo16_panel_epilogue(const WeightView& w, const __m512i (&lo)[MR][4], const __m512i (&hi)[MR][4],
                                const float* sx, float* y, int64_t ldy, int64_t n, int64_t n1) {
  for (int j = 0; j < 4; ++j) {
    const int64_t c = n + 16 * j, left = n1 - c;
    if (left <= 0) break;
    const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
    const __m512i ws = _mm512_maskz_loadu_epi32(mk, w.wsum + c);
    const __m512 sc = _mm512_maskz_loadu_ps(mk, w.scale + c);
    for (int i = 0; i < MR; ++i) {
      const __m512 f = _mm512_mul_ps(_mm512_set1_ps(sx[i]), sc);  // float(sx * scale[n]), as the scalar reference
      __m256 half[2];
      for (int h = 0; h < 2; ++h) {
        auto half8 = [h](__m512i v) {  // 8 int32 lanes (low or high half) widened to int64
          return _mm512_cvtepi32_epi64(h ? _mm512_extracti64x4_epi64(v, 1) : _mm512_castsi512_si256(v));
        };
        const __m512i h64 = half8(hi[i][j]), l64 = half8(lo[i][j]), w64 = half8(ws);
        // dot = 256 * (hi - 128 * wsum) + lo, exact in int64
        const __m512i dot =
            _mm512_add_epi64(_mm512_slli_epi64(_mm512_sub_epi64(h64, _mm512_slli_epi64(w64, 7)), 8), l64);
        const __m512d fd = _mm512_cvtps_pd(h ? _mm512_extractf32x8_ps(f, 1) : _mm512_castps512_ps256(f));
        half[h] = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_cvtepi64_pd(dot), fd));
      }
      const __m512 out = _mm512_insertf32x8(_mm512_castps256_ps512(half[0]), half[1], 1);
      _mm512_mask_storeu_ps(y + i * ldy + c, mk, out);
    }
  }
}

// int16 weight-only tiles of 1-3 rows over one block (macros above).
#define AIMASS_ACC(r) AIMASS_Z4(l, r); AIMASS_Z4(h, r)
// Row r's lo/hi byte planes at k: 4 bytes of each broadcast, 8 vpdpbusd against the block.
#define AIMASS_ROW(r)                                                                              \
  {                                                                                                \
    int32_t av, bv;                                                                                \
    __builtin_memcpy(&av, qa + (2 * (r)) * Kp + k, 4);                                             \
    __builtin_memcpy(&bv, qa + (2 * (r) + 1) * Kp + k, 4);                                         \
    const __m512i a = _mm512_set1_epi32(av), c = _mm512_set1_epi32(bv);                            \
    dpbusd(l##r##0, a, b0); dpbusd(h##r##0, c, b0); dpbusd(l##r##1, a, b1); dpbusd(h##r##1, c, b1); \
    dpbusd(l##r##2, a, b2); dpbusd(h##r##2, c, b2); dpbusd(l##r##3, a, b3); dpbusd(h##r##3, c, b3); \
  }

inline void wo16_panel_tile_1(const WeightView& w, const uint8_t* qa, const float* sx, float* y, int64_t ldy, int64_t n,
                              int64_t n1) {
  AIMASS_ACC(0);
  AIMASS_BLOCK_LOOP(AIMASS_ROW(0))
  const __m512i lo[1][4] = {AIMASS_Q(l, 0)}, hi[1][4] = {AIMASS_Q(h, 0)};
  wo16_panel_epilogue<1>(w, lo, hi, sx, y, ldy, n, n1);
}

inline void wo16_panel_tile_2(const WeightView& w, const uint8_t* qa, const float* sx, float* y, int64_t ldy, int64_t n,
                              int64_t n1) {
  AIMASS_ACC(0);
  AIMASS_ACC(1);
  AIMASS_BLOCK_LOOP(AIMASS_ROW(0) AIMASS_ROW(1))
  const __m512i lo[2][4] = {AIMASS_Q(l, 0), AIMASS_Q(l, 1)}, hi[2][4] = {AIMASS_Q(h, 0), AIMASS_Q(h, 1)};
  wo16_panel_epilogue<2>(w, lo, hi, sx, y, ldy, n, n1);
}

inline void wo16_panel_tile_3(const WeightView& w, const uint8_t* qa, const float* sx, float* y, int64_t ldy, int64_t n,
                              int64_t n1) {
  AIMASS_ACC(0);
  AIMASS_ACC(1);
  AIMASS_ACC(2);
  AIMASS_BLOCK_LOOP(AIMASS_ROW(0) AIMASS_ROW(1) AIMASS_ROW(2))
  const __m512i lo[3][4] = {AIMASS_Q(l, 0), AIMASS_Q(l, 1), AIMASS_Q(l, 2)};
  const __m512i hi[3][4] = {AIMASS_Q(h, 0), AIMASS_Q(h, 1), AIMASS_Q(h, 2)};
  wo16_panel_epilogue<3>(w, lo, hi, sx, y, ldy, n, n1);
}
#undef AIMASS_Z4
#undef AIMASS_ACC
#undef AIMASS_ROW
#undef AIMASS_BLOCK_LOOP
#undef AIMASS_Q

void weight_only_int8_a16_panels(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y,
                                 int64_t ldy, int64_t n0, int64_t n1) {
  const uint8_t* q = static_cast<const uint8_t*>(qa);
  const int64_t rs = 2 * w.Kp;
  // Each 64-column block (256 KiB at K = 4096) stays in L2 while the row tiles sweep it.
  for (int64_t n = n0; n < n1; n += 64) {
    int64_t m = 0;
    for (; m + 3 <= M; m += 3) wo16_panel_tile_3(w, q + m * rs, sx + m, y + m * ldy, ldy, n, n1);
    if (M - m == 2) wo16_panel_tile_2(w, q + m * rs, sx + m, y + m * ldy, ldy, n, n1);
    else if (M - m == 1) wo16_panel_tile_1(w, q + m * rs, sx + m, y + m * ldy, ldy, n, n1);
  }
}

// ---------------------------------------------------------------- dynamic int8 x packed int4 (VNNI)
// vpdpbusd(u8 nibble = q + 8, s8 qx): sum((q + 8) * qx) - 8 * sum(qx) per group.
template <int MR, int NR>
inline void dyn4_tile(const WeightView& w, const int8_t* qxp, const int32_t* qsum, const float* sx, float* y,
                      int64_t ldy, int64_t n) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 facc[MR][NR];
  float corr[MR][NR];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) {
      facc[i][j] = _mm512_setzero_ps();
      corr[i][j] = 0.f;
    }
  for (int64_t g = 0; g < w.ngk; ++g) {
    __m512i acc[MR][NR];
    for (int i = 0; i < MR; ++i)
      for (int j = 0; j < NR; ++j) acc[i][j] = _mm512_setzero_si512();
    for (int64_t k = g * w.Gk; k < (g + 1) * w.Gk; k += 128) {
      __m512i xa[MR], xb[MR];
      for (int i = 0; i < MR; ++i) {
        xa[i] = _mm512_loadu_si512(qxp + i * w.Kp + k);
        xb[i] = _mm512_loadu_si512(qxp + i * w.Kp + k + 64);
      }
      for (int j = 0; j < NR; ++j) {
        const __m512i v = _mm512_loadu_si512(w.w4 + (n + j) * (w.Kp / 2) + k / 2);
        const __m512i lo = _mm512_and_si512(v, low4), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int i = 0; i < MR; ++i) {
          dpbusd(acc[i][j], lo, xa[i]);
          dpbusd(acc[i][j], hi, xb[i]);
        }
      }
    }
    for (int j = 0; j < NR; ++j) {
      const float sg = w.scale[(n + j) * w.ng + g];
      const __m512 s = _mm512_set1_ps(sg);
      for (int i = 0; i < MR; ++i) {
        facc[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[i][j]), s, facc[i][j]);
        corr[i][j] += sg * static_cast<float>(8 * qsum[i * w.ngk + g]);
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NR; ++j) y[i * ldy + n + j] = (_mm512_reduce_add_ps(facc[i][j]) - corr[i][j]) * sx[i];
}

template <int NR>
inline void dyn4_rows(const WeightView& w, const int8_t* qxp, const int32_t* qsum, const float* sx, int64_t M,
                      float* y, int64_t ldy, int64_t n) {
  int64_t m = 0;
  for (; m + 2 <= M; m += 2)
    dyn4_tile<2, NR>(w, qxp + m * w.Kp, qsum + m * w.ngk, sx + m, y + m * ldy, ldy, n);
  if (m < M) dyn4_tile<1, NR>(w, qxp + m * w.Kp, qsum + m * w.ngk, sx + m, y + m * ldy, ldy, n);
}

void dynamic_int4(const WeightView& w, const int8_t* qxp, const int32_t* qsum, const float* sx, int64_t M, float* y,
                  int64_t ldy, int64_t n0, int64_t n1) {
  constexpr int64_t kMBlock = 128;
  for (int64_t mb = 0; mb < M; mb += kMBlock) {
    const int64_t mlen = M - mb < kMBlock ? M - mb : kMBlock;
    int64_t n = n0;
    for (; n + 4 <= n1; n += 4)
      dyn4_rows<4>(w, qxp + mb * w.Kp, qsum + mb * w.ngk, sx + mb, mlen, y + mb * ldy, ldy, n);
    for (; n < n1; ++n) dyn4_rows<1>(w, qxp + mb * w.Kp, qsum + mb * w.ngk, sx + mb, mlen, y + mb * ldy, ldy, n);
  }
}

// ---------------------------------------------------------------- weight-only int4, int16 activations (VNNI)
// Layouts and arithmetic: kernels.h (quant_rows16_int4, int4_panel_*). The weights are
// read as column panels: per 8 k and 16 columns one 64-byte line gives, with one AND and
// one shift + AND, the nibbles u = w + 8 of k..k+3 and k+4..k+7 as the 4-byte dwords of 16
// column lanes. x's byte planes are broadcast 4 bytes at a time: the low plane as u8 x u,
// u x the high plane as s8 (4 vpdpbusd per 128 weights, the floor of this instruction
// mix). The accumulators are 16 columns each, so a chunk of 128 k ends with one shift,
// two adds (the +8 correction rides in the accumulator's start value), one conversion and
// one FMA per 16 columns, instead of per weight row; no horizontal sums. A 64-column
// block is one sequential stream (the scales inline), and the whole weight one stream.
void quant_rows16_int4(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  const __m512i lo = _mm512_set1_epi32(-32767), hi = _mm512_set1_epi32(32767);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    uint8_t* out = static_cast<uint8_t*>(qa) + m * int4_a16_row_bytes(Kp);
    int32_t* corr = reinterpret_cast<int32_t*>(out + 2 * Kp);
    float a, p;
    scan_row(xr, K, a, p);
    if (p != 0.f || p != p) {
      sx[m] = __builtin_nanf("");
      a = 0.f;
    } else {
      sx[m] = a / 32767.f;
    }
    const __m512 inv = _mm512_set1_ps(a > 0.f ? 32767.f / a : 0.f);
    for (int64_t k0 = 0; k0 < Kp; k0 += 128) {
      __m512i sum = _mm512_setzero_si512();
      for (int v = 0; v < 8; ++v) {
        const int64_t k = k0 + 16 * v, left = K - k;
        const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF)
                                        : left <= 0 ? static_cast<__mmask16>(0) : static_cast<__mmask16>((1u << left) - 1);
        __m512i r = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), inv));  // nearest even
        r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
        sum = _mm512_add_epi32(sum, r);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + k), _mm512_cvtepi32_epi8(r));  // q & 0xFF
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out + Kp + k), _mm512_cvtepi32_epi8(_mm512_srai_epi32(r, 8)));
      }
      corr[k0 / 128] = -8 * _mm512_reduce_add_epi32(sum);
    }
  }
}

inline __m512i bcast4(const uint8_t* p) {
  int32_t v;
  __builtin_memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// MR x rows, panels [P0, P0 + NP) of the 64-column block at `blk` (columns n..n+63 of y),
// for every chunk of k. 1 x 4 panels or 2 x 2: 8 int32 and 4 fp32 accumulators plus the
// broadcasts stay in the 32 registers.
template <int MR, int P0, int NP>
inline void wo4a16_panels(const WeightView& w, const uint8_t* qa, const float* sx, float* y, int64_t ldy, int64_t n,
                          const uint8_t* blk) {
  const int64_t rs = int4_a16_row_bytes(w.Kp), Kp = w.Kp;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 f[MR][NP];
  for (int i = 0; i < MR; ++i)
    for (int p = 0; p < NP; ++p) f[i][p] = _mm512_setzero_ps();
  for (int64_t c = 0; c < Kp / 128; ++c) {
    const uint8_t* ch = blk + c * kInt4PanelChunkBytes;
    __m512i al[MR][NP], ah[MR][NP];
    for (int i = 0; i < MR; ++i) {
      const __m512i c0 = _mm512_set1_epi32(reinterpret_cast<const int32_t*>(qa + i * rs + 2 * Kp)[c]);
      for (int p = 0; p < NP; ++p) {
        al[i][p] = c0;
        ah[i][p] = _mm512_setzero_si512();
      }
    }
    const uint8_t* xl = qa + 128 * c;
    for (int s = 0; s < 16; ++s) {
      __m512i bl0[MR], bl1[MR], bh0[MR], bh1[MR];
      for (int i = 0; i < MR; ++i) {
        const uint8_t* q = xl + i * rs + 8 * s;
        bl0[i] = bcast4(q);
        bl1[i] = bcast4(q + 4);
        bh0[i] = bcast4(q + Kp);
        bh1[i] = bcast4(q + Kp + 4);
      }
      const uint8_t* ws = ch + s * kInt4PanelStepBytes + 64 * P0;
      for (int p = 0; p < NP; ++p) {
        const __m512i v = _mm512_load_si512(ws + 64 * p);
        const __m512i u0 = _mm512_and_si512(v, low4), u1 = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        for (int i = 0; i < MR; ++i) {
          dpbusd(al[i][p], bl0[i], u0);
          dpbusd(al[i][p], bl1[i], u1);
          dpbusd(ah[i][p], u0, bh0[i]);
          dpbusd(ah[i][p], u1, bh1[i]);
        }
      }
    }
    const float* sc = reinterpret_cast<const float*>(ch + 16 * kInt4PanelStepBytes) + 16 * P0;
    for (int p = 0; p < NP; ++p) {
      const __m512 s = _mm512_load_ps(sc + 16 * p);
      for (int i = 0; i < MR; ++i) {
        const __m512i d = _mm512_add_epi32(_mm512_slli_epi32(ah[i][p], 8), al[i][p]);
        f[i][p] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, f[i][p]);
      }
    }
  }
  for (int i = 0; i < MR; ++i) {
    const __m512 sv = _mm512_set1_ps(sx[i]);
    for (int p = 0; p < NP; ++p) {
      const int64_t col = n + 16 * (P0 + p), left = w.N - col;
      if (left <= 0) break;
      const __mmask16 mk = left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
      _mm512_mask_storeu_ps(y + i * ldy + col, mk, _mm512_mul_ps(f[i][p], sv));
    }
  }
}

template <int MR>
inline void wo4a16_block(const WeightView& w, const uint8_t* qa, const float* sx, float* y, int64_t ldy, int64_t n,
                         const uint8_t* blk) {
  if (MR == 1) {
    wo4a16_panels<1, 0, 4>(w, qa, sx, y, ldy, n, blk);
  } else {
    wo4a16_panels<MR, 0, 2>(w, qa, sx, y, ldy, n, blk);
    if (n + 32 < w.N) wo4a16_panels<MR, 2, 2>(w, qa, sx, y, ldy, n, blk);
  }
}

// n0 is a multiple of 64 (the driver splits on blocks); n1 is one or N.
void weight_only_int4_a16(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  const uint8_t* q = static_cast<const uint8_t*>(qa);
  const int64_t rs = int4_a16_row_bytes(w.Kp), bb = int4_panel_block_bytes(w.Kp);
  for (int64_t n = n0; n < n1; n += 64) {
    const uint8_t* blk = w.w4p + (n / 64) * bb;
    int64_t m = 0;
    for (; m + 2 <= M; m += 2) wo4a16_block<2>(w, q + m * rs, sx + m, y + m * ldy, ldy, n, blk);
    if (m < M) wo4a16_block<1>(w, q + m * rs, sx + m, y + m * ldy, ldy, n, blk);
  }
}

}  // namespace

const KernelTable& avx512_kernels() {
  static const KernelTable t{weight_only_int8, weight_only_int4, quant_rows, dynamic, 16, 16, dynamic_int4,
                             dynamic_panels, quant_rows16, nullptr, weight_only_int8_a16_panels, quant_rows16_int4,
                             weight_only_int4_a16};
  return t;
}

}  // namespace aimass::quant::detail
