// Dense float GEMM comes from the BLAS wheel (scipy-openblas32); this is the one
// place that calls it, so every area shares its threading setting.
#pragma once
#include <cstdint>

namespace aimass {

// C[M,N] = alpha * op(A) * op(B) + beta * C, row-major, leading dimensions in elements.
void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc);
// OpenBLAS's own threads inside one BLAS call. Default 1 (see blas.cc for why).
void blas_set_num_threads(int n);

}  // namespace aimass
