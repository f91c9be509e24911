// Small-M linear (y[M, N] = x[M, K] @ w[N, K]^T, M <= kGemvMaxRows): each weight row
// is read once for all M rows. At batch 1 this memory-bound case is where BLAS
// sgemm pays most for its packing and threading; measured in bench/bench_runtime.py.
#pragma once
#include <cstdint>

namespace aimass::runtime::gemv {

constexpr int64_t kGemvMaxRows = 4;

// rows [n0, n1) of the output, all M rows; raw pointers only (SIMD TUs).
void rows_scalar(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, int64_t N, float* y);
void rows_avx2(const float* x, int64_t M, int64_t K, const float* w, int64_t n0, int64_t n1, int64_t N, float* y);

// Dispatches on simd_level() and splits N over the engine's thread pool.
void linear_small_m(const float* x, int64_t M, int64_t K, const float* w, int64_t N, float* y);

}  // namespace aimass::runtime::gemv
