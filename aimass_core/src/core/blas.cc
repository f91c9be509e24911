#include "aimass/blas.h"

#include <climits>
#include <mutex>

#include <cblas.h>

#include "aimass/error.h"

namespace aimass {
namespace {

// Threading policy: OpenBLAS runs single-threaded on the calling thread. Why: OpenBLAS's own
// workers busy-wait (sched_yield) for each other; whenever the cores are also busy (the
// batcher's scheduler, client threads, the engine pool, torch/onnxruntime, other processes)
// a preempted BLAS worker makes the caller spin for whole time slices. On 2 cores a 32-row
// MLP batch took 40-70 ms instead of ~3 ms and the bench's batched sweep stalled. Splitting
// the product into panels on the engine pool (single-threaded BLAS per panel) was tried and
// stalled the same way under load (two concurrent OpenBLAS callers: 8-32 rows took 15-80 ms
// vs 2-3 ms serially), so large GEMMs use one core; element-wise work still uses the pool.
std::once_flag g_blas_policy;
void apply_blas_policy() { std::call_once(g_blas_policy, [] { scipy_openblas_set_num_threads(1); }); }

void raw_sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
                    static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
                    static_cast<blasint>(ldc));
}


}  // namespace

void sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha,
           const float* A, int64_t lda, const float* B, int64_t ldb, float beta, float* C,
           int64_t ldc) {
  // scipy-openblas32 uses 32-bit integers: refuse sizes it cannot index.
  AIMASS_CHECK(M <= INT_MAX && N <= INT_MAX && K <= INT_MAX && lda <= INT_MAX && ldb <= INT_MAX &&
                   ldc <= INT_MAX,
               ValueError, "sgemm: dimensions M=", M, " N=", N, " K=", K,
               " exceed the 32-bit BLAS; split the matrix");
  if (M == 0 || N == 0) return;
  apply_blas_policy();
  raw_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
}

void blas_set_num_threads(int n) {
  AIMASS_CHECK(n >= 1, ValueError, "blas_set_num_threads: n=", n, " must be >= 1");
  apply_blas_policy();  // an explicit setting is not overwritten by the default policy later
  scipy_openblas_set_num_threads(n);
}

}  // namespace aimass
