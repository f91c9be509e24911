// AVX-512 table of the vectorized runtime kernels (vec_kernels.h). The recurrent
// cells work on 8-unit groups and share the 256-bit code with the AVX2 table.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#include "runtime/vec_kernels_impl.h"

namespace aimass::runtime::vec {
namespace {

void layer_norm_avx512(const float* x, int64_t D, const float* w, const float* b, double eps, float* y) {
  __m512d s0 = _mm512_setzero_pd(), s1 = _mm512_setzero_pd();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    s0 = _mm512_add_pd(s0, _mm512_cvtps_pd(_mm512_castps512_ps256(v)));
    s1 = _mm512_add_pd(s1, _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)));
  }
  double sum = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (int64_t j = i; j < D; ++j) sum += x[j];
  const double mean = sum / D;
  const __m512d mv = _mm512_set1_pd(mean);
  s0 = s1 = _mm512_setzero_pd();
  for (i = 0; i + 16 <= D; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m512d d0 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mv);
    const __m512d d1 = _mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), mv);
    s0 = _mm512_fmadd_pd(d0, d0, s0);
    s1 = _mm512_fmadd_pd(d1, d1, s1);
  }
  double var = _mm512_reduce_add_pd(_mm512_add_pd(s0, s1));
  for (int64_t j = i; j < D; ++j) var += (x[j] - mean) * (x[j] - mean);
  var /= D;
  const double inv = 1.0 / std::sqrt(var + eps);
  const __m512d iv = _mm512_set1_pd(inv);
  for (i = 0; i + 16 <= D; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    const __m256 lo = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_castps512_ps256(v)), mv), iv));
    const __m256 hi = _mm512_cvtpd_ps(_mm512_mul_pd(_mm512_sub_pd(_mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1)), mv), iv));
    __m512 r = _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1);
    if (w) r = _mm512_mul_ps(r, _mm512_loadu_ps(w + i));
    if (b) r = _mm512_add_ps(r, _mm512_loadu_ps(b + i));
    _mm512_storeu_ps(y + i, r);
  }
  for (; i < D; ++i) {
    float v = static_cast<float>((x[i] - mean) * inv);
    if (w) v *= w[i];
    if (b) v += b[i];
    y[i] = v;
  }
}

}  // namespace

const Kernels kAvx512 = {layer_norm_avx512,      softmax_impl<Avx512>, softmax_add_impl<Avx512>, gelu_impl<Avx512>,
                         gelu_tanh_impl<Avx512>, lstm_cells_v,         gru_cells_v,              pack_keys_v,
                         packed::panels_avx512,  SimdLevel::AVX512};

}  // namespace aimass::runtime::vec
