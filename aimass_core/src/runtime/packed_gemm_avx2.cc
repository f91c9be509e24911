// GCC 12 flags the setzero intrinsics themselves (a known false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wunused-function"  // vec_kernels_impl.h's table bodies
#include <immintrin.h>

#include "runtime/packed_gemm.h"
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
template <int MR>
inline void tile_panel(const float* x, int64_t m, int64_t K, int64_t k0, int64_t kc, const float* w, const float* b,
                       int64_t n0, int64_t ncols, bool first, bool last, const Epilogue& ep, float* y, int64_t N) {
  const float* xm = x + m * K + k0;
  const float* wk = w + k0 * kPanel;
  const float* r = ep.res ? ep.res + m * ep.ldr + n0 : nullptr;
  float* ym = y + m * N + n0;
  tile<MR>(xm, K, kc, wk, b, ncols < 16 ? ncols : 16, first, last, ep, r, ym, N);
  if (ncols > 16)
    tile<MR>(xm, K, kc, wk + 16, b ? b + 16 : nullptr, ncols - 16, first, last, ep, r ? r + 16 : nullptr, ym + 16,
             N);
}

}  // namespace

void panels_ex_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                    int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  for (int64_t q0 = p0; q0 < p1; q0 += kNb) {
  const int64_t q1 = q0 + kNb < p1 ? q0 + kNb : p1;
  const int64_t mc = pick_mc(M, (q1 - q0) * kPanel);
  for (int64_t mb = 0; mb < M; mb += mc) {
    const int64_t me = mb + mc < M ? mb + mc : M;
    // One row tile per panel (a GEMV-like batch): nothing reuses a K block, so no K blocking.
    const int64_t kcb = me - mb <= 6 ? (K > 0 ? K : 1) : kKc;
    for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kcb) {
      const int64_t kc = K - k0 < kcb ? K - k0 : kcb;
      const bool first = k0 == 0, last = k0 + kc >= K;
      for (int64_t p = q0; p < q1; ++p) {
        const float* w = wp + p * K * kPanel;
        const float* b = bias_p ? bias_p + p * kPanel : nullptr;
        const int64_t n0 = p * kPanel, ncols = N - n0 < kPanel ? N - n0 : kPanel;
        // The next panel's weight block (same K block) is pulled into L2 a slice per row
        // tile, so its first tile does not wait on memory.
        const float* nxt = p + 1 < q1 ? wp + (p + 1) * K * kPanel + k0 * kPanel : nullptr;
        const int64_t nxt_lines = nxt ? kc * 2 : 0;
        const int64_t per_tile = (nxt_lines * 6 + (me - mb) - 1) / ((me - mb) > 0 ? (me - mb) : 1);
        int64_t pf = 0;
        auto prefetch = [&]() {
          for (int64_t e = pf + per_tile < nxt_lines ? pf + per_tile : nxt_lines; pf < e; ++pf)
            _mm_prefetch(reinterpret_cast<const char*>(nxt + pf * 16), _MM_HINT_T1);
        };
        int64_t m = mb;
        for (; m + 6 <= me; m += 6) {
          prefetch();
          tile_panel<6>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N);
        }
        switch (me - m) {
          case 5: tile_panel<5>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N); break;
          case 4: tile_panel<4>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N); break;
          case 3: tile_panel<3>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N); break;
          case 2: tile_panel<2>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N); break;
          case 1: tile_panel<1>(x, m, K, k0, kc, w, b, n0, ncols, first, last, ep, y, N); break;
          default: break;
        }
      }
      if (K == 0) break;
    }
  }
  }
}

}  // namespace aimass::runtime::packed
