// Internal to qlinear: the prepacked weight and the per-ISA kernel table.
// SIMD translation units see only this POD view (no std:: templates there).
#pragma once
#include <cstdint>

namespace aimass::quant::detail {

// Prepacked weight, as the kernels read it.
//   Kp  = K rounded up to 64; rows are zero-padded to Kp.
//   w8  (bits 8): int8 [N, Kp].
//   w4  (bits 4): [N, Kp/2] bytes; each block of 32 elements is 16 bytes, byte i holds
//       element i + 8 in its low nibble and element i + 16 + 8 in its high nibble
//       (offset-8 unsigned, so decoding is a mask, a shift and a subtract).
//   scale: [N, ng] fp32.  G = group length (K when per-channel), ng = K / G.
//   Gk/ngk: the blocking the SIMD kernels use: per-channel -> one block of Kp
//       (x is zero-padded to Kp); grouped -> Gk = G, ngk = ng.
//   wq: int8 [N, Kp] for the dynamic path (== w8 for bits 8, unpacked for bits 4).
//   colsum: [N, ng] sum of the int8 weights of each group (VNNI +128 correction);
//   corr: [N] 128 * sum_g scale[n, g] * colsum[n, g].
struct WeightView {
  int bits;
  int64_t N, K, Kp, G, ng, Gk, ngk;
  bool per_channel;
  const int8_t* w8;
  const uint8_t* w4;
  const float* scale;
  const int8_t* wq;
  const int32_t* colsum;
  const float* corr;
};

// Weight-only: y[m, n] for n in [n0, n1), all m < M. x rows have stride ldx and, for
// per-channel SIMD kernels, are zero-padded to Kp. y rows have stride ldy.
using WeightOnlyFn = void (*)(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y,
                              int64_t ldy, int64_t n0, int64_t n1);
// Quantize rows of x (stride ldx, K valid columns) to int8 with per-row scale
// sx = amax / 127, q = clamp(rint(x * (127 / amax)), -127, 127); rows of qx have
// stride Kp with zero padding (stored +128 as uint8 by the VNNI level). A row
// with NaN/Inf gets sx = NaN so its outputs are NaN, as in fp32.
using QuantRowsFn = void (*)(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int8_t* qx,
                             float* sx);
// Dynamic int8 GEMM over quantized rows qx [M, Kp].
using DynamicFn = void (*)(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y,
                           int64_t ldy, int64_t n0, int64_t n1);

struct KernelTable {
  WeightOnlyFn weight_only_int8;
  WeightOnlyFn weight_only_int4;
  QuantRowsFn quant_rows;
  DynamicFn dynamic;
  // Whether the SIMD weight-only kernels can handle this grouping (else scalar is used).
  int wo_chunk_int8;  // group length must be a multiple of this (per-channel always ok)
  int wo_chunk_int4;
};

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

}  // namespace aimass::quant::detail
