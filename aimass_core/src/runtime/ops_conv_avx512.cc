// AVX-512 conv tile (ops_conv.h): kMR = 8 rows x kNR = 32 columns in 16 zmm accumulators.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "runtime/ops_conv.h"
#include "env_switch.h"

namespace aimass::runtime::conv {

namespace {

constexpr int64_t kPrefetchOutTaps = 16;
// AIMASS_CONV_TAIL=0 (read once): <= 8-column tails on the half tile, 17..20 on the full one (A/B runs)
inline bool tail_enabled() {
  static const bool on = env_switch_on("AIMASS_CONV_TAIL");
  return on;
}  // a tile this long hides its output lines' misses

// The tile's epilogue: (+ c when accumulating), + bias, + residual, ReLU, masked stores of the
// mvalid x ncols tile.
inline void epilogue(const __m512 (&c0)[8], const __m512 (&c1)[8], float* c, int64_t ldc, int64_t mvalid,
                     int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu) {
  const __mmask16 k0 = ncols >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << ncols) - 1);
  const __mmask16 k1 = ncols >= 32 ? __mmask16(0xFFFF) : ncols > 16 ? __mmask16((1u << (ncols - 16)) - 1) : 0;
  const __m512 zero = _mm512_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) {
    if (m >= mvalid) break;
    float* cr = c + m * ldc;
    __m512 v0 = c0[m], v1 = c1[m];
    if (accumulate) {
      v0 = _mm512_add_ps(_mm512_maskz_loadu_ps(k0, cr), v0);
      v1 = _mm512_add_ps(_mm512_maskz_loadu_ps(k1, cr + 16), v1);
    }
    if (bias) {
      const __m512 bv = _mm512_set1_ps(bias[m]);
      v0 = _mm512_add_ps(v0, bv);
      v1 = _mm512_add_ps(v1, bv);
    }
    if (res) {
      v0 = _mm512_add_ps(v0, _mm512_maskz_loadu_ps(k0, res + m * ldc));
      v1 = _mm512_add_ps(v1, _mm512_maskz_loadu_ps(k1, res + m * ldc + 16));
    }
    if (relu) {  // max(0, v) returns v when v is NaN: torch keeps NaN
      v0 = _mm512_max_ps(zero, v0);
      v1 = _mm512_max_ps(zero, v1);
    }
    _mm512_mask_storeu_ps(cr, k0, v0);
    _mm512_mask_storeu_ps(cr + 16, k1, v1);
  }
}

// One tap of the 8 x 32 product: c{0,1}[m] += a[m] * b{0,1} (kHalf: c0 only).
template <bool kHalf>
inline void fma_tap(const float* ak, __m512 b0, __m512 b1, __m512 (&c0)[8], __m512 (&c1)[8]) {
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) {
    const __m512 av = _mm512_set1_ps(ak[m]);
    c0[m] = _mm512_fmadd_ps(av, b0, c0[m]);
    if (!kHalf) c1[m] = _mm512_fmadd_ps(av, b1, c1[m]);
  }
}

// step(k) for k in [0, kc), two taps per iteration: the weights stream sequentially through a
// K-slice's row blocks (slice-major packing), so one line is requested kPfA floats (2 KiB) ahead per
// two taps of 8 floats, not per tap, and a large layer's weights arrive from L3/DRAM in time.
template <class Step>
inline void for_taps(int64_t kc, const float* a, Step&& step) {
  constexpr int64_t kPfA = 512;
  int64_t k = 0;
  for (; k + 2 <= kc; k += 2) {
    _mm_prefetch(reinterpret_cast<const char*>(a + k * kMR + kPfA), _MM_HINT_T0);
    step(k);
    step(k + 1);
  }
  if (k < kc) step(k);
}

// The 8 x 32 product over kc taps: B row k at b + k * ldb (a packed panel: ldb = kNR, aligned;
// in place: any ldb, unaligned, optionally prefetched kPf rows ahead). kHalf: columns 0..15 only
// (a panel's tail of <= 16 pixels, e.g. 196 = 6 x 32 + 4 at 14x14, batch 1), c1 stays 0.
template <bool kPacked, bool kStream, bool kHalf = false>
inline void tile_core(int64_t kc, const float* a, const float* b, int64_t ldb, __m512 (&c0)[8], __m512 (&c1)[8]) {
  constexpr int64_t kPf = 32;  // rows ahead in the stream: ~8 cycles a row, DRAM ~100 ns away
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
  auto step = [&](int64_t k) {
    const float* bk = b + k * (kPacked ? kNR : ldb);
    if (kStream && k + kPf < kc) {
      _mm_prefetch(reinterpret_cast<const char*>(bk + kPf * ldb), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(bk + kPf * ldb + kNR - 1), _MM_HINT_T0);
    }
    const __m512 b0 = kPacked ? _mm512_load_ps(bk) : _mm512_loadu_ps(bk);
    const __m512 b1 = kHalf ? _mm512_setzero_ps() : kPacked ? _mm512_load_ps(bk + 16) : _mm512_loadu_ps(bk + 16);
    fma_tap<kHalf>(a + k * kMR, b0, b1, c0, c1);
  };
  for_taps(kc, a, step);
}

// The tile's output (and residual) lines, requested before its k-loop so their misses overlap the
// products: a small-K layer (ResNet-50's 64 -> 256 1x1 at 56x56, 64 taps) spent a quarter of
// its time in the epilogue's stores waiting for the lines of a 25 MiB output.
inline void prefetch_out(const float* c, int64_t ldc, int64_t mvalid, int64_t ncols, const float* res) {
  for (int64_t m = 0; m < mvalid; ++m) {
    _mm_prefetch(reinterpret_cast<const char*>(c + m * ldc), _MM_HINT_ET0);
    _mm_prefetch(reinterpret_cast<const char*>(c + m * ldc + ncols - 1), _MM_HINT_ET0);
    if (res) {
      _mm_prefetch(reinterpret_cast<const char*>(res + m * ldc), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(res + m * ldc + ncols - 1), _MM_HINT_T0);
    }
  }
}

// A packed panel's tail of 16 + R columns (R <= kTailMax): columns 0..15 as the half tile, columns
// 16..16+R-1 as R ymm accumulators with the 8 rows in lanes (the tap's 8 weights are one ymm, each
// extra column's B value a broadcast). 8 zmm + R ymm FMAs per tap instead of the full tile's 16 zmm:
// a 7x7 plane at batch 1 is 49 = 32 + 17 pixels, and a 14x14 plane's 49 Winograd tiles the same.
constexpr int kTailMax = 4;

template <int R>
inline void tile_core_tail(int64_t kc, const float* a, const float* b, __m512 (&c0)[8], __m256 (&e)[R]) {
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) c0[m] = _mm512_setzero_ps();
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) e[i] = _mm256_setzero_ps();
  auto step = [&](int64_t k) {
    const float* bk = b + k * kNR;
    const __m512 b0 = _mm512_load_ps(bk);
    const __m256 ar = _mm256_load_ps(a + k * kMR);  // the packed weights are 32-byte aligned per tap
    fma_tap<true>(a + k * kMR, b0, b0, c0, c0);
#pragma GCC unroll 4
    for (int i = 0; i < R; ++i) e[i] = _mm256_fmadd_ps(ar, _mm256_broadcast_ss(bk + 16 + i), e[i]);
  };
  for_taps(kc, a, step);
}

// The extra columns' epilogue, in the order of `epilogue`: (c +) sum, + bias, + residual, ReLU.
template <int R>
inline void epilogue_tail(const __m256 (&e)[R], float* c, int64_t ldc, int64_t mvalid, bool accumulate,
                          const float* bias, const float* res, bool relu) {
  alignas(32) float t[R][8];
#pragma GCC unroll 4
  for (int i = 0; i < R; ++i) _mm256_store_ps(t[i], e[i]);
  for (int64_t m = 0; m < mvalid; ++m) {
    float* cr = c + m * ldc + 16;
    for (int i = 0; i < R; ++i) {
      float v = t[i][m];
      if (accumulate) v = cr[i] + v;
      if (bias) v += bias[m];
      if (res) v += res[m * ldc + 16 + i];
      if (relu) v = v < 0.f ? 0.f : v;  // NaN kept (the compare is false)
      cr[i] = v;
    }
  }
}

template <int R>
inline void tile_tail(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid,
                      bool accumulate, const float* bias, const float* res, bool relu) {
  __m512 c0[8];
  __m256 e[R];
  tile_core_tail<R>(kc, a, b, c0, e);
  epilogue(c0, c0, c, ldc, mvalid, 16, accumulate, bias, res, relu);
  epilogue_tail<R>(e, c, ldc, mvalid, accumulate, bias, res, relu);
}

// A packed panel's tail of <= 8 columns as 8 ymm accumulators: 8 ymm FMAs per tap where the half tile
// issues 8 zmm (a core with two 256-bit FMA pipes runs them in half the time). 196 = 6 x 32 + 4: a 14x14
// plane at batch 1, a 28x28 plane's Winograd tiles; 392 = 12 x 32 + 8: a 7x7 plane at batch 8.
inline void tile_quarter(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid,
                         int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu) {
  __m256 q[8];
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) q[m] = _mm256_setzero_ps();
  auto step = [&](int64_t k) {
    const __m256 bk = _mm256_load_ps(b + k * kNR);
    const float* ak = a + k * kMR;
#pragma GCC unroll 8
    for (int m = 0; m < 8; ++m) q[m] = _mm256_fmadd_ps(_mm256_set1_ps(ak[m]), bk, q[m]);
  };
  for_taps(kc, a, step);
  // the epilogue of `epilogue` on 8 columns
  const __mmask8 km = static_cast<__mmask8>((1u << ncols) - 1);
  const __m256 zero = _mm256_setzero_ps();
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) {
    if (m >= mvalid) break;
    float* cr = c + m * ldc;
    __m256 v = q[m];
    if (accumulate) v = _mm256_add_ps(_mm256_maskz_loadu_ps(km, cr), v);
    if (bias) v = _mm256_add_ps(v, _mm256_set1_ps(bias[m]));
    if (res) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(km, res + m * ldc));
    if (relu) v = _mm256_max_ps(zero, v);  // v when NaN
    _mm256_mask_storeu_ps(cr, km, v);
  }
}

}  // namespace

void tile_avx512(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
                 bool accumulate, const float* bias, const float* res, bool relu) {
  static_assert(kMR == 8 && kNR == 32, "the tile is written for 8 x 32");
  __m512 c0[8], c1[8];
  if (kc >= kPrefetchOutTaps) prefetch_out(c, ldc, mvalid, ncols, res);
  if (ncols <= 8 && tail_enabled()) return tile_quarter(kc, a, b, c, ldc, mvalid, ncols, accumulate, bias, res, relu);
  if (ncols > 16 && ncols <= 16 + kTailMax && tail_enabled()) {
    switch (ncols - 16) {
      case 1: return tile_tail<1>(kc, a, b, c, ldc, mvalid, accumulate, bias, res, relu);
      case 2: return tile_tail<2>(kc, a, b, c, ldc, mvalid, accumulate, bias, res, relu);
      case 3: return tile_tail<3>(kc, a, b, c, ldc, mvalid, accumulate, bias, res, relu);
      default: return tile_tail<4>(kc, a, b, c, ldc, mvalid, accumulate, bias, res, relu);
    }
  }
  if (ncols <= 16)
    tile_core<true, false, true>(kc, a, b, kNR, c0, c1);
  else
    tile_core<true, false>(kc, a, b, kNR, c0, c1);
  epilogue(c0, c1, c, ldc, mvalid, ncols, accumulate, bias, res, relu);
}

void tile_ld_avx512(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t mvalid,
                    int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu, bool stream,
                    bool prefetch_c) {
  __m512 c0[8], c1[8];
  if (prefetch_c && kc >= kPrefetchOutTaps) prefetch_out(c, ldc, mvalid, ncols, res);
  if (stream)
    tile_core<false, true>(kc, a, b, ldb, c0, c1);
  else
    tile_core<false, false>(kc, a, b, ldb, c0, c1);
  epilogue(c0, c1, c, ldc, mvalid, ncols, accumulate, bias, res, relu);
}

namespace {

constexpr int64_t kPrefetchTaps = 8;  // packer: how many taps (channels) ahead to prefetch

// Lanes [lo, hi) of 16 (clipped).
inline __mmask16 lanes(int64_t lo, int64_t hi) {
  lo = lo < 0 ? 0 : lo;
  hi = hi > 16 ? 16 : hi;
  if (hi <= lo) return 0;
  return static_cast<__mmask16>(((1u << (hi - lo)) - 1u) << lo);
}

// 16 outputs i = 0..15 of srow[i * SW] for the lanes [lo, hi) (0 <= lo < hi <= 16); the
// other lanes are 0 and their addresses are never read.
inline __m512 load_strided(const float* srow, int64_t SW, int64_t lo, int64_t hi) {
  const __mmask16 in = lanes(lo, hi);
  if (SW == 1) return _mm512_maskz_loadu_ps(in, srow);
  if (SW == 2) {
    // lane l reads element 2l of srow[0..32): the even bits of [2 lo, 2 hi)
    const uint64_t m32 = (((uint64_t{1} << (2 * hi)) - 1) & ~((uint64_t{1} << (2 * lo)) - 1)) & 0x55555555u;
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m32), srow);
    const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m32 >> 16), srow + 16);
    const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    return _mm512_permutex2var_ps(a, idx, b);
  }
  const __m512i idx = _mm512_mullo_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                         _mm512_set1_epi32(static_cast<int>(SW)));
  return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), in, idx, srow, 4);
}

}  // namespace

void pack_avx512(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t k0, int64_t kc,
                 float* dst) {
  const int64_t HW = s.H * s.W;
  int64_t c = k0 / (s.KH * s.KW), kh = (k0 / s.KW) % s.KH, kw = k0 % s.KW;
  const __m512 zero = _mm512_setzero_ps();
  if (runs.pointwise) {
    for (int64_t t = 0; t < kc; ++t, ++c) {
      float* d = dst + t * kNR;
      _mm512_store_ps(d, zero);
      _mm512_store_ps(d + 16, zero);
      for (int ri = 0; ri < runs.n; ++ri) {
        const PanelRuns::Run& r = runs.r[ri];
        const float* src = x + r.base + c * HW + r.oh * s.OW + r.ow;
        if (c + kPrefetchTaps < s.C) {
          // channels are HW apart: too many streams for the hardware prefetcher
          _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchTaps * HW), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(src + kPrefetchTaps * HW + r.len - 1), _MM_HINT_T0);
        }
        for (int64_t i = 0; i < r.len; i += 16) {
          const __mmask16 m = lanes(0, r.len - i);
          _mm512_mask_storeu_ps(d + r.j + i, m, _mm512_maskz_loadu_ps(m, src + i));
        }
      }
    }
    return;
  }
  // Per run, what depends on kh only (the input row, or -1 when outside the image) and
  // on kw only (the column offset and the in-bounds lanes of its <= 2 chunks of 16), so
  // the tap loop is loads and stores.
  constexpr int kMaxK = 16;  // taps per dim handled by the tables; larger kernels take the scalar packer
  if (s.KH > kMaxK || s.KW > kMaxK) {
    pack_scalar(x, s, runs, k0, kc, dst);
    return;
  }
  struct RunTab {
    int64_t row[kMaxK];  // input row offset per kh, -1 outside the image
    int64_t col[kMaxK];  // first input column per kw (may be negative: padding)
    __mmask16 m[kMaxK][2];     // in-bounds lanes of the run's two 16-column chunks per kw
    int64_t lo[kMaxK][2], hi[kMaxK][2];
    __mmask16 s2[kMaxK][2][2];  // stride 2: the masks of each chunk's two 16-float loads (load_strided)
  };
  RunTab tab[kNR];
  for (int ri = 0; ri < runs.n; ++ri) {
    const PanelRuns::Run& r = runs.r[ri];
    RunTab& tb = tab[ri];
    for (int64_t h = 0; h < s.KH; ++h) {
      const int64_t ih = r.oh * s.SH - s.PH + h * s.DH;
      tb.row[h] = (ih < 0 || ih >= s.H) ? -1 : ih * s.W;
    }
    for (int64_t w = 0; w < s.KW; ++w) {
      const int64_t first = r.ow * s.SW - s.PW + w * s.DW;
      int64_t i0 = first >= 0 ? 0 : (-first + s.SW - 1) / s.SW;
      int64_t i1 = first >= s.W ? 0 : (s.W - 1 - first) / s.SW + 1;
      i0 = i0 < r.len ? i0 : r.len;
      i1 = i1 < r.len ? i1 : r.len;
      if (i1 < i0) i1 = i0;
      tb.col[w] = first;
      for (int ch = 0; ch < 2; ++ch) {
        const int64_t lo = i0 - 16 * ch, hi = i1 - 16 * ch;
        tb.lo[w][ch] = lo < 0 ? 0 : lo > 16 ? 16 : lo;
        tb.hi[w][ch] = hi < 0 ? 0 : hi > 16 ? 16 : hi;
        tb.m[w][ch] = lanes(tb.lo[w][ch], tb.hi[w][ch]);
        const int64_t l = tb.lo[w][ch], h = tb.hi[w][ch];
        const uint64_t m32 = h <= l ? 0 : (((uint64_t{1} << (2 * h)) - 1) & ~((uint64_t{1} << (2 * l)) - 1)) & 0x55555555u;
        tb.s2[w][ch][0] = static_cast<__mmask16>(m32);
        tb.s2[w][ch][1] = static_cast<__mmask16>(m32 >> 16);
      }
    }
  }
  // prefetch: per run, the input columns its taps of one row read (kw = 0 .. KW-1), and how
  // many channels ahead (~kPrefetchTaps taps)
  const int64_t pf_ch = std::max<int64_t>(1, kPrefetchTaps / (s.KH * s.KW));
  int64_t span[kNR];
  for (int ri = 0; ri < runs.n; ++ri) span[ri] = (runs.r[ri].len - 1) * s.SW + (s.KW - 1) * s.DW + 1;
  auto next_tap = [&] {
    if (++kw == s.KW) {
      kw = 0;
      if (++kh == s.KH) {
        kh = 0;
        ++c;
      }
    }
  };
  for (int64_t t = 0; t < kc; ++t, next_tap()) {
    float* d = dst + t * kNR;
    _mm512_store_ps(d, zero);
    _mm512_store_ps(d + 16, zero);
    const float* plane_c = x + c * HW;
    const bool pf = kw == 0 && c + pf_ch < s.C;
    for (int ri = 0; ri < runs.n; ++ri) {
      const RunTab& tb = tab[ri];
      if (tb.row[kh] < 0) continue;  // zeros already
      const PanelRuns::Run& r = runs.r[ri];
      const float* srow = plane_c + r.base + tb.row[kh] + tb.col[kw];
      if (pf) {  // this row of a channel pf_ch ahead: the cache lines of the run's whole span
        const float* p = srow + pf_ch * HW;
        for (int64_t o = 0; o < span[ri]; o += 16) _mm_prefetch(reinterpret_cast<const char*>(p + o), _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(p + span[ri] - 1), _MM_HINT_T0);
      }
      float* dj = d + r.j;
      if (s.SW == 1) {
        // the common case, a masked load and store per chunk: masked lanes read nothing and keep the zeros
        const __mmask16 m0 = tb.m[kw][0], m1 = tb.m[kw][1];
        _mm512_mask_storeu_ps(dj, m0, _mm512_maskz_loadu_ps(m0, srow));
        if (m1) _mm512_mask_storeu_ps(dj + 16, m1, _mm512_maskz_loadu_ps(m1, srow + 16));
        continue;
      }
      if (s.SW == 2) {  // two masked loads and a permute per chunk, the masks from the table
        const __m512i idx = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
        for (int ch = 0; ch < 2; ++ch) {
          if (!tb.m[kw][ch]) continue;
          const float* p = srow + 32 * ch;
          const __m512 a = _mm512_maskz_loadu_ps(tb.s2[kw][ch][0], p);
          const __m512 b = _mm512_maskz_loadu_ps(tb.s2[kw][ch][1], p + 16);
          _mm512_mask_storeu_ps(dj + 16 * ch, tb.m[kw][ch], _mm512_permutex2var_ps(a, idx, b));
        }
        continue;
      }
      for (int ch = 0; ch < 2; ++ch) {
        const int64_t lo = tb.lo[kw][ch], hi = tb.hi[kw][ch];
        if (hi <= lo) continue;
        _mm512_mask_storeu_ps(dj + 16 * ch, tb.m[kw][ch], load_strided(srow + 16 * ch * s.SW, s.SW, lo, hi));
      }
    }
  }
}

}  // namespace aimass::runtime::conv

// ---- Winograd F(2x2, 3x3) transforms (ops_conv.h), 16 tiles of a run per vector ----
namespace aimass::runtime::conv {

namespace {

constexpr int64_t kWinoPfCh = 2;  // input transform: how many channels ahead to prefetch

// Lanes [lo, hi) of 16 for a load of 16 input columns starting at column cs of a W-wide row.
inline __mmask16 in_row(int64_t cs, int64_t W) { return lanes(-cs, W - cs); }

}  // namespace

void wino_in_avx512(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t c0, int64_t kc,
                    float* V) {
  const int64_t HW = s.H * s.W, xs = wino_vstride(kc);
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  const __m512 zero = _mm512_setzero_ps();
  // Chunks of <= 16 tiles of one run, with what does not depend on the channel: the input rows
  // of the patch (-1 outside the image), the first column and the in-image lanes of the four loads
  struct Chunk {
    int64_t base, row[4], cs, j;
    __mmask16 m[4], st;
    int64_t pf0, pf1;  // columns of the chunk's patch rows to prefetch
  };
  Chunk ch[kNR + 2];
  int nch = 0;
  for_chunks(runs, [&](const PanelRuns::Run& r, int64_t i0, int64_t L) {
    Chunk& c = ch[nch++];
    c.base = r.base;
    c.cs = 2 * (r.ow + i0) - s.PW;  // columns cs + 2i + b (b < 4) for lanes i < L: [0, 2L + 2) from cs
    c.j = r.j + i0;
    for (int a = 0; a < 4; ++a) {
      const int64_t ih = 2 * r.oh - s.PH + a;
      c.row[a] = ih < 0 || ih >= s.H ? -1 : ih * s.W;
    }
    c.m[0] = in_row(c.cs, s.W) & lanes(0, 2 * L + 2);
    c.m[1] = in_row(c.cs + 16, s.W) & lanes(0, 2 * L + 2 - 16);
    c.m[2] = in_row(c.cs + 2, s.W) & lanes(0, 2 * L);
    c.m[3] = in_row(c.cs + 18, s.W) & lanes(0, 2 * L - 16);
    c.st = lanes(0, L);
    c.pf0 = std::max<int64_t>(0, c.cs);
    c.pf1 = std::min<int64_t>(s.W - 1, c.cs + 2 * L + 1);
  });
  for (int64_t t = 0; t < kc; ++t) {
    float* vt = V + t * kNR;
    if (runs.nc < kNR)
      for (int xi = 0; xi < 16; ++xi) {
        _mm512_store_ps(vt + xi * xs, zero);
        _mm512_store_ps(vt + xi * xs + 16, zero);
      }
    const float* plane = x + (c0 + t) * HW;
    const bool pf = c0 + t + kWinoPfCh < s.C;
    for (int ci = 0; ci < nch; ++ci) {
      const Chunk& c = ch[ci];
      const float* pl = plane + c.base;
      __m512 d[4][4];
      for (int a = 0; a < 4; ++a) {
        if (c.row[a] < 0) {
          d[a][0] = d[a][1] = d[a][2] = d[a][3] = zero;
          continue;
        }
        const float* row = pl + c.row[a];
        if (pf) {  // this patch row a few channels ahead
          _mm_prefetch(reinterpret_cast<const char*>(row + kWinoPfCh * HW + c.pf0), _MM_HINT_T0);
          _mm_prefetch(reinterpret_cast<const char*>(row + kWinoPfCh * HW + c.pf1), _MM_HINT_T0);
        }
        const __m512 l0 = _mm512_maskz_loadu_ps(c.m[0], row + c.cs);
        const __m512 l1 = _mm512_maskz_loadu_ps(c.m[1], row + c.cs + 16);
        const __m512 l2 = _mm512_maskz_loadu_ps(c.m[2], row + c.cs + 2);
        const __m512 l3 = _mm512_maskz_loadu_ps(c.m[3], row + c.cs + 18);
        d[a][0] = _mm512_permutex2var_ps(l0, ev, l1);
        d[a][1] = _mm512_permutex2var_ps(l0, od, l1);
        d[a][2] = _mm512_permutex2var_ps(l2, ev, l3);
        d[a][3] = _mm512_permutex2var_ps(l2, od, l3);
      }
      __m512 e[4][4];  // B^T d
      for (int b = 0; b < 4; ++b) {
        e[0][b] = _mm512_sub_ps(d[0][b], d[2][b]);
        e[1][b] = _mm512_add_ps(d[1][b], d[2][b]);
        e[2][b] = _mm512_sub_ps(d[2][b], d[1][b]);
        e[3][b] = _mm512_sub_ps(d[1][b], d[3][b]);
      }
      float* vj = vt + c.j;
      for (int a = 0; a < 4; ++a) {  // (B^T d) B
        _mm512_mask_storeu_ps(vj + (4 * a + 0) * xs, c.st, _mm512_sub_ps(e[a][0], e[a][2]));
        _mm512_mask_storeu_ps(vj + (4 * a + 1) * xs, c.st, _mm512_add_ps(e[a][1], e[a][2]));
        _mm512_mask_storeu_ps(vj + (4 * a + 2) * xs, c.st, _mm512_sub_ps(e[a][2], e[a][1]));
        _mm512_mask_storeu_ps(vj + (4 * a + 3) * xs, c.st, _mm512_sub_ps(e[a][1], e[a][3]));
      }
    }
  }
}

void wino_out_avx512(const float* M, int64_t mxs, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t o0,
                     int64_t mo, const float* bias, const float* res, bool relu, float* y) {
  const int64_t P = s.OH * s.OW, CHW = s.C * s.H * s.W;
  // interleave two vectors of 16: (a0 b0 a1 b1 ...) lanes 0..7 and 8..15
  const __m512i ilo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i ihi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 zero = _mm512_setzero_ps();
  // Chunks of <= 16 tiles of one run: the output offset of their first pixel in channel 0 (-1 for
  // a second row past OH), their first column in M and the stores' column masks
  struct Chunk {
    int64_t off[2], j;
    __mmask16 k0, k1;
  };
  Chunk ch[kNR + 2];
  int nch = 0;
  for_chunks(runs, [&](const PanelRuns::Run& r, int64_t i0, int64_t L) {
    Chunk& c = ch[nch++];
    const int64_t ow0 = 2 * (r.ow + i0), ncol = std::min<int64_t>(2 * L, s.OW - ow0);
    for (int a = 0; a < 2; ++a) {
      const int64_t oh = 2 * r.oh + a;
      c.off[a] = oh < s.OH ? (r.base / CHW) * s.O * P + oh * s.OW + ow0 : -1;
    }
    c.j = r.j + i0;
    c.k0 = lanes(0, ncol);
    c.k1 = lanes(0, ncol - 16);
  });
  for (int64_t m = 0; m < mo; ++m) {
    const int64_t o = o0 + m;
    const __m512 bv = _mm512_set1_ps(bias ? bias[o] : 0.f);
    for (int ci = 0; ci < nch; ++ci) {
      const Chunk& c = ch[ci];
      const float* mj = M + m * kNR + c.j;
      __m512 v[16];
      for (int xi = 0; xi < 16; ++xi) v[xi] = _mm512_loadu_ps(mj + xi * mxs);
      __m512 q[2][4];  // A^T m
      for (int b = 0; b < 4; ++b) {
        q[0][b] = _mm512_add_ps(_mm512_add_ps(v[b], v[4 + b]), v[8 + b]);
        q[1][b] = _mm512_sub_ps(_mm512_sub_ps(v[4 + b], v[8 + b]), v[12 + b]);
      }
      for (int a = 0; a < 2; ++a) {
        if (c.off[a] < 0) break;
        const __m512 y0 = _mm512_add_ps(_mm512_add_ps(q[a][0], q[a][1]), q[a][2]);
        const __m512 y1 = _mm512_sub_ps(_mm512_sub_ps(q[a][1], q[a][2]), q[a][3]);
        __m512 lo = _mm512_add_ps(_mm512_permutex2var_ps(y0, ilo, y1), bv);
        __m512 hi = _mm512_add_ps(_mm512_permutex2var_ps(y0, ihi, y1), bv);
        const int64_t off = c.off[a] + o * P;
        if (res) {
          lo = _mm512_add_ps(lo, _mm512_maskz_loadu_ps(c.k0, res + off));
          hi = _mm512_add_ps(hi, _mm512_maskz_loadu_ps(c.k1, res + off + 16));
        }
        if (relu) {  // NaN stays NaN
          lo = _mm512_max_ps(zero, lo);
          hi = _mm512_max_ps(zero, hi);
        }
        _mm512_mask_storeu_ps(y + off, c.k0, lo);
        if (c.k1) _mm512_mask_storeu_ps(y + off + 16, c.k1, hi);
      }
    }
  }
}

}  // namespace aimass::runtime::conv

// ---- the phase-plane path's kernels (ops_conv.h) ----
namespace aimass::runtime::conv {

void phase_row_avx512(const float* src, int64_t W, int64_t PW, int64_t Wh, float* even, float* odd) {
  const __m512i ev = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i od = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t j = 0; j < Wh; j += 16) {  // Wh is a multiple of 16
    if (!src) {
      _mm512_storeu_ps(even + j, _mm512_setzero_ps());
      _mm512_storeu_ps(odd + j, _mm512_setzero_ps());
      continue;
    }
    // input columns [base, base + 32): the in-image ones, lanes [lo, hi)
    const int64_t base = 2 * j - PW;
    const int64_t lo = std::max<int64_t>(0, -base), hi = std::min<int64_t>(32, W - base);
    uint64_t m = 0;
    if (hi > lo) m = ((hi >= 64 ? ~uint64_t{0} : (uint64_t{1} << hi) - 1)) & ~((uint64_t{1} << lo) - 1);
    const __m512 a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), src + base);
    const __m512 b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), src + base + 16);
    _mm512_storeu_ps(even + j, _mm512_permutex2var_ps(a, ev, b));
    _mm512_storeu_ps(odd + j, _mm512_permutex2var_ps(a, od, b));
  }
}

namespace {
template <bool kHalf>
inline void tile_core_off(int64_t kc, const float* a, const float* b, const int32_t* off, __m512 (&c0)[8],
                          __m512 (&c1)[8]) {
#pragma GCC unroll 8
  for (int m = 0; m < 8; ++m) c0[m] = c1[m] = _mm512_setzero_ps();
#pragma GCC unroll 2
  for (int64_t k = 0; k < kc; ++k) {
    const float* bk = b + off[k];
    const __m512 b0 = _mm512_loadu_ps(bk);
    const __m512 b1 = kHalf ? _mm512_setzero_ps() : _mm512_loadu_ps(bk + 16);
    fma_tap<kHalf>(a + k * kMR, b0, b1, c0, c1);
  }
}
}  // namespace

void tile_off_avx512(int64_t kc, const float* a, const float* b, const int32_t* off, float* c, int64_t ldc,
                     int64_t mvalid, int64_t ncols, bool accumulate, const float* bias, const float* res,
                     bool relu) {
  __m512 c0[8], c1[8];
  if (kc >= kPrefetchOutTaps) prefetch_out(c, ldc, mvalid, ncols, res);
  if (ncols <= 16)
    tile_core_off<true>(kc, a, b, off, c0, c1);
  else
    tile_core_off<false>(kc, a, b, off, c0, c1);
  epilogue(c0, c1, c, ldc, mvalid, ncols, accumulate, bias, res, relu);
}

}  // namespace aimass::runtime::conv
