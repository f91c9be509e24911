// Quantized Linear layers of a model: the stored weights (docs/quant_format.md layout)
// prepacked once through the compress kernels (aimass/qlinear.h).
#pragma once
#include <cstdint>
#include <memory>

#include "aimass/runtime.h"
#include "runtime/ops.h"

namespace aimass::runtime {

struct QLinearWeights {
  int bits = 0;
  int64_t N = 0, K = 0, group_size = 0;
  std::shared_ptr<void> packed;  // aimass::quant::PackedLinear
};

// Validates node `n` (params weight + weight_scale, attrs bits / group_size) and prepacks.
std::shared_ptr<QLinearWeights> pack_qlinear(const Model& m, const Node& n, int64_t K);
void run_qlinear(const QLinearWeights& q, const float* x, int64_t M, const float* bias, float* y);
// y = act(x W^T + bias) (+ res, [M, N] like y; nullable): ReLU / GELU and the residual run in the
// int8 GEMM's per-block epilogue where it has one (quant::LinearEpilogue), else after it.
void run_qlinear(const QLinearWeights& q, const float* x, int64_t M, const float* bias, float* y, ops::Act act,
                 const float* res);

}  // namespace aimass::runtime
