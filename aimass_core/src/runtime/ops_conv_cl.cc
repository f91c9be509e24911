// The CL path of pointwise convs on small planes (ops_conv.h): when it pays, and the work split.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "runtime/ops_conv.h"
#include "env_switch.h"

namespace aimass::runtime::conv {

namespace {
// AIMASS_CONV_CL: 0 off, 2 every pointwise conv with >= kCLRows outputs (tests, A/B), else cl_pays' rule
int cl_mode() {
  static const int mode = [] {
    const char* e = std::getenv("AIMASS_CONV_CL");
    return e && *e ? std::atoi(e) : 1;
  }();
  return mode;
}
}  // namespace

bool cl_enabled() { return cl_mode() != 0; }

bool cl_pays(const ops::Conv2dShape& s, int64_t N) {
  if (!cl_enabled() || !ops::is_pointwise(s) || s.G != 1 || s.O < kCLRows || N < 1) return false;
  if (cl_mode() == 2) return true;
  // lanes the pixel panels fill: full 32-column panels, a tail of <= 16 in a half tile
  const int64_t P = s.OH * s.OW, NPix = N * P, tail = NPix % kNR;
  const int64_t cols = NPix / kNR * kNR + (tail == 0 ? 0 : tail <= 16 ? 16 : kNR);
  // every CL tile re-reads its sample's taps from L2 (or L3): the input's size bounds the path
  const int64_t in_bytes = N * s.C * s.H * s.W * static_cast<int64_t>(sizeof(float));
  if (in_bytes > (int64_t{8} << 20)) return false;
  // ResNet-50, 1 thread, min of 45 calls (batch 8: 6), loaded machine, panels -> CL (onnxruntime's min):
  // - planes of <= 64 pixels at any batch (7x7: 49 of 64 lanes at batch 1): 2048 -> 512 1.20 -> 1.00 ms
  //   (0.97-0.99), 512 -> 2048 1.20 -> 1.05 (1.02); batch 8 7.9 -> 7.6-7.9 (7.56), 8.3 -> 7.95 (7.70);
  // - reducing convs (O <= C / 2: the panels' K-slices read and write the output per slice) on
  //   planes <= 256 pixels: 14x14 1024 -> 256 1.01 -> 0.90 (0.91), batch 8 8.6 -> 7.7-8.1 (7.3);
  //   1024 -> 512 1.96 -> 1.80 (1.81);
  // - <= 256 pixels in all (14x14 at batch 1, whose last panel fills 4 of 16 lanes): 256 -> 1024
  //   1.00 -> 0.98 (0.93), same at batch 8 (panels kept);
  // - panels wasting a sixteenth of their lanes, the input within 1 MiB.
  // Slower with CL: 28x28 and 56x56 planes (28x28 128 -> 512: 0.94 -> 1.02; 512 -> 256 batch 8: 15.6 -> 20.9).
  if (P <= 64 || (P <= 256 && 2 * s.O <= s.C) || NPix <= 256) return true;
  return 16 * NPix < 15 * cols && in_bytes <= (int64_t{1} << 20);
}

void tile_cl_scalar(const float* wb, int64_t Kc, const float* bias, const float* xb, int64_t HW, int64_t R, float* yb,
                    int64_t P, int64_t ov, const float* resb, bool relu) {
  for (int64_t m = 0; m < ov; ++m)
    for (int64_t j = 0; j < R; ++j) {
      float acc = 0.f;
      for (int64_t k = 0; k < Kc; ++k) acc += wb[k * kCLRows + m] * xb[k * HW + j];
      float v = bias ? acc + bias[m] : acc;
      if (resb) v += resb[m * P + j];
      yb[m * P + j] = relu ? (v < 0.f ? 0.f : v) : v;  // NaN kept
    }
}

bool decimate_ok(const ops::Conv2dShape& s) {
  return s.G == 1 && s.KH == 1 && s.KW == 1 && s.PH == 0 && s.PW == 0 && (s.SH > 1 || s.SW > 1) && s.OH > 0 &&
         s.OW > 0;
}

bool decimate_enabled() {
  static const bool on = env_switch_on("AIMASS_CONV_DECIMATE");
  return on;
}

ops::Conv2dShape pointwise_view(const ops::Conv2dShape& s) {
  return ops::Conv2dShape{s.C, s.OH, s.OW, s.O, 1, 1, 1, 1, 0, 0, 1, 1, 1, s.OH, s.OW};
}

void decimate_row_scalar(const float* src, int64_t SW, int64_t OW, float* dst) {
  for (int64_t j = 0; j < OW; ++j) dst[j] = src[j * SW];
}

void decimate(const float* x, const ops::Conv2dShape& s, int64_t N, float* xd) {
  const auto row = simd_level() >= SimdLevel::AVX512 ? decimate_row_avx512 : decimate_row_scalar;
  const int64_t HW = s.H * s.W, OHW = s.OH * s.OW;
  run_items(N * s.C, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t oh = 0; oh < s.OH; ++oh) row(x + i * HW + oh * s.SH * s.W, s.SW, s.OW, xd + i * OHW + oh * s.OW);
  });
}

void PackedConv::pack_cl(const float* weight) {
  const int64_t CB = (s.O + kCLRows - 1) / kCLRows;
  clbuf = AlignedBuffer(static_cast<size_t>(CB * Kc * kCLRows) * sizeof(float));  // zeroed
  wcl = static_cast<float*>(clbuf.data());
  for (int64_t o = 0; o < s.O; ++o) {
    float* dst = wcl + (o / kCLRows) * Kc * kCLRows + o % kCLRows;
    const float* src = weight + o * Kc;
    for (int64_t k = 0; k < Kc; ++k) dst[k * kCLRows] = src[k];
  }
}

void run_cl(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y) {
  AIMASS_CHECK(ops::is_pointwise(pc.s), ValueError, "conv::run_cl: a 1x1 stride-1 unpadded conv only");
  cl_shape(pc, pc.s, x, N, res, relu, y);
}

void cl_shape(const PackedConv& pc, const ops::Conv2dShape& s, const float* x, int64_t N, const float* res, bool relu,
              float* y) {
  AIMASS_CHECK(pc.wcl, ValueError, "conv::run_cl: the conv's CL weights were not packed");
  const auto tile = simd_level() >= SimdLevel::AVX512 ? tile_cl_avx512 : tile_cl_scalar;
  const int64_t P = s.OH * s.OW, HW = s.H * s.W, CHW = s.C * HW, OP = s.O * P, Kc = pc.Kc;
  const int64_t nt = (P + kCLPix - 1) / kCLPix;          // pixel tiles per sample, (almost) equal
  const int64_t CB = (s.O + kCLRows - 1) / kCLRows;      // 32-channel blocks
  const int64_t per_cb = N * nt;
  // channel-block-major: consecutive items share the block's weights (32 x Kc floats, in L2)
  run_items(CB * per_cb, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t cb = it / per_cb, n = (it % per_cb) / nt, t = it % nt;
      const int64_t p0 = P * t / nt, p1 = P * (t + 1) / nt;
      const int64_t co0 = cb * kCLRows, ov = std::min(kCLRows, s.O - co0);
      const int64_t yo = n * OP + co0 * P + p0;
      tile(pc.wcl + cb * Kc * kCLRows, Kc, pc.b ? pc.b + co0 : nullptr, x + n * CHW + p0, HW, p1 - p0, y + yo, P, ov,
           res ? res + yo : nullptr, relu);
    }
  });
}

}  // namespace aimass::runtime::conv
