// The conv paths (runtime/ops_conv.h) against a double-precision direct convolution, at every SIMD
// level this CPU runs and at 1 and 2 threads. Winograd F(2x2, 3x3), also against the direct packed
// kernel: odd output sizes (tiles clipped at the edge), padding 0-2, tile panels that cross
// samples, K-slices (C > 128), output channels off the 8-row blocks, bias / residual / ReLU
// epilogues, and the per-batch choice between the two paths. The direct path: long and two-panel
// groups, in-place and packed 1x1 panels, strides 1 and 2, the 7x7/2 stem, K-slices.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "runtime/ops_conv.h"

namespace conv = aimass::runtime::conv;
using aimass::SimdLevel;
using aimass::runtime::ops::Conv2dShape;

namespace {

std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out;
  const SimdLevel best = aimass::set_simd_level(SimdLevel::AVX512);
  for (SimdLevel l : {SimdLevel::Scalar, SimdLevel::AVX2, SimdLevel::AVX512})
    if (static_cast<int>(l) <= static_cast<int>(best)) out.push_back(l);
  return out;
}

Conv2dShape shape3x3(int64_t C, int64_t H, int64_t W, int64_t O, int64_t pad) {
  Conv2dShape s{C, H, W, O, 3, 3, 1, 1, pad, pad, 1, 1, 1, H + 2 * pad - 2, W + 2 * pad - 2};
  return s;
}

// y = relu?(conv(x) + bias + res) for any kernel, stride, padding and dilation (groups 1), in double
std::vector<double> reference(const Conv2dShape& s, int64_t N, const std::vector<float>& x,
                              const std::vector<float>& w, const float* bias, const float* res, bool relu) {
  std::vector<double> y(static_cast<size_t>(N * s.O * s.OH * s.OW));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t o = 0; o < s.O; ++o)
      for (int64_t oh = 0; oh < s.OH; ++oh)
        for (int64_t ow = 0; ow < s.OW; ++ow) {
          double acc = 0;
          for (int64_t c = 0; c < s.C; ++c)
            for (int64_t kh = 0; kh < s.KH; ++kh)
              for (int64_t kw = 0; kw < s.KW; ++kw) {
                const int64_t ih = oh * s.SH - s.PH + kh * s.DH, iw = ow * s.SW - s.PW + kw * s.DW;
                if (ih < 0 || ih >= s.H || iw < 0 || iw >= s.W) continue;
                acc += double(w[((o * s.C + c) * s.KH + kh) * s.KW + kw]) * x[((n * s.C + c) * s.H + ih) * s.W + iw];
              }
          const size_t i = static_cast<size_t>(((n * s.O + o) * s.OH + oh) * s.OW + ow);
          if (bias) acc += bias[o];
          if (res) acc += res[i];
          y[i] = relu ? std::max(acc, 0.0) : acc;
        }
  return y;
}

std::vector<float> randv(std::mt19937& rng, size_t n, float scale) {
  std::uniform_real_distribution<float> d(-scale, scale);
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}

// Random input, weights (scaled by 1/sqrt(taps)), bias and residual for one conv, and the double
// reference of relu?(conv(x) + bias + res) with its largest magnitude.
struct ConvData {
  std::vector<float> x, w, b, r;
  const float* bias;
  const float* res;
  std::vector<double> want;
  double scale = 1e-30;
  size_t ny;
  ConvData(std::mt19937& rng, const Conv2dShape& s, int64_t N, bool with_bias, bool with_res, bool relu) {
    const int64_t taps = s.C * s.KH * s.KW;
    x = randv(rng, static_cast<size_t>(N * s.C * s.H * s.W), 1.f);
    w = randv(rng, static_cast<size_t>(s.O * taps), 1.f / std::sqrt(float(taps)));
    b = randv(rng, static_cast<size_t>(s.O), 0.5f);
    ny = static_cast<size_t>(N * s.O * s.OH * s.OW);
    r = randv(rng, ny, 1.f);
    bias = with_bias ? b.data() : nullptr;
    res = with_res ? r.data() : nullptr;
    want = reference(s, N, x, w, bias, res, relu);
    for (double v : want) scale = std::max(scale, std::fabs(v));
  }
  ConvData(const ConvData&) = delete;  // bias / res point into this object
  ConvData& operator=(const ConvData&) = delete;
};

struct Case {
  int64_t C, H, W, O, pad, N;
  bool bias, res, relu;
};

}  // namespace

TEST(RuntimeConvWinograd, MatchesDoubleReferenceAndDirectKernel) {
  const Case cases[] = {
      {16, 9, 9, 24, 1, 3, true, true, true},     // 5x5 tiles per sample, panels crossing samples
      {20, 7, 11, 17, 1, 2, true, false, false},  // O off the 8-row blocks, odd sizes (edge tiles clipped)
      {200, 6, 6, 16, 1, 1, false, true, true},   // C > 128: two K-slices
      {16, 12, 40, 16, 2, 1, true, false, true},  // padding 2, runs of > 16 tiles (two vector chunks)
      {24, 8, 8, 32, 0, 2, true, true, false},    // no padding
      {16, 3, 3, 16, 0, 4, false, false, true},   // 1x1 output: one clipped tile per sample
      {136, 7, 7, 20, 1, 1, true, true, true},    // 16 tiles: one half-width panel, two K-slices
      {24, 7, 7, 16, 1, 3, true, false, true},    // 48 tiles: a full panel, then a half one across samples
      {144, 14, 14, 20, 1, 1, true, true, true},  // 49 tiles: a full panel and a 17-column tail, two K-slices
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  std::mt19937 rng(7);
  for (const Case& k : cases) {
    const Conv2dShape s = shape3x3(k.C, k.H, k.W, k.O, k.pad);
    ASSERT_TRUE(conv::wino_eligible(s));
    const ConvData d(rng, s, k.N, k.bias, k.res, k.relu);
    const std::vector<float>& x = d.x;
    const float* res = d.res;
    const std::vector<double>& want = d.want;
    const double scale = d.scale;
    const size_t ny = d.ny;
    conv::PackedConv pc(d.w.data(), d.bias, s, conv::PackedConv::kBoth);
    ASSERT_NE(pc.u, nullptr);
    ASSERT_NE(pc.w, nullptr);
    for (SimdLevel lv : levels()) {
      aimass::set_simd_level(lv);
      for (int t : {1, 2}) {
        aimass::set_num_threads(t);
        std::vector<float> yw(ny, std::numeric_limits<float>::quiet_NaN()), yd(ny);
        conv::run_winograd(pc, x.data(), k.N, res, k.relu, yw.data());
        conv::run_direct(pc, x.data(), k.N, res, k.relu, yd.data());
        for (size_t i = 0; i < ny; ++i) {
          ASSERT_NEAR(yw[i], want[i], 2e-6 * scale)
              << "C" << k.C << " " << k.H << "x" << k.W << " O" << k.O << " level " << static_cast<int>(lv)
              << " threads " << t << " i=" << i;
          ASSERT_NEAR(yw[i], yd[i], 4e-6 * scale) << "winograd vs direct, i=" << i;
        }
      }
    }
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

TEST(RuntimeConvWinograd, EligibilityAndPerBatchChoice) {
  Conv2dShape s = shape3x3(64, 56, 56, 64, 1);
  EXPECT_TRUE(conv::wino_eligible(s));
  EXPECT_TRUE(conv::wino_pays(s, 1));
  Conv2dShape strided = s;
  strided.SH = strided.SW = 2;
  EXPECT_FALSE(conv::wino_eligible(strided));
  Conv2dShape dilated = s;
  dilated.DH = 2;
  EXPECT_FALSE(conv::wino_eligible(dilated));
  EXPECT_FALSE(conv::wino_eligible(shape3x3(3, 56, 56, 64, 1)));  // too few channels to pay
  // a 7x7 plane is 16 tiles at batch 1, one half-width panel (direct: a full and a 17-column panel),
  // four full panels at batch 8
  const Conv2dShape late = shape3x3(512, 7, 7, 512, 1);
  EXPECT_TRUE(conv::wino_pays(late, 1));
  EXPECT_TRUE(conv::wino_pays(late, 8));
  // a 3x3 plane: one clipped tile against 9 pixels, both a half panel (16 vs 9 products: direct)
  EXPECT_FALSE(conv::wino_pays(shape3x3(64, 3, 3, 64, 1), 1));
  // kAuto keeps the direct weights only for shapes that run direct at some batch size
  std::vector<float> w(static_cast<size_t>(16 * 16 * 9), 0.1f);
  const Conv2dShape big = shape3x3(16, 20, 20, 16, 1), small = shape3x3(16, 3, 3, 16, 1);
  conv::PackedConv a(w.data(), nullptr, big);
  conv::PackedConv c(w.data(), nullptr, small);
  conv::PackedConv d(w.data(), nullptr, big, conv::PackedConv::kNoWino);
  if (conv::wino_enabled()) {
    EXPECT_NE(a.u, nullptr);
    EXPECT_EQ(a.w, nullptr);
    EXPECT_NE(c.u, nullptr);
    EXPECT_NE(c.w, nullptr);
  }
  EXPECT_EQ(d.u, nullptr);
  EXPECT_NE(d.w, nullptr);
  std::vector<float> x(static_cast<size_t>(16 * 20 * 20), 1.f), y(static_cast<size_t>(16 * 18 * 18));
  if (!a.w) EXPECT_THROW(conv::run_direct(a, x.data(), 1, nullptr, false, y.data()), aimass::ValueError);
  EXPECT_THROW(conv::run_winograd(d, x.data(), 1, nullptr, false, y.data()), aimass::ValueError);
}

namespace {

Conv2dShape shape_any(int64_t C, int64_t H, int64_t W, int64_t O, int64_t k, int64_t stride, int64_t pad) {
  return Conv2dShape{C, H, W, O, k, k, stride, stride, pad, pad, 1, 1, 1, (H + 2 * pad - k) / stride + 1,
                     (W + 2 * pad - k) / stride + 1};
}

// run(y) at every SIMD level and 1, 2 and 3 threads, each y (NaN-filled first) within 2e-6 of the
// largest reference magnitude; `what` names the case in a failure.
template <class Run>
void expect_every_level(const ConvData& d, const std::string& what, Run run) {
  for (SimdLevel lv : levels()) {
    aimass::set_simd_level(lv);
    for (int t : {1, 2, 3}) {
      aimass::set_num_threads(t);
      std::vector<float> y(d.ny, std::numeric_limits<float>::quiet_NaN());
      run(y.data());
      for (size_t i = 0; i < d.ny; ++i)
        ASSERT_NEAR(y[i], d.want[i], 2e-6 * d.scale)
            << what << " level " << static_cast<int>(lv) << " threads " << t << " i=" << i;
    }
  }
}

}  // namespace

// The direct path's work split: long panel groups (one K-slice, planes >= kLongPlane, not reducing)
// and the two-panel groups, in-place 1x1 panels (and packed ones where the plane's rows are not
// 64-byte multiples), panels crossing samples, K-slices, odd sizes,
// strides 1 and 2, the 7x7/2 stem, at every SIMD level and 1 and 2 threads, against double.
TEST(RuntimeConvDirect, LongAndShortPanelGroupsMatchDoubleReference) {
  struct DCase {
    int64_t C, H, W, O, k, stride, pad, N;
    bool bias, res, relu, long_group;
  };
  const DCase cases[] = {
      {16, 20, 20, 24, 1, 1, 0, 3, true, true, true, true},     // 1x1 expand: in place, 400 px (panels cross samples)
      {16, 23, 19, 9, 1, 1, 0, 2, true, false, true, true},     // odd plane (packed: not 64-byte rows), O off 8
      {64, 17, 17, 8, 1, 1, 0, 2, true, true, false, false},    // reducing 1x1 (not long): 289 px
      {300, 17, 17, 16, 1, 1, 0, 1, false, true, true, false},  // C > 256: three K-slices, packed (289-px plane)
      {300, 16, 16, 16, 1, 1, 0, 1, true, true, true, false},   // three K-slices in place (256-px plane)
      {200, 16, 16, 24, 1, 1, 0, 1, true, true, true, false},   // 128 < C <= 256: two slices of 100 in place
      {136, 20, 20, 13, 1, 1, 0, 3, false, true, true, false},  // two slices of 68, panels crossing samples
      {256, 14, 14, 40, 1, 1, 0, 2, true, true, true, false},   // ResNet-50's 14x14 (packed), two slices of 128
      {3, 37, 37, 10, 7, 2, 3, 2, true, false, true, true},     // the 7x7/2 stem, 147 taps in one slice
      {20, 33, 33, 16, 3, 2, 1, 2, true, true, true, false},    // 3x3/2, 180 taps: two K-slices
      {16, 34, 34, 32, 1, 2, 0, 2, false, false, false, true},  // 1x1/2 (packed, strided)
      {8, 9, 9, 8, 3, 1, 1, 5, true, true, true, false},        // small plane (81 px) at batch 5
      {20, 13, 13, 19, 3, 2, 1, 1, true, true, true, false},    // 3x3/2 to 7x7: 49 = 32 + 17 px, two K-slices
      {8, 5, 5, 12, 3, 1, 1, 2, false, true, true, false},      // 50 = 32 + 18 px across samples
      {40, 13, 13, 24, 1, 2, 0, 1, true, false, true, false},   // 1x1/2 to 7x7 (packed): a 17-column tail
      {40, 28, 28, 24, 3, 2, 1, 1, true, true, true, false},    // 3x3/2 to 14x14: few groups, rows split again
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  std::mt19937 rng(11);
  for (const DCase& k : cases) {
    const Conv2dShape s = shape_any(k.C, k.H, k.W, k.O, k.k, k.stride, k.pad);
    const ConvData d(rng, s, k.N, k.bias, k.res, k.relu);
    conv::PackedConv pc(d.w.data(), d.bias, s, conv::PackedConv::kNoWino);
    ASSERT_NE(pc.w, nullptr);
    EXPECT_EQ(conv::long_group_ok(s, pc.Kc, pc.KS), k.long_group) << "C" << k.C << " k" << k.k << " O" << k.O;
    const std::string what = "C" + std::to_string(k.C) + " " + std::to_string(k.H) + "x" + std::to_string(k.W) +
                             " O" + std::to_string(k.O) + " k" + std::to_string(k.k) + "/" +
                             std::to_string(k.stride) + " N" + std::to_string(k.N);
    expect_every_level(d, what, [&](float* y) { conv::run_direct(pc, d.x.data(), k.N, d.res, k.relu, y); });
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

TEST(RuntimeConvDirect, GroupPanelsBounds) {
  // short groups: two panels (or all of them when fewer)
  EXPECT_EQ(conv::group_panels(100, 64, false, 1), conv::kGroupPanels);
  EXPECT_EQ(conv::group_panels(1, 64, false, 1), 1);
  EXPECT_EQ(conv::group_panels(1, 64, true, 2), 1);
  for (int64_t npt : {1, 3, 7, 49, 98, 784})
    for (int64_t kc : {1, 27, 64, 147, 256})
      for (int64_t t : {1, 2, 4}) {
        const int64_t g = conv::group_panels(npt, kc, true, t);
        EXPECT_GE(g, std::min(conv::kGroupPanels, npt));
        EXPECT_LE(g, std::min(conv::kMaxGroupPanels, npt));
        // within the L2 budget, and two groups per thread, unless that is below the two-panel floor
        if (g > conv::kGroupPanels) {
          EXPECT_LE(g * kc * conv::kNR * int64_t(sizeof(float)), conv::kGroupBytes);
          EXPECT_GE(npt / g, 2 * t);
        }
      }
  // ResNet-50's 56x56 64 -> 256 1x1 at batch 1, one thread: 98 panels in long groups of 32
  EXPECT_EQ(conv::group_panels(98, 64, true, 1), 32);
}

// The phase-plane path of stride-2 convs (no im2col): the 7x7/2 stem and other kernels at odd sizes,
// padding 0-3, output rows shorter and longer than a tile, K-slices, batch > 1, output channels off
// the 8-row blocks, bias / residual / ReLU, against double and against the packed path (NaN too), at
// the levels that take it (scalar, AVX-512) and 1 and 2 threads; and which shapes take it.
TEST(RuntimeConvPhase, MatchesDoubleReferenceAndPackedPath) {
  struct PCase {
    int64_t C, H, W, O, k, pad, N;
    bool bias, res, relu;
  };
  const PCase cases[] = {
      {3, 37, 70, 10, 7, 3, 2, true, false, true},    // the stem: 35-pixel rows (a tile and a 3-pixel tail)
      {3, 224, 224, 64, 7, 3, 1, true, false, true},  // ResNet's stem shape
      {3, 29, 31, 9, 7, 2, 3, false, true, false},    // odd sizes, residual without bias
      {5, 21, 67, 16, 5, 2, 1, true, true, true},     // 5x5/2: 34-pixel rows
      {20, 33, 33, 16, 3, 1, 2, true, true, true},    // 3x3/2, 180 taps: two K-slices, 17-pixel rows
      {4, 16, 66, 8, 2, 0, 3, true, false, false},    // 2x2/2 without padding, batch 3
      {1, 9, 9, 3, 3, 0, 1, false, false, true},      // one channel, 4x4 output
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  std::mt19937 rng(23);
  for (const PCase& k : cases) {
    const Conv2dShape s = shape_any(k.C, k.H, k.W, k.O, k.k, 2, k.pad);
    ASSERT_TRUE(conv::phase_ok(s));
    ConvData d(rng, s, k.N, k.bias, k.res, k.relu);
    conv::PackedConv pc(d.w.data(), d.bias, s, conv::PackedConv::kNoWino);
    const std::string what = "C" + std::to_string(k.C) + " " + std::to_string(k.H) + "x" + std::to_string(k.W) +
                             " O" + std::to_string(k.O) + " k" + std::to_string(k.k) + " pad " +
                             std::to_string(k.pad) + " N" + std::to_string(k.N);
    expect_every_level(d, what, [&](float* y) { conv::run_phase(pc, d.x.data(), k.N, d.res, k.relu, y); });
    // a NaN input reaches exactly the outputs whose windows cover it, as on the packed path
    d.x[d.x.size() / 2 + 1] = std::numeric_limits<float>::quiet_NaN();
    for (SimdLevel lv : levels()) {
      aimass::set_simd_level(lv);
      std::vector<float> yp(d.ny), yd(d.ny);
      conv::run_phase(pc, d.x.data(), k.N, d.res, k.relu, yp.data());
      const bool saved = pc.phase;
      pc.phase = false;
      conv::run_direct(pc, d.x.data(), k.N, d.res, k.relu, yd.data());
      pc.phase = saved;
      size_t nans = 0;
      for (size_t i = 0; i < d.ny; ++i) {
        ASSERT_EQ(std::isnan(yp[i]), std::isnan(yd[i])) << "i=" << i << " level " << static_cast<int>(lv);
        nans += std::isnan(yp[i]);
        if (!std::isnan(yd[i])) ASSERT_NEAR(yp[i], yd[i], 2e-6 * d.scale);
      }
      EXPECT_GT(nans, 0u);
    }
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

TEST(RuntimeConvPhase, Eligibility) {
  const Conv2dShape stem = shape_any(3, 224, 224, 64, 7, 2, 3);
  EXPECT_TRUE(conv::phase_ok(stem));
  EXPECT_TRUE(conv::phase_pays(stem));
  EXPECT_TRUE(conv::phase_ok(shape_any(128, 56, 56, 128, 3, 2, 1)));
  EXPECT_FALSE(conv::phase_pays(shape_any(128, 56, 56, 128, 3, 2, 1)));  // 9 K-slices, 28-pixel rows
  EXPECT_FALSE(conv::phase_pays(shape_any(3, 40, 40, 64, 7, 2, 3)));     // 20-pixel rows
  EXPECT_FALSE(conv::phase_ok(shape_any(64, 56, 56, 256, 1, 2, 0)));     // 1x1/2
  EXPECT_FALSE(conv::phase_ok(shape_any(3, 64, 64, 8, 3, 1, 1)));        // stride 1
  Conv2dShape dil = stem;
  dil.DH = dil.DW = 2;
  EXPECT_FALSE(conv::phase_ok(dil));
  std::vector<float> w(static_cast<size_t>(8 * 3 * 9), 0.1f), x(3 * 64 * 64), y(8 * 64 * 64);
  const Conv2dShape s1 = shape_any(3, 64, 64, 8, 3, 1, 1);
  conv::PackedConv pc(w.data(), nullptr, s1, conv::PackedConv::kNoWino);
  EXPECT_FALSE(pc.phase);
  EXPECT_THROW(conv::run_phase(pc, x.data(), 1, nullptr, false, y.data()), aimass::ValueError);
  conv::PackedConv ps(std::vector<float>(64 * 147, 0.1f).data(), nullptr, stem, conv::PackedConv::kNoWino);
  EXPECT_EQ(ps.phase, conv::phase_enabled());
}

// The 8 x 32 tiles of every level against the scalar tile at every column count (the AVX-512 tile
// runs <= 16 columns as a half tile and 17..20 as the half tile plus per-column ymm accumulators),
// every row count, with and without accumulation, bias, residual and ReLU; a NaN in B reaches only
// its own column (rows keep it through ReLU).
TEST(RuntimeConvTile, EveryLevelMatchesScalarAtEveryWidth) {
  const SimdLevel best = aimass::set_simd_level(SimdLevel::AVX512);
  aimass::set_simd_level(best);
  std::mt19937 rng(13);
  const int64_t ldc = 37;
  for (int64_t kc : {1, 2, 7, 64, 129}) {
    aimass::AlignedBuffer abuf(static_cast<size_t>(kc * conv::kMR) * sizeof(float)),
        bbuf(static_cast<size_t>(kc * conv::kNR) * sizeof(float));
    float* a = static_cast<float*>(abuf.data());
    float* b = static_cast<float*>(bbuf.data());
    const std::vector<float> av = randv(rng, static_cast<size_t>(kc * conv::kMR), 1.f),
                             bv = randv(rng, static_cast<size_t>(kc * conv::kNR), 1.f);
    std::copy(av.begin(), av.end(), a);
    std::copy(bv.begin(), bv.end(), b);
    b[(kc / 2) * conv::kNR + 17] = std::numeric_limits<float>::quiet_NaN();  // column 17
    const std::vector<float> bias = randv(rng, 8, 1.f), res = randv(rng, 8 * ldc, 1.f),
                             c0 = randv(rng, 8 * ldc, 1.f);
    for (int64_t ncols = 1; ncols <= conv::kNR; ++ncols)
      for (int64_t mvalid : {1, 5, 8})
        for (int flags = 0; flags < 16; ++flags) {
          const bool acc = flags & 1, relu = flags & 8;
          const float* bp = flags & 2 ? bias.data() : nullptr;
          const float* rp = flags & 4 ? res.data() : nullptr;
          std::vector<float> want = c0;
          conv::tile_scalar(kc, a, b, want.data(), ldc, mvalid, ncols, acc, bp, rp, relu);
          for (SimdLevel lv : {SimdLevel::AVX2, SimdLevel::AVX512}) {
            if (static_cast<int>(lv) > static_cast<int>(best)) continue;
            std::vector<float> got = c0;
            conv::tile_for(lv)(kc, a, b, got.data(), ldc, mvalid, ncols, acc, bp, rp, relu);
            for (int64_t m = 0; m < 8; ++m)
              for (int64_t j = 0; j < ldc; ++j) {
                const size_t i = static_cast<size_t>(m * ldc + j);
                if (m >= mvalid || j >= ncols) {
                  ASSERT_EQ(got[i], c0[i]) << "outside the tile: m " << m << " j " << j << " ncols " << ncols;
                } else if (std::isnan(want[i])) {
                  ASSERT_TRUE(std::isnan(got[i])) << "m " << m << " j " << j;
                  ASSERT_EQ(j, 17);
                } else {
                  ASSERT_NEAR(got[i], want[i], 1e-5 * (std::sqrt(double(kc)) + std::fabs(want[i])))
                      << "level " << static_cast<int>(lv) << " kc " << kc << " ncols " << ncols << " mvalid "
                      << mvalid << " flags " << flags << " m " << m << " j " << j;
                }
              }
          }
        }
  }
  aimass::set_simd_level(best);
}

// The CL path of pointwise convs (output channels in the lanes, ops_conv.h): against double at every
// SIMD level (the scalar tile below AVX-512) and 1-3 threads: odd channel counts, output channels off
// the 32-channel blocks, planes of 1 to 143 pixels (tiles of 1..12), batch > 1, bias / residual /
// ReLU; run_direct takes it where cl_pays; the residual may be the output itself.
TEST(RuntimeConvCL, MatchesDoubleReference) {
  struct CCase {
    int64_t C, H, W, O, N;
    bool bias, res, relu;
  };
  const CCase cases[] = {
      {64, 7, 7, 32, 1, true, true, true},      // ResNet-50's 7x7 at batch 1: tiles of 10, 10, 10, 10, 9
      {40, 5, 3, 72, 3, true, false, true},     // 15-px plane (tiles of 7, 8), O = 2 x 32 + 8
      {301, 11, 13, 33, 2, false, true, true},  // odd C past a K-slice, 143 px, O = 32 + 1
      {17, 1, 1, 64, 5, true, true, false},     // one pixel per sample (R = 1)
      {96, 12, 1, 40, 2, true, true, true},     // a full 12-pixel tile
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  std::mt19937 rng(21);
  for (const CCase& k : cases) {
    const Conv2dShape s = shape_any(k.C, k.H, k.W, k.O, 1, 1, 0);
    const ConvData d(rng, s, k.N, k.bias, k.res, k.relu);
    conv::PackedConv pc(d.w.data(), d.bias, s, conv::PackedConv::kBoth);
    ASSERT_NE(pc.wcl, nullptr);
    ASSERT_NE(pc.w, nullptr);
    const std::string what = "C" + std::to_string(k.C) + " " + std::to_string(k.H) + "x" + std::to_string(k.W) +
                             " O" + std::to_string(k.O) + " N" + std::to_string(k.N);
    expect_every_level(d, what, [&](float* y) { conv::run_cl(pc, d.x.data(), k.N, d.res, k.relu, y); });
    // run_direct: CL where it pays, else the panels; both within tolerance
    expect_every_level(d, what + " direct", [&](float* y) { conv::run_direct(pc, d.x.data(), k.N, d.res, k.relu, y); });
    if (k.res) {  // the residual is the output buffer (the executor's in-place add)
      expect_every_level(d, what + " res=y", [&](float* y) {
        std::copy(d.r.begin(), d.r.end(), y);
        conv::run_cl(pc, d.x.data(), k.N, y, k.relu, y);
      });
    }
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

// A NaN input reaches every output channel of its pixel and no other pixel (ReLU keeps NaN, as torch does).
TEST(RuntimeConvCL, NonFinitePlacement) {
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  const Conv2dShape s = shape_any(48, 7, 7, 64, 1, 1, 0);
  const int64_t N = 2, P = 49;
  std::mt19937 rng(5);
  std::vector<float> x = randv(rng, static_cast<size_t>(N * s.C * P), 1.f);
  std::vector<float> w = randv(rng, static_cast<size_t>(s.O * s.C), 0.2f);
  std::vector<float> b = randv(rng, static_cast<size_t>(s.O), 0.5f);
  const int64_t nan_n = 1, nan_c = 30, nan_p = 23;
  x[static_cast<size_t>((nan_n * s.C + nan_c) * P + nan_p)] = std::numeric_limits<float>::quiet_NaN();
  conv::PackedConv pc(w.data(), b.data(), s, conv::PackedConv::kBoth);
  for (SimdLevel lv : levels()) {
    aimass::set_simd_level(lv);
    for (int t : {1, 2}) {
      aimass::set_num_threads(t);
      std::vector<float> y(static_cast<size_t>(N * s.O * P), 0.f);
      conv::run_cl(pc, x.data(), N, nullptr, true, y.data());
      for (int64_t n = 0; n < N; ++n)
        for (int64_t o = 0; o < s.O; ++o)
          for (int64_t p = 0; p < P; ++p) {
            const float v = y[static_cast<size_t>((n * s.O + o) * P + p)];
            if (n == nan_n && p == nan_p)
              EXPECT_TRUE(std::isnan(v)) << "level " << int(lv) << " o=" << o;
            else
              EXPECT_TRUE(std::isfinite(v) && v >= 0.f)
                  << "level " << int(lv) << " n=" << n << " o=" << o << " p=" << p;
          }
    }
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

TEST(RuntimeConvCL, Eligibility) {
  const Conv2dShape r7 = shape_any(2048, 7, 7, 512, 1, 1, 0);     // 7x7, 49 px at batch 1: 49 of 64 lanes
  const Conv2dShape e14 = shape_any(256, 14, 14, 1024, 1, 1, 0);  // expanding 14x14: CL at batch 1 only
  const Conv2dShape e28 = shape_any(128, 28, 28, 512, 1, 1, 0);   // expanding 28x28: panels
  const Conv2dShape r14 = shape_any(1024, 14, 14, 256, 1, 1, 0);  // reducing 14x14: CL
  const Conv2dShape r28 = shape_any(512, 28, 28, 256, 1, 1, 0);   // 28x28 reducing: panels
  EXPECT_TRUE(conv::cl_pays(r7, 1));
  EXPECT_TRUE(conv::cl_pays(r7, 8));    // 7x7 planes at any batch with the input within 8 MiB
  EXPECT_FALSE(conv::cl_pays(r7, 64));  // 25 MiB of input
  EXPECT_TRUE(conv::cl_pays(r14, 8));   // reducing 14x14
  EXPECT_TRUE(conv::cl_pays(e14, 1));
  EXPECT_FALSE(conv::cl_pays(e14, 2));
  EXPECT_FALSE(conv::cl_pays(e28, 1));
  EXPECT_TRUE(conv::cl_pays(r14, 1));
  EXPECT_FALSE(conv::cl_pays(r28, 1));
  EXPECT_FALSE(conv::cl_pays(shape_any(64, 7, 7, 16, 1, 1, 0), 1));   // fewer than 32 outputs
  EXPECT_FALSE(conv::cl_pays(shape_any(64, 14, 14, 64, 1, 2, 0), 1)); // stride 2: not pointwise
  EXPECT_FALSE(conv::cl_pays(shape_any(64, 7, 7, 64, 3, 1, 1), 1));
  conv::PackedConv a(std::vector<float>(64 * 64 * 9).data(), nullptr, shape_any(64, 7, 7, 64, 3, 1, 1),
                     conv::PackedConv::kNoWino);
  EXPECT_EQ(a.wcl, nullptr);
}

// Strided 1x1 convs run as pointwise convs on the subsampled input: the row copy at every width
// 1..40 and strides 2-3 against the scalar one (nothing past the last tap is read: the row ends
// at the buffer's end), and the whole conv against double at every level and 1-3 threads: odd
// input sizes (the last column and row not read), stride 3, a 7x7 output (CL at batch 1 when
// AVX-512), batch > 1, K-slices, residual + ReLU.
TEST(RuntimeConvDecimate, RowCopyAndConvMatchReference) {
  std::mt19937 rng(3);
  for (int64_t SW : {2, 3})
    for (int64_t OW = 1; OW <= 40; ++OW) {
      const int64_t W = (OW - 1) * SW + 1;
      std::vector<float> src = randv(rng, static_cast<size_t>(W), 1.f);  // exactly the taps' span
      std::vector<float> a(static_cast<size_t>(OW), -7.f), b(static_cast<size_t>(OW), -7.f);
      conv::decimate_row_scalar(src.data(), SW, OW, a.data());
      if (aimass::cpu_features().avx512f && aimass::cpu_features().avx512bw)
        conv::decimate_row_avx512(src.data(), SW, OW, b.data());
      else
        b = a;
      for (int64_t j = 0; j < OW; ++j) {
        ASSERT_EQ(a[j], src[j * SW]) << "SW " << SW << " OW " << OW;
        ASSERT_EQ(b[j], src[j * SW]) << "SW " << SW << " OW " << OW;
      }
    }
  struct SCase {
    int64_t C, H, W, O, stride, N;
    bool bias, res, relu;
  };
  const SCase cases[] = {
      {24, 15, 17, 40, 2, 2, true, true, true},    // odd sizes: 8 x 9 output, last row/column unread
      {40, 14, 14, 64, 2, 1, true, true, true},    // 7x7 output at batch 1 (CL on AVX-512)
      {300, 9, 10, 24, 3, 3, false, true, false},  // stride 3, three K-slices, batch 3
      {16, 34, 34, 32, 2, 2, true, false, true},   // 17x17 output, panels crossing samples
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  for (const SCase& k : cases) {
    const Conv2dShape s = shape_any(k.C, k.H, k.W, k.O, 1, k.stride, 0);
    ASSERT_TRUE(conv::decimate_ok(s));
    const ConvData d(rng, s, k.N, k.bias, k.res, k.relu);
    conv::PackedConv pc(d.w.data(), d.bias, s, conv::PackedConv::kAuto);
    const std::string what = "C" + std::to_string(k.C) + " " + std::to_string(k.H) + "x" + std::to_string(k.W) +
                             " O" + std::to_string(k.O) + " /" + std::to_string(k.stride) + " N" + std::to_string(k.N);
    expect_every_level(d, what, [&](float* y) { conv::run(pc, d.x.data(), k.N, d.res, k.relu, y); });
  }
  EXPECT_FALSE(conv::decimate_ok(shape_any(16, 9, 9, 16, 1, 1, 0)));  // stride 1: pointwise already
  EXPECT_FALSE(conv::decimate_ok(shape_any(16, 9, 9, 16, 1, 2, 1)));  // padded
  EXPECT_FALSE(conv::decimate_ok(shape_any(16, 9, 9, 16, 3, 2, 1)));  // 3x3
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}

// The residual may be the output buffer itself (the executor's residual-in-place blocks): every path
// run() picks reads each residual value before writing that output, also across K-slices (the
// direct path adds it at the first slice), crossing panels, row splits and threads.
TEST(RuntimeConvResidualInPlace, EveryPathMatchesDoubleReference) {
  struct RCase {
    int64_t C, H, W, O, k, stride, pad, N;
    conv::PackedConv::Wino wino;
  };
  const RCase cases[] = {
      {300, 16, 16, 16, 1, 1, 0, 1, conv::PackedConv::kNoWino},  // three K-slices, in-place panels
      {256, 14, 14, 40, 1, 1, 0, 2, conv::PackedConv::kNoWino},  // packed 14x14, two slices
      {136, 20, 20, 13, 1, 1, 0, 3, conv::PackedConv::kNoWino},  // two slices, panels crossing samples
      {300, 9, 10, 24, 1, 2, 0, 3, conv::PackedConv::kAuto},     // strided 1x1 (subsampled), three slices
      {40, 7, 7, 64, 1, 1, 0, 1, conv::PackedConv::kAuto},       // CL at batch 1 on AVX-512
      {20, 13, 11, 24, 3, 1, 1, 2, conv::PackedConv::kNoWino},   // 3x3 packed, two K-slices
      {20, 13, 11, 24, 3, 1, 1, 2, conv::PackedConv::kAuto},     // 3x3 Winograd
      {20, 33, 33, 16, 3, 2, 1, 2, conv::PackedConv::kNoWino},   // 3x3/2, two K-slices
  };
  const SimdLevel old = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  std::mt19937 rng(17);
  for (const RCase& k : cases) {
    const Conv2dShape s = shape_any(k.C, k.H, k.W, k.O, k.k, k.stride, k.pad);
    const ConvData d(rng, s, k.N, true, true, true);
    conv::PackedConv pc(d.w.data(), d.bias, s, k.wino);
    if (!conv::residual_in_place_ok(pc)) continue;  // the executor keeps such a residual apart
    const std::string what = "C" + std::to_string(k.C) + " " + std::to_string(k.H) + "x" + std::to_string(k.W) +
                             " O" + std::to_string(k.O) + " k" + std::to_string(k.k) + "/" +
                             std::to_string(k.stride) + " N" + std::to_string(k.N);
    expect_every_level(d, what, [&](float* y) {
      std::copy(d.r.begin(), d.r.end(), y);
      conv::run(pc, d.x.data(), k.N, y, true, y);
    });
  }
  aimass::set_simd_level(old);
  aimass::set_num_threads(old_threads);
}
