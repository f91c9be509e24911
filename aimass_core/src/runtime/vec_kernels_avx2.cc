// AVX2 + FMA table of the vectorized runtime kernels (vec_kernels.h).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "runtime/vec_kernels_impl.h"

namespace aimass::runtime::vec {
namespace {

// Mean and variance accumulated in double (as the scalar reference), normalization in double.
void layer_norm_avx2(const float* x, int64_t D, const float* w, const float* b, double eps, float* y) {
  __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
  int64_t i = 0;
  for (; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(v)));
    s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
  }
  alignas(32) double t[4];
  _mm256_store_pd(t, _mm256_add_pd(s0, s1));
  double sum = (t[0] + t[1]) + (t[2] + t[3]);
  for (int64_t j = i; j < D; ++j) sum += x[j];
  const double mean = sum / D;
  const __m256d mv = _mm256_set1_pd(mean);
  s0 = s1 = _mm256_setzero_pd();
  for (i = 0; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m256d d0 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), mv);
    const __m256d d1 = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), mv);
    s0 = _mm256_fmadd_pd(d0, d0, s0);
    s1 = _mm256_fmadd_pd(d1, d1, s1);
  }
  _mm256_store_pd(t, _mm256_add_pd(s0, s1));
  double var = (t[0] + t[1]) + (t[2] + t[3]);
  for (int64_t j = i; j < D; ++j) var += (x[j] - mean) * (x[j] - mean);
  var /= D;
  const double inv = 1.0 / std::sqrt(var + eps);
  const __m256d iv = _mm256_set1_pd(inv);
  for (i = 0; i + 8 <= D; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(v)), mv), iv));
    const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(_mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)), mv), iv));
    __m256 r = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
    if (w) r = _mm256_mul_ps(r, _mm256_loadu_ps(w + i));
    if (b) r = _mm256_add_ps(r, _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(y + i, r);
  }
  for (; i < D; ++i) {
    float v = static_cast<float>((x[i] - mean) * inv);
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = v;
  }
}

}  // namespace

const Kernels kAvx2 = {layer_norm_avx2,      softmax_impl<Avx2>, softmax_add_impl<Avx2>, gelu_impl<Avx2>,
                       gelu_tanh_impl<Avx2>, lstm_cells_v,       gru_cells_v,            pack_keys_v,
                       packed::panels_avx2,  SimdLevel::AVX2};

}  // namespace aimass::runtime::vec
