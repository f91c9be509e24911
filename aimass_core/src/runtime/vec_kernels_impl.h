// ISA-generic bodies of the vectorized runtime kernels (vec_kernels.h), included only
// by vec_kernels_avx2.cc and vec_kernels_avx512.cc, each compiled for its ISA. All of
// it lives in an anonymous namespace so the two translation units never share (and
// the linker never mixes) an instantiation compiled for the other ISA.
#pragma once
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "runtime/packed_gemm.h"
#include "runtime/vec_kernels.h"

namespace aimass::runtime::vec {
namespace {

struct Avx2 {
  static constexpr int W = 8;
  using V = __m256;
  using I = __m256i;
  using M = __m256;
  static V load(const float* p) { return _mm256_loadu_ps(p); }
  static void store(float* p, V v) { _mm256_storeu_ps(p, v); }
  static V set1(float v) { return _mm256_set1_ps(v); }
  static V add(V a, V b) { return _mm256_add_ps(a, b); }
  static V sub(V a, V b) { return _mm256_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm256_mul_ps(a, b); }
  static V div(V a, V b) { return _mm256_div_ps(a, b); }
  // 1 / a for finite a >= 1 (rcp + one Newton step: within 2 ulp; the divider's ~10x slower)
  static V recip(V a) {
    const V r = _mm256_rcp_ps(a);
    return _mm256_fmadd_ps(_mm256_fnmadd_ps(a, r, _mm256_set1_ps(1.f)), r, r);
  }
  static V fma(V a, V b, V c) { return _mm256_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm256_fnmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm256_max_ps(a, b); }
  static V min(V a, V b) { return _mm256_min_ps(a, b); }
  static V abs(V a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static V sign(V a) { return _mm256_and_ps(_mm256_set1_ps(-0.f), a); }
  static V xor_(V a, V b) { return _mm256_xor_ps(a, b); }
  static V round(V a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static M lt(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_LT_OQ); }
  static M ge(V a, V b) { return _mm256_cmp_ps(a, b, _CMP_GE_OQ); }
  static M unord(V a) { return _mm256_cmp_ps(a, a, _CMP_UNORD_Q); }
  static V select(M m, V t, V f) { return _mm256_blendv_ps(f, t, m); }
  // 2^n for integral n in [-126, 127] held in a float vector
  static V pow2(V n) {
    const I e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static float hsum(V v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
  static float hmax(V v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
  }
};

#ifdef __AVX512F__
struct Avx512 {
  static constexpr int W = 16;
  using V = __m512;
  using M = __mmask16;
  static V load(const float* p) { return _mm512_loadu_ps(p); }
  static void store(float* p, V v) { _mm512_storeu_ps(p, v); }
  static V set1(float v) { return _mm512_set1_ps(v); }
  static V add(V a, V b) { return _mm512_add_ps(a, b); }
  static V sub(V a, V b) { return _mm512_sub_ps(a, b); }
  static V mul(V a, V b) { return _mm512_mul_ps(a, b); }
  static V div(V a, V b) { return _mm512_div_ps(a, b); }
  static V recip(V a) {
    const V r = _mm512_rcp14_ps(a);
    return _mm512_fmadd_ps(_mm512_fnmadd_ps(a, r, _mm512_set1_ps(1.f)), r, r);
  }
  static V fma(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }
  static V fnma(V a, V b, V c) { return _mm512_fnmadd_ps(a, b, c); }
  static V max(V a, V b) { return _mm512_max_ps(a, b); }
  static V min(V a, V b) { return _mm512_min_ps(a, b); }
  static V abs(V a) { return _mm512_abs_ps(a); }
  static V sign(V a) { return _mm512_and_ps(_mm512_set1_ps(-0.f), a); }
  static V xor_(V a, V b) { return _mm512_xor_ps(a, b); }
  static V round(V a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static M lt(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_LT_OQ); }
  static M ge(V a, V b) { return _mm512_cmp_ps_mask(a, b, _CMP_GE_OQ); }
  static M unord(V a) { return _mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q); }
  static V select(M m, V t, V f) { return _mm512_mask_blend_ps(m, f, t); }
  static V pow2(V n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static float hsum(V v) { return _mm512_reduce_add_ps(v); }
  static float hmax(V v) { return _mm512_reduce_max_ps(v); }
};
#endif

// exp(xc) = p * 2^n: n = round(xc / ln2) and the Cephes polynomial p on the reduced
// argument in [-ln2/2, ln2/2] (~1-2 ulp). Shared by vexp and vexp_nonpos.
template <class T>
inline typename T::V exp_mantissa(typename T::V xc, typename T::V& n) {
  using V = typename T::V;
  n = T::round(T::mul(xc, T::set1(1.44269504088896341f)));
  V r = T::fnma(n, T::set1(0.693359375f), xc);
  r = T::fnma(n, T::set1(-2.12194440e-4f), r);
  V p = T::set1(1.9875691500e-4f);
  p = T::fma(p, r, T::set1(1.3981999507e-3f));
  p = T::fma(p, r, T::set1(8.3334519073e-3f));
  p = T::fma(p, r, T::set1(4.1665795894e-2f));
  p = T::fma(p, r, T::set1(1.6666665459e-1f));
  p = T::fma(p, r, T::set1(5.0000001201e-1f));
  return T::fma(p, T::mul(r, r), T::add(r, T::set1(1.f)));
}

// exp(x), ~1-2 ulp; 2^n applied as two factors so results run from the denormals
// (x >= -104, below: 0) to +inf (x > 88.72).
// NaN in, NaN out (selected explicitly: the clamps would drop it).
template <class T>
inline typename T::V vexp(typename T::V x) {
  using V = typename T::V;
  V n;
  const V p = exp_mantissa<T>(T::min(T::max(x, T::set1(-104.f)), T::set1(89.f)), n);
  const V n1 = T::round(T::mul(n, T::set1(0.5f)));  // |n1|, |n - n1| <= 76
  const V res = T::mul(T::mul(p, T::pow2(n1)), T::pow2(T::sub(n, n1)));
  return T::select(T::unord(x), x, res);
}

// exp(x) for x <= 0 or NaN (softmax, after the row max is subtracted): equal to vexp where the
// result is a normal float (x >= -87.3: one 2^n factor, exact like vexp's two), 0 below
// (vexp's denormals there are < 1.2e-38 of a row sum >= 1). NaN in, NaN out: max(c, x)
// returns x when x is NaN and the polynomial carries it.
template <class T>
inline typename T::V vexp_nonpos(typename T::V x) {
  using V = typename T::V;
  const V lo = T::set1(-87.3f);
  V n;
  const V p = exp_mantissa<T>(T::max(lo, x), n);
  return T::select(T::lt(x, lo), T::set1(0.f), T::mul(p, T::pow2(n)));
}

template <class T>
inline typename T::V vsigmoid(typename T::V v) {
  const auto one = T::set1(1.f);
  return T::div(one, T::add(one, vexp<T>(T::xor_(v, T::set1(-0.f)))));
}

// tanh: odd polynomial below |v| = 0.625 (Cephes tanhf), 1 - 2 / (exp(2|v|) + 1) above.
template <class T>
inline typename T::V vtanh(typename T::V v) {
  using V = typename T::V;
  const V av = T::abs(v), z = T::mul(v, v);
  V p = T::set1(-5.70498872745e-3f);
  p = T::fma(p, z, T::set1(2.06390887954e-2f));
  p = T::fma(p, z, T::set1(-5.37397155531e-2f));
  p = T::fma(p, z, T::set1(1.33314422036e-1f));
  p = T::fma(p, z, T::set1(-3.33332819422e-1f));
  p = T::fma(T::mul(p, z), v, v);
  const V e = vexp<T>(T::add(av, av));
  const V t = T::sub(T::set1(1.f), T::div(T::set1(2.f), T::add(e, T::set1(1.f))));
  return T::select(T::lt(av, T::set1(0.625f)), p, T::xor_(t, T::sign(v)));
}

// gelu(x) = 0.5 x (1 + erf(z)), z = x / sqrt(2), erf by the odd/even rational approximation
// z P(z^2) / Q(z^2) on z clamped to [-4, 4] (Eigen's and XLA's float erf; |erf error| < 5e-7
// against the exact erf, checked on a 2e6-point grid of [-6, 6]). An absolute erf error e
// moves gelu by 0.5 |x| e, inside the documented bound 1e-6 max(1, |x|) also in the far
// negative tail, where the float reference itself cancels (1 + erf). No exp, one division:
// about 2.5x the throughput of the erfc-exp form it replaced. NaN in, NaN out (selected:
// the clamp would drop it); gelu(+inf) = +inf, gelu(-inf) = -inf * 0 = NaN, as torch's
// scalar path.
template <class T>
inline typename T::V vgelu(typename T::V x) {
  using V = typename T::V;
  const V z = T::min(T::max(T::mul(x, T::set1(0.70710678118654752f)), T::set1(-4.f)), T::set1(4.f));
  const V z2 = T::mul(z, z);
  V p = T::fma(z2, T::set1(-2.72614225801306e-10f), T::set1(2.77068142495902e-08f));
  p = T::fma(z2, p, T::set1(-2.10102402082508e-06f));
  p = T::fma(z2, p, T::set1(-5.69250639462346e-05f));
  p = T::fma(z2, p, T::set1(-7.34990630326855e-04f));
  p = T::fma(z2, p, T::set1(-2.95459980854025e-03f));
  p = T::fma(z2, p, T::set1(-1.60960333262415e-02f));
  V q = T::fma(z2, T::set1(-1.45660718464996e-05f), T::set1(-2.13374055278905e-04f));
  q = T::fma(z2, q, T::set1(-1.68282697438203e-03f));
  q = T::fma(z2, q, T::set1(-7.37332916720468e-03f));
  q = T::fma(z2, q, T::set1(-1.42647390514189e-02f));
  const V erf = T::div(T::mul(z, p), q);
  const V hx = T::mul(T::set1(0.5f), x);
  return T::select(T::unord(x), x, T::fma(hx, erf, hx));
}

// gelu_tanh(x) = 0.5 x (1 + tanh(u)) = x * sigmoid(2u), u = sqrt(2/pi) (x + 0.044715 x^3).
template <class T>
inline typename T::V vgelu_tanh(typename T::V x) {
  using V = typename T::V;
  const V x3 = T::mul(T::mul(x, x), x);
  const V u2 = T::mul(T::set1(2.f * 0.7978845608028654f), T::fma(x3, T::set1(0.044715f), x));
  return T::div(x, T::add(T::set1(1.f), vexp<T>(T::xor_(u2, T::set1(-0.f)))));
}

// Elementwise map with the tail run through a padded copy (same arithmetic for every element).
template <class T, class F>
inline void map(const float* x, int64_t n, float* y, F f) {
  int64_t i = 0;
  for (; i + T::W <= n; i += T::W) T::store(y + i, f(T::load(x + i)));
  if (i < n) {
    float buf[T::W] = {};
    std::memcpy(buf, x + i, static_cast<size_t>(n - i) * sizeof(float));
    T::store(buf, f(T::load(buf)));
    std::memcpy(y + i, buf, static_cast<size_t>(n - i) * sizeof(float));
  }
}

template <class T>
void gelu_impl(const float* x, int64_t n, float* y) {
  map<T>(x, n, y, [](typename T::V v) { return vgelu<T>(v); });
}
template <class T>
void gelu_tanh_impl(const float* x, int64_t n, float* y) {
  map<T>(x, n, y, [](typename T::V v) { return vgelu_tanh<T>(v); });
}

// softmax / log_softmax of x with its row max m already known.
template <class T>
void softmax_body(const float* x, int64_t n, bool log, float* y, float m) {
  using V = typename T::V;
  constexpr float ninf = -__builtin_inff();
  int64_t i = 0;
  const V mv = T::set1(m);
  V acc = T::set1(0.f);
  for (i = 0; i + T::W <= n; i += T::W) {
    const V e = vexp_nonpos<T>(T::sub(T::load(x + i), mv));
    if (!log) T::store(y + i, e);
    acc = T::add(acc, e);
  }
  float sum = T::hsum(acc);
  if (i < n) {
    float buf[T::W];
    for (int j = 0; j < T::W; ++j) buf[j] = i + j < n ? x[i + j] - m : ninf;
    // padding: exp(-inf) = 0, so it adds nothing (a NaN row stays NaN through its own lanes)
    T::store(buf, vexp_nonpos<T>(T::load(buf)));
    for (int64_t j = i; j < n; ++j) {
      if (!log) y[j] = buf[j - i];
      sum += buf[j - i];
    }
  }
  if (log) {
    const V sub = T::set1(m + std::log(sum));
    map<T>(x, n, y, [&](V v) { return T::sub(v, sub); });
  } else {
    const V inv = T::set1(1.f / sum);
    map<T>(y, n, y, [&](V v) { return T::mul(v, inv); });
  }
}

template <class T>
void softmax_impl(const float* x, int64_t n, bool log, float* y) {
  using V = typename T::V;
  // Row max; a NaN is skipped here but still turns the row NaN below (exp(NaN - m)).
  V vm = T::set1(-__builtin_inff());
  int64_t i = 0;
  for (; i + T::W <= n; i += T::W) vm = T::max(T::load(x + i), vm);
  float m = T::hmax(vm);
  for (int64_t j = i; j < n; ++j) m = x[j] > m ? x[j] : m;
  softmax_body<T>(x, n, log, y, m);
}

// x = softmax(x + add) in place (the fused attention's scores and additive mask row): the
// add is fused into the max pass.
template <class T>
void softmax_add_impl(float* x, const float* add, int64_t n) {
  using V = typename T::V;
  V vm = T::set1(-__builtin_inff());
  int64_t i = 0;
  for (; i + T::W <= n; i += T::W) {
    const V v = T::add(T::load(x + i), T::load(add + i));
    T::store(x + i, v);
    vm = T::max(v, vm);
  }
  float m = T::hmax(vm);
  for (int64_t j = i; j < n; ++j) {
    x[j] += add[j];
    m = x[j] > m ? x[j] : m;
  }
  softmax_body<T>(x, n, false, x, m);
}

// Recurrent cells, kUnits (8) units per group: one 8-wide vector per gate (AVX2 width;
// the AVX-512 table uses these too).
inline __m256 load_units(const float* p, int64_t nu) {
  if (nu == kUnits) return _mm256_loadu_ps(p);
  float buf[kUnits] = {};
  std::memcpy(buf, p, static_cast<size_t>(nu) * sizeof(float));
  return _mm256_loadu_ps(buf);
}
inline void store_units(float* p, __m256 v, int64_t nu) {
  if (nu == kUnits) return _mm256_storeu_ps(p, v);
  float buf[kUnits];
  _mm256_storeu_ps(buf, v);
  std::memcpy(p, buf, static_cast<size_t>(nu) * sizeof(float));
}

void lstm_cells_v(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, float* c, float* h,
                  float* o) {
  using T = Avx2;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t q = g * packed::kPanel, j = g * kUnits, nu = H - j < kUnits ? H - j : kUnits;
    const __m256 ig = vsigmoid<T>(_mm256_add_ps(_mm256_loadu_ps(a + q), _mm256_loadu_ps(b + q)));
    const __m256 fg = vsigmoid<T>(_mm256_add_ps(_mm256_loadu_ps(a + q + 8), _mm256_loadu_ps(b + q + 8)));
    const __m256 gg = vtanh<T>(_mm256_add_ps(_mm256_loadu_ps(a + q + 16), _mm256_loadu_ps(b + q + 16)));
    const __m256 og = vsigmoid<T>(_mm256_add_ps(_mm256_loadu_ps(a + q + 24), _mm256_loadu_ps(b + q + 24)));
    const __m256 cn = _mm256_fmadd_ps(fg, load_units(c + j, nu), _mm256_mul_ps(ig, gg));
    const __m256 hn = _mm256_mul_ps(og, vtanh<T>(cn));
    store_units(c + j, cn, nu);
    store_units(h + j, hn, nu);
    store_units(o + j, hn, nu);
  }
}

void gru_cells_v(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, const float* hp, float* h,
                 float* o) {
  using T = Avx2;
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t q = g * kGruGroup, j = g * kUnits, nu = H - j < kUnits ? H - j : kUnits;
    const __m256 rg = vsigmoid<T>(_mm256_add_ps(_mm256_loadu_ps(a + q), _mm256_loadu_ps(b + q)));
    const __m256 zg = vsigmoid<T>(_mm256_add_ps(_mm256_loadu_ps(a + q + 8), _mm256_loadu_ps(b + q + 8)));
    const __m256 ng = vtanh<T>(_mm256_fmadd_ps(rg, _mm256_loadu_ps(b + q + 16), _mm256_loadu_ps(a + q + 16)));
    // (1 - z) n + z h_prev
    const __m256 hn = _mm256_fmadd_ps(zg, _mm256_sub_ps(load_units(hp + j, nu), ng), ng);
    store_units(h + j, hn, nu);
    store_units(o + j, hn, nu);
  }
}

// The fused attention's key pack (vec_kernels.h pack_keys): 8 x 8 blocks transposed in
// registers (unpack, shuffle, 128-bit permute), the edges element by element as the
// scalar reference. 256-bit code, shared by the AVX2 and AVX-512 tables.
void pack_keys_v(const float* k, int64_t ldk, int64_t Sk, int64_t D, float* kt) {
  constexpr int64_t P32 = packed::kPanel;
  for (int64_t p = 0; p * P32 < Sk; ++p) {
    float* dst = kt + p * D * P32;
    const int64_t j0 = p * P32, nc = Sk - j0 < P32 ? Sk - j0 : P32;
    if (nc < P32)
      for (int64_t i = 0; i < D * P32; ++i) dst[i] = 0.f;
    const int64_t nc8 = nc / 8 * 8, D8 = D / 8 * 8;
    for (int64_t j = 0; j < nc8; j += 8) {
      const float* src = k + (j0 + j) * ldk;
      for (int64_t d = 0; d < D8; d += 8) {
        __m256 r0 = _mm256_loadu_ps(src + d), r1 = _mm256_loadu_ps(src + ldk + d);
        __m256 r2 = _mm256_loadu_ps(src + 2 * ldk + d), r3 = _mm256_loadu_ps(src + 3 * ldk + d);
        __m256 r4 = _mm256_loadu_ps(src + 4 * ldk + d), r5 = _mm256_loadu_ps(src + 5 * ldk + d);
        __m256 r6 = _mm256_loadu_ps(src + 6 * ldk + d), r7 = _mm256_loadu_ps(src + 7 * ldk + d);
        const __m256 t0 = _mm256_unpacklo_ps(r0, r1), t1 = _mm256_unpackhi_ps(r0, r1);
        const __m256 t2 = _mm256_unpacklo_ps(r2, r3), t3 = _mm256_unpackhi_ps(r2, r3);
        const __m256 t4 = _mm256_unpacklo_ps(r4, r5), t5 = _mm256_unpackhi_ps(r4, r5);
        const __m256 t6 = _mm256_unpacklo_ps(r6, r7), t7 = _mm256_unpackhi_ps(r6, r7);
        const __m256 u0 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u1 = _mm256_shuffle_ps(t0, t2, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u2 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u3 = _mm256_shuffle_ps(t1, t3, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u4 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u5 = _mm256_shuffle_ps(t4, t6, _MM_SHUFFLE(3, 2, 3, 2));
        const __m256 u6 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(1, 0, 1, 0));
        const __m256 u7 = _mm256_shuffle_ps(t5, t7, _MM_SHUFFLE(3, 2, 3, 2));
        float* o = dst + d * P32 + j;  // row d of the panel, keys j..j+7
        _mm256_storeu_ps(o, _mm256_permute2f128_ps(u0, u4, 0x20));
        _mm256_storeu_ps(o + P32, _mm256_permute2f128_ps(u1, u5, 0x20));
        _mm256_storeu_ps(o + 2 * P32, _mm256_permute2f128_ps(u2, u6, 0x20));
        _mm256_storeu_ps(o + 3 * P32, _mm256_permute2f128_ps(u3, u7, 0x20));
        _mm256_storeu_ps(o + 4 * P32, _mm256_permute2f128_ps(u0, u4, 0x31));
        _mm256_storeu_ps(o + 5 * P32, _mm256_permute2f128_ps(u1, u5, 0x31));
        _mm256_storeu_ps(o + 6 * P32, _mm256_permute2f128_ps(u2, u6, 0x31));
        _mm256_storeu_ps(o + 7 * P32, _mm256_permute2f128_ps(u3, u7, 0x31));
      }
      for (int64_t jj = j; jj < j + 8; ++jj)  // d past the last block of 8
        for (int64_t d = D8; d < D; ++d) dst[d * P32 + jj] = k[(j0 + jj) * ldk + d];
    }
    for (int64_t jj = nc8; jj < nc; ++jj)  // keys past the last block of 8
      for (int64_t d = 0; d < D; ++d) dst[d * P32 + jj] = k[(j0 + jj) * ldk + d];
  }
}

}  // namespace
}  // namespace aimass::runtime::vec
