// The phase-plane path of stride-2 convs with few taps (ops_conv.h): the split of the input into
// zero-padded column phases, the offset-table tile's scalar reference and the work split.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "runtime/ops_conv.h"
#include "env_switch.h"

namespace aimass::runtime::conv {

namespace {
// Output rows per work item: the item's phase rows of one K-slice (2R + KH - 2 per channel and
// phase; 32 KiB for the stem's 3 channels at R = 2) stay in L1 while its tiles of every weight row
// block read them.
constexpr int64_t kPhaseRows = 2;
}  // namespace

bool phase_ok(const ops::Conv2dShape& s) {
  return s.G == 1 && s.SH == 2 && s.SW == 2 && s.DH == 1 && s.DW == 1 && !ops::is_pointwise(s) &&
         s.KH * s.KW > 1 && s.OH > 0 && s.OW > 0;
}

bool phase_pays(const ops::Conv2dShape& s) {
  return phase_ok(s) && s.C / s.G * s.KH * s.KW <= kKCPackedOne && s.OW >= kNR;
}

bool phase_enabled() {
  static const bool on = env_switch_on("AIMASS_CONV_PHASE");
  return on;
}

void phase_row_scalar(const float* src, int64_t W, int64_t PW, int64_t Wh, float* even, float* odd) {
  for (int64_t j = 0; j < Wh; ++j) {
    const int64_t e = 2 * j - PW, o = e + 1;
    even[j] = src && e >= 0 && e < W ? src[e] : 0.f;
    odd[j] = src && o >= 0 && o < W ? src[o] : 0.f;
  }
}

void tile_off_scalar(int64_t kc, const float* a, const float* b, const int32_t* off, float* c, int64_t ldc,
                     int64_t mvalid, int64_t ncols, bool accumulate, const float* bias, const float* res,
                     bool relu) {
  for (int64_t m = 0; m < mvalid; ++m) {
    float acc[kNR];
    for (int64_t j = 0; j < kNR; ++j) acc[j] = accumulate && j < ncols ? c[m * ldc + j] : 0.f;
    for (int64_t k = 0; k < kc; ++k) {
      const float av = a[k * kMR + m];
      const float* bk = b + off[k];
      for (int64_t j = 0; j < ncols; ++j) acc[j] += av * bk[j];
    }
    store_row_scalar(acc, ncols, bias ? bias + m : nullptr, res ? res + m * ldc : nullptr, relu, c + m * ldc);
  }
}

void run_phase(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y) {
  const ops::Conv2dShape& s = pc.s;
  AIMASS_CHECK(pc.w && phase_ok(s), ValueError,
               "conv::run_phase: the conv is not a packed, undilated, stride-2 conv larger than 1x1 (groups 1)");
  const bool simd = simd_level() >= SimdLevel::AVX512;
  const auto row_fn = simd ? phase_row_avx512 : phase_row_scalar;
  const auto tile = simd ? tile_off_avx512 : tile_off_scalar;
  const int64_t IHp = 2 * (s.OH - 1) + s.KH, Wh = phase_width(s), plane = IHp * Wh;
  const int64_t per_n = s.C * 2 * plane, HW = s.H * s.W;
  // the calling thread's slot 2 (the work below uses none): the workers read it after the fill
  float* xp = thread_scratch(2, static_cast<size_t>(N * per_n + kNR));
  std::memset(xp + N * per_n, 0, kNR * sizeof(float));  // the last tile's columns past the last row
  run_items(N * s.C * IHp, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t nc = r / IHp, rp = r % IHp, ih = rp - s.PH;
      float* even = xp + nc * 2 * plane + rp * Wh;
      row_fn(ih >= 0 && ih < s.H ? x + nc * HW + ih * s.W : nullptr, s.W, s.PW, Wh, even, even + plane);
    }
  });
  const int64_t P = s.OH * s.OW, OP = s.O * P, MB = pc.MB, Kc = pc.Kc, KS = pc.KS;
  std::vector<int32_t> off(static_cast<size_t>(Kc));
  for (int64_t k = 0; k < Kc; ++k) {
    const int64_t c = k / (s.KH * s.KW), kh = (k / s.KW) % s.KH, kw = k % s.KW;
    off[static_cast<size_t>(k)] = static_cast<int32_t>(((c * 2 + (kw & 1)) * IHp + kh) * Wh + (kw >> 1));
  }
  const int64_t npr = (s.OW + kNR - 1) / kNR, rg = (s.OH + kPhaseRows - 1) / kPhaseRows, groups = N * rg;
  const int64_t msplit = row_splits(groups, MB, 1, false);  // B is read in place: repeating it costs nothing
  run_items(groups * msplit, [&](int64_t i0, int64_t i1) {
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t g = it / msplit, mi = it % msplit, n = g / rg;
      const int64_t oh0 = (g % rg) * kPhaseRows, oh1 = std::min(s.OH, oh0 + kPhaseRows);
      const int64_t mb0 = MB * mi / msplit, mb1 = MB * (mi + 1) / msplit;
      for (int64_t k0 = 0; k0 < Kc; k0 += KS) {  // K-slices: the item's outputs accumulate in y
        const int64_t kc = std::min(KS, Kc - k0);
        const bool acc = k0 > 0, last = k0 + kc == Kc;
        for (int64_t mb = mb0; mb < mb1; ++mb) {
          const float* a = pc.w + (k0 * MB + mb * kc) * kMR;
          const int64_t mvalid = std::min(kMR, s.O - mb * kMR);
          const float* bias = last && pc.b ? pc.b + mb * kMR : nullptr;
          for (int64_t oh = oh0; oh < oh1; ++oh)
            for (int64_t p = 0; p < npr; ++p) {
              const int64_t ow0 = p * kNR, ncols = std::min(kNR, s.OW - ow0);
              const int64_t yo = n * OP + mb * kMR * P + oh * s.OW + ow0;
              tile(kc, a, xp + n * per_n + 2 * oh * Wh + ow0, off.data() + k0, y + yo, P, mvalid, ncols, acc, bias,
                   last && res ? res + yo : nullptr, last && relu);
            }
        }
      }
    }
  });
}

}  // namespace aimass::runtime::conv
