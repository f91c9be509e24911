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

using VT = vec::Avx512;
// Rows per register tile: 12 x 32 outputs = 24 of the 32 zmm registers accumulate, so each
// panel row loaded from L1 feeds 24 FMAs.
constexpr int kMr = 12;

inline __m512 epi_act(__m512 v, int act) {
  switch (act) {
    // max(0, v) returns its second operand when either is NaN: NaN stays NaN and -0
    // stays -0, exactly torch's relu (v < 0 ? 0 : v); max(v, 0) would turn NaN into 0
    case kEpiRelu: return _mm512_max_ps(_mm512_setzero_ps(), v);
    case kEpiGelu: return vec::vgelu<VT>(v);
    case kEpiGeluTanh: return vec::vgelu_tanh<VT>(v);
    default: return v;
  }
}

// One tile: MR rows x 32 columns (one panel, two registers), accumulated over kc values of k
// in registers. first: start from 0 (else from the partial sums in y); last: run the epilogue.
template <int MR>
inline void tile(const float* x, int64_t ldx, int64_t kc, const float* w, const float* b, int64_t ncols, bool first,
                 bool last, const Epilogue& ep, const float* res, float* y, int64_t N) {
  // KU independent accumulator sets over consecutive k: with few rows the FMA latency,
  // not the load or FMA throughput, would bound the loop.
  constexpr int KU = MR == 1 ? 4 : MR <= 2 ? 2 : 1;
  const __mmask16 m0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 m1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols > 16 ? __mmask16((1u << (ncols - 16)) - 1) : 0;
  __m512 a0[KU][MR], a1[KU][MR];
#pragma GCC unroll 4
  for (int u = 0; u < KU; ++u)
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) a0[u][m] = a1[u][m] = _mm512_setzero_ps();
  if (!first) {
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      a0[0][m] = _mm512_maskz_loadu_ps(m0, y + m * N);
      a1[0][m] = _mm512_maskz_loadu_ps(m1, y + m * N + 16);
    }
  }
  int64_t k = 0;
  // Four k steps a trip (MLAS's SGEMM unrolls its k loop by 4 too): the loop's pointer reload and
  // branch are amortized; 12 x 32 tiles at BERT-base's shapes +2-2.5 % (cold weights, one core,
  // 5 alternating runs on a loaded VM). Same FMAs in the same order: the bits do not change.
#pragma GCC unroll 4
  for (; k + KU <= kc; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m512 w0 = _mm512_load_ps(w + (k + u) * kPanel), w1 = _mm512_load_ps(w + (k + u) * kPanel + 16);
#pragma GCC unroll 12
      for (int m = 0; m < MR; ++m) {
        const __m512 xb = _mm512_set1_ps(x[m * ldx + k + u]);
        a0[u][m] = _mm512_fmadd_ps(w0, xb, a0[u][m]);
        a1[u][m] = _mm512_fmadd_ps(w1, xb, a1[u][m]);
      }
    }
  }
  for (; k < kc; ++k) {
    const __m512 w0 = _mm512_load_ps(w + k * kPanel), w1 = _mm512_load_ps(w + k * kPanel + 16);
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      const __m512 xb = _mm512_set1_ps(x[m * ldx + k]);
      a0[0][m] = _mm512_fmadd_ps(w0, xb, a0[0][m]);
      a1[0][m] = _mm512_fmadd_ps(w1, xb, a1[0][m]);
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < KU; ++u)
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      a0[0][m] = _mm512_add_ps(a0[0][m], a0[u][m]);
      a1[0][m] = _mm512_add_ps(a1[0][m], a1[u][m]);
    }
  if (!last) {
#pragma GCC unroll 12
    for (int m = 0; m < MR; ++m) {
      _mm512_mask_storeu_ps(y + m * N, m0, a0[0][m]);
      _mm512_mask_storeu_ps(y + m * N + 16, m1, a1[0][m]);
    }
    return;
  }
  const __m512 b0 = b ? _mm512_load_ps(b) : _mm512_setzero_ps(), b1 = b ? _mm512_load_ps(b + 16) : _mm512_setzero_ps();
#pragma GCC unroll 12
  for (int m = 0; m < MR; ++m) {
    __m512 v0 = epi_act(_mm512_add_ps(a0[0][m], b0), ep.act), v1 = epi_act(_mm512_add_ps(a1[0][m], b1), ep.act);
    if (res) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(m0, res + m * ep.ldr));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(m1, res + m * ep.ldr + 16));
    }
    _mm512_mask_storeu_ps(y + m * N, m0, v0);
    _mm512_mask_storeu_ps(y + m * N + 16, m1, v1);
  }
}

template <int R>
inline void tile_at(const TileArgs& a, int64_t m) {
  const Epilogue& ep = *a.ep;
  tile<R>(a.xt ? a.xt : a.x + m * a.ldx + a.k0, a.xt ? a.ldt : a.ldx, a.kc, a.w + a.k0 * kPanel, a.b, a.ncols,
          a.first, a.last, ep,
          ep.res ? ep.res + m * ep.ldr + a.n0 : nullptr, a.y + m * a.N + a.n0, a.N);
}

}  // namespace
}  // namespace aimass::runtime::packed

#include "runtime/packed_gemm_blocked.h"

namespace aimass::runtime::packed {

void panels_ex_ld_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                         int64_t p0, int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  blocked_panels<kMr>(x, ldx, M, K, wp, bias_p, p0, p1, N, ep, y);
}
void panels_ex_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                      int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  blocked_panels<kMr>(x, K, M, K, wp, bias_p, p0, p1, N, ep, y);
}

namespace {
// NS panels at once (NS weight streams), KU consecutive k-rows unrolled with their own
// accumulators (a single chain would be bound by the FMA latency).
template <int NS, int KU>
void walk_n(const float* x, int64_t K, const float* wp, const float* bias_p, const int64_t* g, float* y) {
  const int64_t PS = K * kPanel;  // floats per panel
  const float* w[NS];
  for (int s = 0; s < NS; ++s) w[s] = wp + g[s] * PS;
  __m512 a[KU][2 * NS];
  for (int u = 0; u < KU; ++u)
    for (int j = 0; j < 2 * NS; ++j) a[u][j] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + KU <= K; k += KU) {
#pragma GCC unroll 4
    for (int u = 0; u < KU; ++u) {
      const __m512 xb = _mm512_set1_ps(x[k + u]);
#pragma GCC unroll 4
      for (int s = 0; s < NS; ++s) {
        a[u][2 * s] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + (k + u) * kPanel), xb, a[u][2 * s]);
        a[u][2 * s + 1] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + (k + u) * kPanel + 16), xb, a[u][2 * s + 1]);
      }
    }
  }
  for (; k < K; ++k) {
    const __m512 xb = _mm512_set1_ps(x[k]);
    for (int s = 0; s < NS; ++s) {
      a[0][2 * s] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + k * kPanel), xb, a[0][2 * s]);
      a[0][2 * s + 1] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + k * kPanel + 16), xb, a[0][2 * s + 1]);
    }
  }
  for (int j = 0; j < 2 * NS; ++j) {
    __m512 v = a[0][j];
    for (int u = 1; u < KU; ++u) v = _mm512_add_ps(v, a[u][j]);
    const int64_t col = g[j / 2] * kPanel + (j & 1) * 16;
    if (bias_p) v = _mm512_add_ps(v, _mm512_load_ps(bias_p + col));
    _mm512_storeu_ps(y + col, v);
  }
}
// kWalkRows rows of xr times V's panel row k into the 8 x 32 tile c.
inline void v_row(const float* v, const float* xr, int64_t Kv, int64_t k, __m512 (&c)[kWalkRows][2]) {
  const __m512 v0 = _mm512_load_ps(v + k * kPanel), v1 = _mm512_load_ps(v + k * kPanel + 16);
#pragma GCC unroll 8
  for (int r = 0; r < kWalkRows; ++r) {
    const __m512 xrb = _mm512_set1_ps(xr[r * Kv + k]);
    c[r][0] = _mm512_fmadd_ps(v0, xrb, c[r][0]);
    c[r][1] = _mm512_fmadd_ps(v1, xrb, c[r][1]);
  }
}

void store_v_tile(const __m512 (&c)[kWalkRows][2], const float* bq, int64_t q, float* out, int64_t ldo) {
  for (int r = 0; r < kWalkRows; ++r)
    for (int h = 0; h < 2; ++h) {
      __m512 t = c[r][h];
      const int64_t col = q * kPanel + h * 16;
      if (bq) t = _mm512_add_ps(t, _mm512_load_ps(bq + col));
      _mm512_storeu_ps(out + r * ldo + col, t);
    }
}

// walk_n<4, 1> over the W panels g[0..3] and, in the same k loop, the kWalkRows x 32 tile of
// V panel q (16 more accumulators: 24 of 32 zmm). The W sums are walk_n<4, 1>'s, in its order;
// where K != Kv the longer one finishes alone.
void walk4_gemm(const float* x, int64_t K, const float* wp, const float* bias_p, const int64_t* g, float* y,
                const float* xr, int64_t Kv, const float* vp, const float* bq, int64_t q, float* out, int64_t ldo) {
  const int64_t PS = K * kPanel;
  const float* w[4];
  for (int s = 0; s < 4; ++s) w[s] = wp + g[s] * PS;
  const float* v = vp + q * Kv * kPanel;
  __m512 a[8], c[kWalkRows][2];
  for (int j = 0; j < 8; ++j) a[j] = _mm512_setzero_ps();
  for (int r = 0; r < kWalkRows; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  auto w_row = [&](int64_t k) {
    const __m512 xb = _mm512_set1_ps(x[k]);
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      a[2 * s] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + k * kPanel), xb, a[2 * s]);
      a[2 * s + 1] = _mm512_fmadd_ps(_mm512_load_ps(w[s] + k * kPanel + 16), xb, a[2 * s + 1]);
    }
  };
  const int64_t Kc = K < Kv ? K : Kv;
  int64_t k = 0;
  for (; k < Kc; ++k) {
    w_row(k);
    v_row(v, xr, Kv, k, c);
  }
  for (int64_t kw = k; kw < K; ++kw) w_row(kw);
  for (int64_t kv = k; kv < Kv; ++kv) v_row(v, xr, Kv, kv, c);
  for (int s = 0; s < 4; ++s)
    for (int h = 0; h < 2; ++h) {
      __m512 t = a[2 * s + h];
      const int64_t col = g[s] * kPanel + h * 16;
      if (bias_p) t = _mm512_add_ps(t, _mm512_load_ps(bias_p + col));
      _mm512_storeu_ps(y + col, t);
    }
  store_v_tile(c, bq, q, out, ldo);
}

// The V tile alone (V panels that found no group of four W panels to ride along).
void gemm_rows(const float* xr, int64_t Kv, const float* vp, const float* bq, int64_t q, float* out, int64_t ldo) {
  const float* v = vp + q * Kv * kPanel;
  __m512 c[kWalkRows][2];
  for (int r = 0; r < kWalkRows; ++r) c[r][0] = c[r][1] = _mm512_setzero_ps();
  for (int64_t k = 0; k < Kv; ++k) v_row(v, xr, Kv, k, c);
  store_v_tile(c, bq, q, out, ldo);
}
}  // namespace

// See packed_gemm.h: gemv_walk_avx512's groups, a V panel with each group of four.
void gemv_walk_gemm_avx512(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                           bool reverse, float* y, const float* xr, int64_t Kv, const float* vp, const float* bq,
                           int64_t q0, int64_t q1, float* out, int64_t ldo) {
  int64_t i = p0, q = q0;
  for (; i < p1;) {
    int64_t g[4];
    const int ns = p1 - i >= 4 ? 4 : 1;
    for (int s = 0; s < ns; ++s) g[s] = reverse ? p0 + p1 - 1 - (i + s) : i + s;
    if (ns == 4 && q < q1) walk4_gemm(x, K, wp, bias_p, g, y, xr, Kv, vp, bq, q++, out, ldo);
    else if (ns == 4) walk_n<4, 1>(x, K, wp, bias_p, g, y);
    else walk_n<1, 4>(x, K, wp, bias_p, g, y);
    i += ns;
  }
  for (; q < q1; ++q) gemm_rows(xr, Kv, vp, bq, q, out, ldo);
}

// See packed_gemm.h. Four panels at a time, in walk order: four weight streams instead of one
// kept more of an L3-bound step in flight (LSTM 2x512 batch 1 on AMD EPYC with 1 MiB L2: 2-3%
// less time a run than one panel at a time; eight streams were slower again). No software
// prefetch: 1-16 KiB ahead made a run 6-15% slower there.
void gemv_walk_avx512(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                      bool reverse, float* y) {
  int64_t i = p0;
  for (; i < p1;) {
    int64_t g[4];
    const int ns = p1 - i >= 4 ? 4 : 1;
    for (int s = 0; s < ns; ++s) g[s] = reverse ? p0 + p1 - 1 - (i + s) : i + s;
    if (ns == 4) walk_n<4, 1>(x, K, wp, bias_p, g, y);
    else walk_n<1, 4>(x, K, wp, bias_p, g, y);
    i += ns;
  }
}

}  // namespace aimass::runtime::packed
