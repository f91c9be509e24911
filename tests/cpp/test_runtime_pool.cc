// The max pool row kernels (runtime/ops_pool.h) at every SIMD level this CPU runs against the scalar
// reference: odd widths, 1-3 rows, NaN and -inf/+inf anywhere (max is exact: results are identical,
// NaN exactly where a window holds one).
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "aimass/cpu_features.h"
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
