#include "aimass/blas.h"

#include <algorithm>
#include <climits>
#include <mutex>

#include <cblas.h>

#include "aimass/error.h"
#include "aimass/parallel.h"

namespace aimass {
namespace {

// Threading policy: the engine's pool owns the cores. OpenBLAS runs single-threaded and large
// GEMMs are split into row/column panels with parallel_for. Why: OpenBLAS's own workers
// busy-wait (sched_yield) for each other; whenever the cores are also busy (the batcher's
// scheduler, client threads, the engine pool, torch/onnxruntime in the same process) a
// preempted BLAS worker makes the caller spin for a whole time slice. On 2 cores a 32-row
// MLP batch went from ~3 ms to 40-70 ms and the bench's batched sweep stalled.
// parallel_for runs serially inside pool tasks and when another thread holds the pool,
// so concurrent or nested callers never oversubscribe.
std::once_flag g_blas_policy;
void apply_blas_policy() { std::call_once(g_blas_policy, [] { scipy_openblas_set_num_threads(1); }); }

void raw_sgemm(bool trans_a, bool trans_b, int64_t M, int64_t N, int64_t K, float alpha, const float* A,
               int64_t lda, const float* B, int64_t ldb, float beta, float* C, int64_t ldc) {
  scipy_cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans,
                    static_cast<blasint>(M), static_cast<blasint>(N), static_cast<blasint>(K), alpha, A,
                    static_cast<blasint>(lda), B, static_cast<blasint>(ldb), beta, C,
                    static_cast<blasint>(ldc));
}

constexpr int64_t kMinPanelFlops = int64_t{1} << 20;  // below this a panel is not worth a hand-off
constexpr int64_t kMinPanel = 16;                     // rows/columns per panel: keeps BLAS kernels efficient

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
  const int64_t work = M * N * std::max<int64_t>(K, 1);
  if (num_threads() == 1 || work < 2 * kMinPanelFlops || std::max(M, N) < 2 * kMinPanel) {
    raw_sgemm(trans_a, trans_b, M, N, K, alpha, A, lda, B, ldb, beta, C, ldc);
    return;
  }
  if (M >= N) {  // row panels of op(A) and C
    const int64_t grain = std::max(kMinPanel, kMinPanelFlops / std::max<int64_t>(N * K, 1));
    parallel_for(0, M, grain, [&](int64_t b, int64_t e) {
      const float* Ab = trans_a ? A + b : A + b * lda;
      raw_sgemm(trans_a, trans_b, e - b, N, K, alpha, Ab, lda, B, ldb, beta, C + b * ldc, ldc);
    });
  } else {  // column panels of op(B) and C
    const int64_t grain = std::max(kMinPanel, kMinPanelFlops / std::max<int64_t>(M * K, 1));
    parallel_for(0, N, grain, [&](int64_t b, int64_t e) {
      const float* Bb = trans_b ? B + b * ldb : B + b;
      raw_sgemm(trans_a, trans_b, M, e - b, K, alpha, A, lda, Bb, ldb, beta, C + b, ldc);
    });
  }
}

void blas_set_num_threads(int n) {
  AIMASS_CHECK(n >= 1, ValueError, "blas_set_num_threads: n=", n, " must be >= 1");
  apply_blas_policy();  // an explicit setting is not overwritten by the default policy later
  scipy_openblas_set_num_threads(n);
}

}  // namespace aimass
