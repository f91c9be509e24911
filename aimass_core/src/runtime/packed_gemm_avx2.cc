// GCC 12 flags the setzero intrinsics themselves (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include "runtime/packed_gemm.h"

namespace aimass::runtime::packed {

namespace {

// One tile: MR rows x 16 columns (half a panel, two registers), accumulated over all of K in registers.
template <int MR>
inline void tile(const float* x, int64_t K, const float* w, const float* b, int64_t ncols, bool relu, float* y,
                 int64_t N) {
  // KU independent accumulator sets over consecutive k: with few rows the FMA latency,
  // not the load or FMA throughput, would bound the loop.
  constexpr int KU = MR == 1 ? 4 : MR <= 3 ? 2 : 1;
  __m256 a0[KU][MR], a1[KU][MR];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a0[u][m] = a1[u][m] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m256 w0 = _mm256_load_ps(w + (k + u) * kPanel), w1 = _mm256_load_ps(w + (k + u) * kPanel + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xb = _mm256_set1_ps(x[m * K + k + u]);
        a0[u][m] = _mm256_fmadd_ps(w0, xb, a0[u][m]);
        a1[u][m] = _mm256_fmadd_ps(w1, xb, a1[u][m]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m256 w0 = _mm256_load_ps(w + k * kPanel), w1 = _mm256_load_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_set1_ps(x[m * K + k]);
      a0[0][m] = _mm256_fmadd_ps(w0, xb, a0[0][m]);
      a1[0][m] = _mm256_fmadd_ps(w1, xb, a1[0][m]);
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      a0[0][m] = _mm256_add_ps(a0[0][m], a0[u][m]);
      a1[0][m] = _mm256_add_ps(a1[0][m], a1[u][m]);
    }
  const __m256 b0 = b ? _mm256_load_ps(b) : _mm256_setzero_ps(), b1 = b ? _mm256_load_ps(b + 8) : _mm256_setzero_ps();
  const __m256 zero = _mm256_setzero_ps();
  alignas(32) float tmp[16];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    __m256 v0 = _mm256_add_ps(a0[0][m], b0), v1 = _mm256_add_ps(a1[0][m], b1);
    if (relu) {
      // max(0, v) returns its second operand when either is NaN: NaN stays NaN and -0
      // stays -0, exactly torch's relu (v < 0 ? 0 : v); max(v, 0) would turn NaN into 0
      v0 = _mm256_max_ps(zero, v0);
      v1 = _mm256_max_ps(zero, v1);
    }
    if (ncols >= 16) {
      _mm256_storeu_ps(y + m * N, v0);
      _mm256_storeu_ps(y + m * N + 8, v1);
    } else {
      _mm256_store_ps(tmp, v0);
      _mm256_store_ps(tmp + 8, v1);
      for (int64_t j = 0; j < ncols; ++j) y[m * N + j] = tmp[j];
    }
  }
}

// A 32-wide panel as two 16-wide halves (AVX2 has 16 registers: 6 rows x 2 halves would not fit).
template <int MR>
inline void tile_panel(const float* x, int64_t K, const float* w, const float* b, int64_t ncols, bool relu,
                       float* y, int64_t N) {
  tile<MR>(x, K, w, b, ncols < 16 ? ncols : 16, relu, y, N);
  if (ncols > 16) tile<MR>(x, K, w + 16, b ? b + 16 : nullptr, ncols - 16, relu, y + 16, N);
}

}  // namespace

void panels_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                 int64_t p1, int64_t N, bool relu, float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = wp + p * K * kPanel;
    const float* b = bias_p ? bias_p + p * kPanel : nullptr;
    const int64_t n0 = p * kPanel, ncols = N - n0 < kPanel ? N - n0 : kPanel;
    int64_t m = 0;
    for (; m + 6 <= M; m += 6) tile_panel<6>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N);
    switch (M - m) {
      case 5: tile_panel<5>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 4: tile_panel<4>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 3: tile_panel<3>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 2: tile_panel<2>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      case 1: tile_panel<1>(x + m * K, K, w, b, ncols, relu, y + m * N + n0, N); break;
      default: break;
    }
  }
}

}  // namespace aimass::runtime::packed
