// GCC 12 flags the setzero intrinsics themselves (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "runtime/packed_gemm.h"

namespace aimass::runtime::packed {

namespace {

// One tile: MR rows x 32 columns (one panel, two registers), accumulated over all of K in registers.
template <int MR>
inline void tile(const float* x, int64_t K, const float* w, const float* b, int64_t ncols, bool relu, float* y,
                 int64_t N) {
  // KU independent accumulator sets over consecutive k: with few rows the FMA latency,
  // not the load or FMA throughput, would bound the loop.
  constexpr int KU = MR == 1 ? 4 : MR <= 2 ? 2 : 1;
  __m512 a0[KU][MR], a1[KU][MR];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a0[u][m] = a1[u][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m512 w0 = _mm512_load_ps(w + (k + u) * kPanel), w1 = _mm512_load_ps(w + (k + u) * kPanel + 16);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m * K + k + u]);
        a0[u][m] = _mm512_fmadd_ps(w0, xb, a0[u][m]);
        a1[u][m] = _mm512_fmadd_ps(w1, xb, a1[u][m]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m512 w0 = _mm512_load_ps(w + k * kPanel), w1 = _mm512_load_ps(w + k * kPanel + 16);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * K + k]);
      a0[0][m] = _mm512_fmadd_ps(w0, xb, a0[0][m]);
      a1[0][m] = _mm512_fmadd_ps(w1, xb, a1[0][m]);
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      a0[0][m] = _mm512_add_ps(a0[0][m], a0[u][m]);
      a1[0][m] = _mm512_add_ps(a1[0][m], a1[u][m]);
    }
  const __m512 b0 = b ? _mm512_load_ps(b) : _mm512_setzero_ps(), b1 = b ? _mm512_load_ps(b + 16) : _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols > 16 ? __mmask16((1u << (ncols - 16)) - 1) : 0;
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    __m512 v0 = _mm512_add_ps(a0[0][m], b0), v1 = _mm512_add_ps(a1[0][m], b1);
    if (relu) {
      // max(0, v) returns its second operand when either is NaN: NaN stays NaN and -0
      // stays -0, exactly torch's relu (v < 0 ? 0 : v); max(v, 0) would turn NaN into 0
      v0 = _mm512_max_ps(zero, v0);
      v1 = _mm512_max_ps(zero, v1);
    }
    _mm512_mask_storeu_ps(y + m * N, m0, v0);
    _mm512_mask_storeu_ps(y + m * N + 16, m1, v1);
  }
}

}  // namespace

void panels_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                 int64_t p1, int64_t N, bool relu, float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = wp + p * K * kPanel;
    const float* b = bias_p ? bias_p + p * kPanel : nullptr;
    const int64_t n0 = p * kPanel, ncols = N - n0 < kPanel ? N - n0 : kPanel;
    int64_t m = 0;
    for (; m + 8 <= M; m += 8) tile<8>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N);
    switch (M - m) {
      case 7: tile<7>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 6: tile<6>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 5: tile<5>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 4: tile<4>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 3: tile<3>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 2: tile<2>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 1: tile<1>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      default: break;
    }
  }
}

}  // namespace aimass::runtime::packed
