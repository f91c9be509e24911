#include "runtime/gemv.h"

#include <algorithm>

#include "aimass/cpu_features.h"
#include "aimass/parallel.h"

namespace aimass::runtime::gemv {

void rows_scalar(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, int64_t N, float* y) {
  for (int64_t n = n0; n < n1; ++n) {
    const float* wr = w + n * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums, like the SIMD path
      int64_t k = 0;
      for (; k + 8 <= K; k += 8)
        for (int j = 0; j < 8; ++j) acc[j] += wr[k + j] * xr[k + j];
      float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; k < K; ++k) s += wr[k] * xr[k];
      y[m * N + n] = s;
    }
  }
}

void linear_small_m(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y) {
  const bool avx2 = simd_level() >= SimdLevel::AVX2;
  // ~64 KiB of weights per chunk: enough work to amortize a pool wake-up.
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
    if (avx2) rows_avx2(x, M, K, w, b, e, N, y);
    else rows_scalar(x, M, K, w, b, e, N, y);
  });
}

}  // namespace aimass::runtime::gemv
