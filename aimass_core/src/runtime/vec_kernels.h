// Vectorized row kernels of the runtime (LayerNorm, softmax, GELU erf/tanh, the
// fused LSTM/GRU cell update) and the packed small-M GEMM panel kernel, as ONE table
// of kernel pointers per SIMD level. kernels() picks the table for simd_level()
// (aimass/cpu_features.h: the only place that looks at the CPU); kernels_for(level)
// gives a given level's table (tests run every level against the scalar reference).
//
// The scalar table is the reference: the same formulas the runtime used before
// (double accumulation for LayerNorm's mean/variance and softmax's sum, std::erf /
// std::tanh / std::exp). The AVX2 / AVX-512 versions agree with it within
//   |simd - ref| <= 1e-5 * |ref| + 1e-6 * max(1, |x|)
// elementwise (tests/cpp/test_runtime_vec.cc checks exactly this bound at odd sizes).
// The absolute term covers GELU's negative tail, where the reference itself loses
// relative precision (1 + erf(z) cancels in float) and tanh/sigmoid near 0.
// NaN / +-inf propagate as torch does: a NaN or inf in a LayerNorm row, or a NaN or
// +inf in a softmax row, makes the whole row NaN; -inf scores give 0 probability,
// an all -inf row is NaN; gelu(NaN) = NaN, gelu(-inf) = NaN (inf * 0), gelu(+inf) =
// +inf (torch's scalar and float64 paths; its float32 SIMD erf path returns NaN);
// sigmoid(+-inf) = 1 / 0, tanh(+-inf) = +-1.
// Raw pointers only: the SIMD translation units instantiate no std:: templates.
#pragma once
#include <cstdint>

#include "aimass/cpu_features.h"

namespace aimass::runtime::vec {

// Recurrent gate layout: hidden units in groups of kUnits, gate k of unit g*kUnits+u at column
// g*G*kUnits + k*kUnits + u. LSTM (G = 4 gates i, f, g, o): group g owns packed GEMM panel g
// (kPanel = 32 outputs). GRU (G = 3 gates r, z, n): groups of 24 columns, 4 groups to 3 panels,
// no padding but in the last panel.
constexpr int64_t kUnits = 8;
constexpr int64_t kGruGroup = 3 * kUnits;  // GRU columns per unit group

struct Kernels {
  // y[D] = (x - mean) / sqrt(var + eps) * w + b (w, b nullable); y may alias x.
  void (*layer_norm_row)(const float* x, int64_t D, const float* w, const float* b, double eps, float* y);
  // y[n] = softmax(x) or log_softmax(x) over a contiguous row; y may alias x.
  void (*softmax_row)(const float* x, int64_t n, bool log, float* y);
  // x[n] = softmax(x + add) in place (add: an additive mask row, -inf masks).
  void (*softmax_add_row)(float* x, const float* add, int64_t n);
  // y = x * Phi(x) (erf) and the tanh approximation, elementwise; y may alias x.
  void (*gelu)(const float* x, int64_t n, float* y);
  void (*gelu_tanh)(const float* x, int64_t n, float* y);
  // Unit groups [g0, g1) of one row: a = input projection (+ biases), b = h_prev @ W_hh^T
  // in the layout above; H hidden units. LSTM: c updated in place, h_out and o written.
  void (*lstm_cells)(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, float* c, float* h_out,
                     float* o);
  // GRU: b already holds b_hh; h_prev read, h_out and o written.
  void (*gru_cells)(const float* a, const float* b, int64_t g0, int64_t g1, int64_t H, const float* h_prev,
                    float* h_out, float* o);
  // The fused attention's keys in the packed GEMM's panel layout: kt[panel][d][32] =
  // k[panel * 32 + j][d] (k rows of stride ldk, Sk keys of D values; keys past Sk are 0).
  void (*pack_keys)(const float* k, int64_t ldk, int64_t Sk, int64_t D, float* kt);
  // Packed small-M GEMM panels [p0, p1) (runtime/packed_gemm.h).
  void (*panels)(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                 int64_t N, bool relu, float* y);
  SimdLevel level;
};

const Kernels& kernels();                      // the table for simd_level()
const Kernels& kernels_for(SimdLevel level);   // a level's table (capped at what the CPU supports)

// Per-ISA tables (defined in vec_kernels_avx2.cc / vec_kernels_avx512.cc).
extern const Kernels kAvx2;
extern const Kernels kAvx512;

}  // namespace aimass::runtime::vec
