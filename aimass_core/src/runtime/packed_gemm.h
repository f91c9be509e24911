// Small-M linear over weights packed once at plan build (y[M, N] = x[M, K] @ w[N, K]^T
// + bias, optional ReLU fused in the register epilogue).
//
// Why: OpenBLAS sgemm re-packs the whole weight matrix on every call, so at 2..32
// rows (a dynamic batch) it pays the weight traffic of a GEMM for the FLOPs of a
// GEMV and a batch of 16 cost almost 16 batch-1 runs. Here the weights are stored
// once in column panels of kPanel outputs, laid out [panel][k][kPanel] (the last
// panel zero-padded), so the kernel streams each panel contiguously while up to
// 8 (AVX-512) / 6 (AVX2) activation rows accumulate in registers: the panel is
// read once per block of rows, not once per row.
//
// Every output is acc = sum_k w[n,k]*x[m,k] accumulated in k order, then + bias,
// then ReLU; the scalar reference keeps that order (SIMD paths differ only by FMA
// rounding). Raw pointers only: the SIMD translation units instantiate no std::
// templates.
#pragma once
#include <cstdint>

namespace aimass::runtime::packed {

constexpr int64_t kPanel = 32;  // outputs per panel: two AVX-512 / four AVX2 registers

inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }

// wp[num_panels(N) * K * kPanel] <- w[N, K] row-major; bp[num_panels(N) * kPanel] <- bias (or zeros).
void pack(const float* w, int64_t N, int64_t K, float* wp);

// Panels [p0, p1) for all M rows; bias_p is the padded bias (nullable); y is [M, N] row-major.
void panels_scalar(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y);
void panels_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                 int64_t p1, int64_t N, bool relu, float* y);
void panels_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y);

// Dispatches on simd_level() and splits the panels over the engine's thread pool.
void linear(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t N, bool relu,
            float* y);

}  // namespace aimass::runtime::packed
