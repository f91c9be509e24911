// Internal to qlinear: the prepacked weight and the per-ISA kernel table.
// SIMD translation units see only this POD view (no std:: templates there).
#pragma once
#include <cstdint>

namespace aimass::quant::detail {

// Prepacked weight, as the kernels read it.
//   Kp  = K rounded up to 128; rows are zero-padded to Kp.
//   w8  (bits 8): int8 [N, Kp].
//   w4  (bits 4): [N, Kp/2] bytes in blocks of 128 elements (64 bytes = 16 dwords of 8
//       nibbles): element 16*j + d of a block is nibble j of dword d, stored as q + 8.
//       One 512-bit load then yields 8 vectors of 16 consecutive elements with a shift
//       and a 16-entry table lookup each (see int4_byte below).
//   scale: [N, ng] fp32.  G = group length (K when per-channel), ng = K / G.
//   Gk/ngk: the blocking the SIMD kernels use: per-channel -> one block of Kp
//       (x is zero-padded to Kp); grouped -> Gk = G, ngk = ng.
//   wq: int8 [N, Kp] for the dynamic path (== w8 for bits 8, unpacked for bits 4).
//   colsum: [N, ng] sum of the int8 weights of each group (VNNI +128 correction);
//   corr: [N] 128 * sum_g scale[n, g] * colsum[n, g].
// Where element k of a packed int4 row lives (static: each ISA's TU gets its own copy).
static inline int64_t int4_byte(int64_t k) { return (k >> 7) * 64 + (k & 15) * 4 + ((k >> 4) & 7) / 2; }
static inline int int4_shift(int64_t k) { return ((k >> 4) & 1) * 4; }
static inline int int4_get(const uint8_t* row, int64_t k) { return ((row[int4_byte(k)] >> int4_shift(k)) & 15) - 8; }

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
  // wvnni (per-channel, built where the CPU has AVX-512 VNNI): int8
  // [ceil(N/64)][Kp/4][4][16][4]: block b holds columns 64b..64b+63 (zero padded past N);
  // for each step of 4 k it stores 4 panels of 16 columns, each column's 4 consecutive k
  // in one int32 lane. One 64-byte load is a vpdpbusd operand for 16 columns, and a
  // 64-column tile reads its block as one sequential stream (at batch 1 the weights come
  // from L3/DRAM: one stream measured 0.23 ms against 0.30 ms for 4 panels 64 KiB apart,
  // N = K = 4096, 1 thread; the read roof is 0.22 ms).
  const int8_t* wvnni;
  // wsum (bits 8, per-channel): [N] sum of each int8 weight row (the int16-activation
  // kernels remove the +128 offset of their high byte plane with it).
  const int32_t* wsum;
  // w4p (bits 4, groups of 128k elements or per-channel, Kp <= 65536, built where the CPU
  // has AVX2): the int4 weights again, as column panels for the int16-activation kernels
  // of the AVX2 and AVX-512 levels (layout: int4_panel_* below).
  const uint8_t* w4p = nullptr;
  // bias [N] or null: the VNNI panels kernel (dynamic_panels) adds it in its register
  // epilogue (y = dot * sx * scale + bias, the same operations and order as adding it after).
  const float* bias = nullptr;
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

// Dynamic int8 GEMM straight from packed int4 weights (no int8 copy): qxp [M, Kp] holds
// the quantized rows permuted to the nibble order of a 128-block (bytes [0, 64): element
// 32t + d at 4d + t; bytes [64, 128): element 32t + 16 + d at 4d + t), qsum [M, ngk] the
// sum of each row's quantized values per group (removes the +8 nibble offset).
using DynamicInt4Fn = void (*)(const WeightView& w, const int8_t* qxp, const int32_t* qsum, const float* sx,
                               int64_t M, float* y, int64_t ldy, int64_t n0, int64_t n1);

// int16 activations for the weight-only int8 kernels (per-channel weights, Kp <= 65536).
// quant_rows16 quantizes each row with sx = amax / 32767, q = clamp(rint(x * (32767 /
// amax)), -32767, 32767) (same NaN/Inf rule as QuantRowsFn) into 2 * Kp bytes per row
// (zero padded) in the layout its level's kernel reads: int16 q [M, Kp] (scalar, AVX2), or two u8 planes [M][2][Kp] (VNNI:
// lo = q & 0xFF, then hi = (q >> 8) + 128). The kernel computes the exact integer dot
// d = sum_k q[m, k] * w[n, k] and y[m, n] = float(double(d) * double(sx[m] * scale[n])),
// so every level gives bit-identical results.
using QuantRows16Fn = void (*)(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa,
                               float* sx);
using WeightOnly16Fn = void (*)(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y,
                                int64_t ldy, int64_t n0, int64_t n1);

// int16 activations for the weight-only int4 kernels (groups a multiple of 128 or
// per-channel, Kp <= 65536). quant_rows16_int4 quantizes x exactly as QuantRows16Fn (same
// q and sx) into rows of int4_a16_row_bytes(Kp) bytes in its level's layout: int16 q [Kp]
// (scalar), or (AVX2, AVX-512 VNNI) the low bytes lo[k] = q & 0xFF [Kp], the high bytes
// hi[k] = q >> 8 (signed) [Kp], then one int32 per 128-chunk c: -8 * sum of q over the
// chunk (the kernels multiply both planes with the stored nibbles u = w + 8:
// dot(q, u) - 8 * sum(q) = dot(q, w)). Every level computes, per 128-chunk c of k (in
// order; chunk c lies in group g(c) = 128c / G, or 0 when per-channel), the exact int32 dot
// d[c] = sum q[k] * w[k] (|d| < 2^25), then f = fma(float(d[c]), scale[n, g(c)], f) and
// y = f * sx[m]: every level gives bit-identical results.
inline int64_t int4_a16_row_bytes(int64_t Kp) { return 3 * Kp; }

// The panel layout of w4p. Columns in blocks of 64 (N rounded up; padding decodes to 0 with
// scale 0); a block is one sequential stream of Kp / 128 chunks of kInt4PanelChunkBytes:
// 16 steps of 8 k, each 4 panels of 16 columns x 4 bytes (one 64-byte line per panel:
// byte t of column j holds u[k + t] in its low and u[k + 4 + t] in its high nibble,
// u = w + 8), then the 64 columns' fp32 scales for the chunk's group. One AND and one
// shift give two vpdpbusd operands of 16 columns x 4 k, each meeting a broadcast 4-byte
// group of x's byte planes: the accumulators are columns, so no horizontal sums, and a
// chunk's int32 -> fp32 conversion and scale FMA are shared by 16 columns.
constexpr int64_t kInt4PanelStepBytes = 256;
constexpr int64_t kInt4PanelChunkBytes = 16 * kInt4PanelStepBytes + 64 * 4;
inline int64_t int4_panel_block_bytes(int64_t Kp) { return Kp / 128 * kInt4PanelChunkBytes; }
// Byte of the panel block holding element k of column j (0..63) and its nibble shift.
inline int64_t int4_panel_byte(int64_t j, int64_t k) {
  return (k >> 7) * kInt4PanelChunkBytes + ((k & 127) >> 3) * kInt4PanelStepBytes + j * 4 + (k & 3);
}
inline int int4_panel_shift(int64_t k) { return (k & 4) ? 4 : 0; }
// Fixed-order sum of 16 lanes (a tree), shared by every level so results match bit for bit.
static inline float lane_sum16(const float* v) {
  float a[8], b[4];
  for (int i = 0; i < 8; ++i) a[i] = v[i] + v[i + 8];
  for (int i = 0; i < 4; ++i) b[i] = a[i] + a[i + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
}

// One 128-block of the VNNI layout from 128 int16 values q (see quant_rows16_int4).
static inline void int4_a16_block(const int16_t* q, uint8_t* out) {
  int32_t* corr = reinterpret_cast<int32_t*>(out + 256);
  for (int d = 0; d < 16; ++d) {
    int32_t hs = 0;
    for (int t = 0; t < 4; ++t) {
      const int a = q[32 * t + d], b = q[32 * t + 16 + d];
      out[4 * d + t] = static_cast<uint8_t>(a & 0xFF);
      out[64 + 4 * d + t] = static_cast<uint8_t>(b & 0xFF);
      out[128 + 4 * d + t] = static_cast<uint8_t>((a >> 8) & 0xFF);
      out[192 + 4 * d + t] = static_cast<uint8_t>((b >> 8) & 0xFF);
      hs += a + b;
    }
    corr[d] = -8 * hs;
  }
}

struct KernelTable {
  WeightOnlyFn weight_only_int8;
  WeightOnlyFn weight_only_int4;
  QuantRowsFn quant_rows;
  DynamicFn dynamic;
  // Whether the SIMD weight-only kernels can handle this grouping (else scalar is used).
  int wo_chunk_int8;  // group length must be a multiple of this (per-channel always ok)
  int wo_chunk_int4;
  DynamicInt4Fn dynamic_int4;  // null where the level has none
  // Per-channel dynamic GEMM over w.wvnni (outer-product tiles, no horizontal sums);
  // n0 must be a multiple of 64. Null where the level has none.
  DynamicFn dynamic_panels;
  QuantRows16Fn quant_rows16;
  // Over the int8 rows w.w8; null at the AVX-512 level, which always has the blocks.
  WeightOnly16Fn weight_only_int8_a16;
  // The same over w.wvnni (same results bit for bit); n0 must be a multiple of 64. Null
  // where the level has none.
  WeightOnly16Fn weight_only_int8_a16_panels;
  // int4 weights, int16 activations (see int4_a16_row_bytes); null where the level has none.
  QuantRows16Fn quant_rows16_int4;
  WeightOnly16Fn weight_only_int4_a16;
};

const KernelTable& scalar_kernels();
const KernelTable& avx2_kernels();
const KernelTable& avx512_kernels();

}  // namespace aimass::quant::detail
