// GCC 12 flags the setzero intrinsics themselves (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wunused-function"  // vec_kernels_impl.h's table bodies
#include <immintrin.h>

#include "runtime/packed_gemm.h"
#include "runtime/packed_gemm_tile_args.h"
#include "runtime/vec_kernels_impl.h"

namespace aimass::runtime::packed {

namespace {

using VT = vec::Avx2;

inline __m256 epi_act(__m256 v, int act) {
  switch (act) {
    // max(0, v) returns its second operand when either is NaN: NaN stays NaN and -0
    // stays -0, exactly torch's relu (v < 0 ? 0 : v); max(v, 0) would turn NaN into 0
    case kEpiRelu: return _mm256_max_ps(_mm256_setzero_ps(), v);
    case kEpiGelu: return vec::vgelu<VT>(v);
    case kEpiGeluTanh: return vec::vgelu_tanh<VT>(v);
    default: return v;
  }
}

// One tile: MR rows x 16 columns (half a panel, two registers), accumulated over kc values of
// k in registers. first: start from 0 (else from the partial sums in y); last: the epilogue.
template <int MR>
inline void tile(const float* x, int64_t ldx, int64_t kc, const float* w, const float* b, int64_t ncols, bool first,
                 bool last, const Epilogue& ep, const float* res, float* y, int64_t N) {
  // KU independent accumulator sets over consecutive k: with few rows the FMA latency,
  // not the load or FMA throughput, would bound the loop.
  constexpr int KU = MR == 1 ? 4 : MR <= 3 ? 2 : 1;
  alignas(32) float tmp[16];
  __m256 a0[KU][MR], a1[KU][MR];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) a0[u][m] = a1[u][m] = _mm256_setzero_ps();
  if (!first) {
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      if (ncols >= 16) {
        a0[0][m] = _mm256_loadu_ps(y + m * N);
        a1[0][m] = _mm256_loadu_ps(y + m * N + 8);
      } else {
        for (int64_t j = 0; j < 16; ++j) tmp[j] = j < ncols ? y[m * N + j] : 0.f;
        a0[0][m] = _mm256_load_ps(tmp);
        a1[0][m] = _mm256_load_ps(tmp + 8);
      }
    }
  }
  int64_t k = 0;
  for (; k + KU <= kc; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m256 w0 = _mm256_load_ps(w + (k + u) * kPanel), w1 = _mm256_load_ps(w + (k + u) * kPanel + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 xb = _mm256_set1_ps(x[m * ldx + k + u]);
        a0[u][m] = _mm256_fmadd_ps(w0, xb, a0[u][m]);
        a1[u][m] = _mm256_fmadd_ps(w1, xb, a1[u][m]);
      }
    }
  }
  for (; k < kc; ++k) {
    const __m256 w0 = _mm256_load_ps(w + k * kPanel), w1 = _mm256_load_ps(w + k * kPanel + 8);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m256 xb = _mm256_set1_ps(x[m * ldx + k]);
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
  const __m256 b0 = b && last ? _mm256_load_ps(b) : _mm256_setzero_ps();
  const __m256 b1 = b && last ? _mm256_load_ps(b + 8) : _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    __m256 v0 = a0[0][m], v1 = a1[0][m];
    if (last) {
      v0 = epi_act(_mm256_add_ps(v0, b0), ep.act);
      v1 = epi_act(_mm256_add_ps(v1, b1), ep.act);
    }
    if (ncols >= 16) {
      if (last && res) {
        v0 = _mm256_add_ps(v0, _mm256_loadu_ps(res + m * ep.ldr));
        v1 = _mm256_add_ps(v1, _mm256_loadu_ps(res + m * ep.ldr + 8));
      }
      _mm256_storeu_ps(y + m * N, v0);
      _mm256_storeu_ps(y + m * N + 8, v1);
    } else {
      _mm256_store_ps(tmp, v0);
      _mm256_store_ps(tmp + 8, v1);
      for (int64_t j = 0; j < ncols; ++j) y[m * N + j] = last && res ? tmp[j] + res[m * ep.ldr + j] : tmp[j];
    }
  }
}

// A 32-wide panel as two 16-wide halves (AVX2 has 16 registers: 6 rows x 2 halves would not fit).
template <int R>
inline void tile_at(const TileArgs& a, int64_t m) {
  const Epilogue& ep = *a.ep;
  const float* xm = a.xt ? a.xt : a.x + m * a.ldx + a.k0;
  const int64_t ldx = a.xt ? a.ldt : a.ldx;
  const float* wk = a.w + a.k0 * kPanel;
  const float* r = ep.res ? ep.res + m * ep.ldr + a.n0 : nullptr;
  float* ym = a.y + m * a.N + a.n0;
  tile<R>(xm, ldx, a.kc, wk, a.b, a.ncols < 16 ? a.ncols : 16, a.first, a.last, ep, r, ym, a.N);
  if (a.ncols > 16)
    tile<R>(xm, ldx, a.kc, wk + 16, a.b ? a.b + 16 : nullptr, a.ncols - 16, a.first, a.last, ep,
            r ? r + 16 : nullptr, ym + 16, a.N);
}

}  // namespace
}  // namespace aimass::runtime::packed

#include "runtime/packed_gemm_blocked.h"

namespace aimass::runtime::packed {

void panels_ex_ld_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                       int64_t p0, int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  blocked_panels<6>(x, ldx, M, K, wp, bias_p, p0, p1, N, ep, y);
}
void panels_ex_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                    int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  blocked_panels<6>(x, K, M, K, wp, bias_p, p0, p1, N, ep, y);
}

// See packed_gemm.h. Two sets of four accumulators over consecutive k.
void gemv_walk_avx2(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                    bool reverse, float* y) {
  const int64_t PS = K * kPanel;
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t g = reverse ? p0 + p1 - 1 - i : i;
    const float* w = wp + g * PS;
    __m256 a[2][4];
    for (int u = 0; u < 2; ++u)
      for (int j = 0; j < 4; ++j) a[u][j] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 2 <= K; k += 2) {
#pragma GCC unroll 2
      for (int u = 0; u < 2; ++u) {
        const __m256 xb = _mm256_set1_ps(x[k + u]);
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) a[u][j] = _mm256_fmadd_ps(_mm256_load_ps(w + (k + u) * kPanel + 8 * j), xb, a[u][j]);
      }
    }
    for (; k < K; ++k) {
      const __m256 xb = _mm256_set1_ps(x[k]);
      for (int j = 0; j < 4; ++j) a[0][j] = _mm256_fmadd_ps(_mm256_load_ps(w + k * kPanel + 8 * j), xb, a[0][j]);
    }
    for (int j = 0; j < 4; ++j) {
      __m256 v = _mm256_add_ps(a[0][j], a[1][j]);
      if (bias_p) v = _mm256_add_ps(v, _mm256_load_ps(bias_p + g * kPanel + 8 * j));
      _mm256_storeu_ps(y + g * kPanel + 8 * j, v);
    }
  }
}

}  // namespace aimass::runtime::packed
