// Scalar reference of the vectorized runtime kernels and the one dispatch point
// (vec_kernels.h describes the contract and the error bound).
#include "runtime/vec_kernels.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "runtime/packed_gemm.h"

namespace aimass::runtime::vec {
namespace {

void layer_norm_scalar(const float* src, int64_t D, const float* w, const float* b, double eps, float* dst) {
  double mean = 0, var = 0;
  for (int64_t i = 0; i < D; ++i) mean += src[i];
  mean /= D;
  for (int64_t i = 0; i < D; ++i) {
    const double d = src[i] - mean;
    var += d * d;
  }
  var /= D;
  const double inv = 1.0 / std::sqrt(var + eps);
  for (int64_t i = 0; i < D; ++i) {
    float v = static_cast<float>((src[i] - mean) * inv);
    if (w) v *= w[i];
    if (b) v += b[i];
    dst[i] = v;
  }
}

void softmax_scalar(const float* src, int64_t n, bool log, float* dst) {
  // NaN-propagating max: a NaN score makes the row NaN (as does +inf: inf - inf).
  float m = -std::numeric_limits<float>::infinity();
  for (int64_t a = 0; a < n; ++a) m = (src[a] > m || src[a] != src[a]) ? src[a] : m;
  double sum = 0;
  for (int64_t a = 0; a < n; ++a) sum += std::exp(static_cast<double>(src[a] - m));
  if (log) {
    const float lse = static_cast<float>(std::log(sum));
    for (int64_t a = 0; a < n; ++a) dst[a] = src[a] - m - lse;
  } else {
    const double inv = 1.0 / sum;
    for (int64_t a = 0; a < n; ++a) dst[a] = static_cast<float>(std::exp(static_cast<double>(src[a] - m)) * inv);
  }
}

void softmax_add_scalar(float* x, const float* add, int64_t n) {
  for (int64_t a = 0; a < n; ++a) x[a] += add[a];
  softmax_scalar(x, n, false, x);
}

void gelu_scalar(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    y[i] = 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
  }
}

void gelu_tanh_scalar(const float* x, int64_t n, float* y) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i], k = 0.7978845608028654f;
    y[i] = 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }
}

void pack_keys_scalar(const float* k, int64_t ldk, int64_t Sk, int64_t D, float* kt) {
  constexpr int64_t P32 = packed::kPanel;
  for (int64_t p = 0; p * P32 < Sk; ++p) {
    float* dst = kt + p * D * P32;
    const int64_t j0 = p * P32, nc = std::min(P32, Sk - j0);
    if (nc < P32) std::fill(dst, dst + D * P32, 0.f);
    for (int64_t j = 0; j < nc; ++j)
      for (int64_t d = 0; d < D; ++d) dst[d * P32 + j] = k[(j0 + j) * ldk + d];
  }
}

inline float sigm(float v) { return 1.f / (1.f + std::exp(-v)); }

void lstm_cells_scalar(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, float* c, float* h,
                       float* o) {
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * packed::kPanel;
    for (int64_t u = 0; u < kUnits && g * kUnits + u < H; ++u) {
      const int64_t j = g * kUnits + u, q = base + u;
      const float ig = sigm(a[q] + b[q]), fg = sigm(a[q + kUnits] + b[q + kUnits]);
      const float gg = std::tanh(a[q + 2 * kUnits] + b[q + 2 * kUnits]);
      const float og = sigm(a[q + 3 * kUnits] + b[q + 3 * kUnits]);
      c[j] = fg * c[j] + ig * gg;
      h[j] = o[j] = og * std::tanh(c[j]);
    }
  }
}

void gru_cells_scalar(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, const float* hp, float* h,
                      float* o) {
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t base = g * kGruGroup;
    for (int64_t u = 0; u < kUnits && g * kUnits + u < H; ++u) {
      const int64_t j = g * kUnits + u, q = base + u;
      const float rg = sigm(a[q] + b[q]), zg = sigm(a[q + kUnits] + b[q + kUnits]);
      const float ng = std::tanh(a[q + 2 * kUnits] + rg * b[q + 2 * kUnits]);
      h[j] = o[j] = (1.f - zg) * ng + zg * hp[j];
    }
  }
}

const Kernels kScalar = {layer_norm_scalar, softmax_scalar,    softmax_add_scalar, gelu_scalar,
                         gelu_tanh_scalar,  lstm_cells_scalar, gru_cells_scalar,   pack_keys_scalar,
                         packed::panels_scalar, SimdLevel::Scalar};

}  // namespace

const Kernels& kernels_for(SimdLevel level) {
  const CpuFeatures& f = cpu_features();
  if (level >= SimdLevel::AVX512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) return kAvx512;
  if (level >= SimdLevel::AVX2 && f.avx2 && f.fma) return kAvx2;
  return kScalar;
}

const Kernels& kernels() { return kernels_for(simd_level()); }

}  // namespace aimass::runtime::vec
