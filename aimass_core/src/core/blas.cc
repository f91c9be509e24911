#include "aimass/blas.h"

#include <climits>

#include <cblas.h>

#include "aimass/error.h"

namespace aimass {

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc) {
  // scipy-openblas32 uses 32-bit integers: refuse sizes it cannot index.
  AIMASS_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                   ldc <= INT_MAX,
               ValueError, "sgemm: dimensions M=", M, " N=", N, " K=", K,
               " exceed the 32-bit BLAS; split the matrix");
  if (M == 0 || N == 0) return;
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
                    static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
                    static_cast<blasint>(ldc));
}

void blas_set_num_threads(int n) {
  AIMASS_CHECK(n >= 1, ValueError, "blas_set_num_threads: n=", n, " must be >= 1");
  scipy_openblas_set_num_threads(n);
}

}  // namespace aimass
