// The max pool row kernels (runtime/ops_pool.h) at every SIMD level this CPU runs against the scalar
// reference: odd widths, 1-3 rows, NaN and -inf/+inf anywhere (max is exact: results are identical,
// NaN exactly where a window holds one).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/parallel.h"
#include "runtime/ops.h"
#include "runtime/ops_pool.h"

namespace pool = aimass::runtime::ops::pool;
using aimass::SimdLevel;

namespace {
bool same(float a, float b) { return (std::isnan(a) && std::isnan(b)) || a == b; }
}  // namespace

TEST(RuntimeMaxPoolRows, EveryLevelMatchesScalar) {
  const SimdLevel best = aimass::set_simd_level(SimdLevel::AVX512);
  aimass::set_simd_level(best);
  std::mt19937 rng(5);
  std::normal_distribution<float> nd;
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  for (SimdLevel lv : {SimdLevel::AVX2, SimdLevel::AVX512}) {
    if (static_cast<int>(lv) > static_cast<int>(best)) continue;
    const pool::RowFns f = pool::row_fns(lv);
    for (int64_t W : {1, 2, 7, 8, 15, 16, 17, 31, 33, 56, 112, 113})
      for (int64_t nrows : {1, 2, 3}) {
        const int64_t ld = W + 3;
        std::vector<float> rows(static_cast<size_t>(nrows * ld));
        for (auto& v : rows) v = nd(rng);
        rows[static_cast<size_t>(rng() % rows.size())] = nan;
        rows[static_cast<size_t>(rng() % rows.size())] = -inf;
        rows[static_cast<size_t>(rng() % rows.size())] = inf;
        std::vector<float> want(static_cast<size_t>(W)), got(static_cast<size_t>(W));
        pool::vmax_scalar(rows.data(), ld, nrows, W, want.data());
        f.vmax(rows.data(), ld, nrows, W, got.data());
        for (int64_t i = 0; i < W; ++i) ASSERT_TRUE(same(got[i], want[i])) << "vmax W " << W << " i " << i;
        // the horizontal pass over t = [-inf, row..., -inf] with the kernels' slack
        const int64_t OW = (W + 2 - 3) / 2 + 1;
        std::vector<float> t(static_cast<size_t>(2 * OW + 1 + pool::kRowSlack), -inf);
        for (int64_t i = 0; i < W; ++i) t[static_cast<size_t>(i + 1)] = want[i];
        std::vector<float> dw(static_cast<size_t>(OW)), dg(static_cast<size_t>(OW));
        pool::hmax3s2_scalar(t.data(), OW, dw.data());
        f.hmax3s2(t.data(), OW, dg.data());
        for (int64_t o = 0; o < OW; ++o) ASSERT_TRUE(same(dg[o], dw[o])) << "hmax W " << W << " o " << o;
      }
  }
  // the reference keeps NaN whichever side it is on
  const float t3[3 + pool::kRowSlack] = {nan, 1.f, 2.f};
  float d = 0;
  pool::hmax3s2_scalar(t3, 1, &d);
  EXPECT_TRUE(std::isnan(d));
  const float u3[3 + pool::kRowSlack] = {1.f, 2.f, nan};
  pool::hmax3s2_scalar(u3, 1, &d);
  EXPECT_TRUE(std::isnan(d));
}

// Adaptive average pooling (ops.h): the global pool (one contiguous plane per channel, summed in 8
// partial sums) and general windows, at odd sizes, batch > 1 and 1-3 threads, against a double
// reference; a NaN reaches only its own channel's windows.
TEST(RuntimeAdaptiveAvgPool, MatchesDoubleReference) {
  struct Case {
    int64_t N, C, H, W, OH, OW;
  };
  const Case cases[] = {{1, 2048, 7, 7, 1, 1}, {3, 5, 1, 1, 1, 1}, {2, 7, 9, 13, 1, 1}, {2, 3, 10, 9, 3, 4},
                        {1, 4, 5, 23, 2, 5},    {2, 3, 7, 7, 7, 7}};
  std::mt19937 rng(11);
  std::normal_distribution<float> nd(0.5f, 1.f);
  const int old_threads = aimass::num_threads();
  for (const Case& k : cases) {
    std::vector<float> x(static_cast<size_t>(k.N * k.C * k.H * k.W));
    for (auto& v : x) v = nd(rng);
    const size_t nan_at = static_cast<size_t>(rng() % x.size());
    x[nan_at] = std::numeric_limits<float>::quiet_NaN();
    const int64_t nan_plane = static_cast<int64_t>(nan_at) / (k.H * k.W);
    const int64_t nan_h = static_cast<int64_t>(nan_at) / k.W % k.H, nan_w = static_cast<int64_t>(nan_at) % k.W;
    for (int t : {1, 2, 3}) {
      aimass::set_num_threads(t);
      std::vector<float> y(static_cast<size_t>(k.N * k.C * k.OH * k.OW), -1.f);
      aimass::runtime::ops::adaptive_avg_pool2d(x.data(), k.N, k.C, k.H, k.W, k.OH, k.OW, y.data());
      for (int64_t pc = 0; pc < k.N * k.C; ++pc)
        for (int64_t oh = 0; oh < k.OH; ++oh)
          for (int64_t ow = 0; ow < k.OW; ++ow) {
            const int64_t hs = oh * k.H / k.OH, he = ((oh + 1) * k.H + k.OH - 1) / k.OH;
            const int64_t ws = ow * k.W / k.OW, we = ((ow + 1) * k.W + k.OW - 1) / k.OW;
            double acc = 0, mag = 0;
            for (int64_t h = hs; h < he; ++h)
              for (int64_t w = ws; w < we; ++w) {
                const float v = x[static_cast<size_t>((pc * k.H + h) * k.W + w)];
                if (!std::isnan(v)) mag += std::fabs(v);
                acc += v;
              }
            const double cnt = static_cast<double>((he - hs) * (we - ws));
            const float got = y[static_cast<size_t>((pc * k.OH + oh) * k.OW + ow)];
            const bool has_nan = pc == nan_plane && nan_h >= hs && nan_h < he && nan_w >= ws && nan_w < we;
            if (has_nan) {
              EXPECT_TRUE(std::isnan(got)) << "plane " << pc << " window " << oh << "," << ow;
            } else {
              ASSERT_NEAR(got, acc / cnt, 2e-6 * (mag / cnt + 1e-30) + 1e-7)
                  << "N" << k.N << " C" << k.C << " " << k.H << "x" << k.W << " -> " << k.OH << "x" << k.OW
                  << " threads " << t << " plane " << pc;
            }
          }
    }
  }
  aimass::set_num_threads(old_threads);
}
