#include <gtest/gtest.h>

#include <atomic>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/dtype.h"
#include "aimass/error.h"
#include "aimass/half.h"
#include "aimass/parallel.h"

namespace {

uint16_t ref_f16_bits(float f) {  // GCC's _Float16 conversion is IEEE round-to-nearest-even
  _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

TEST(Half, F16RoundTripAllValues) {
  for (uint32_t b = 0; b < 65536; ++b) {
    float f = aimass::f16_to_f32(static_cast<uint16_t>(b));
    _Float16 h;
    uint16_t bb = static_cast<uint16_t>(b);
    std::memcpy(&h, &bb, 2);
    float ref = static_cast<float>(h);
    if (std::isnan(ref)) {
      EXPECT_TRUE(std::isnan(f));
      continue;
    }
    ASSERT_EQ(std::memcmp(&f, &ref, 4), 0) << "bits " << b;
    ASSERT_EQ(aimass::f32_to_f16(f), b) << "bits " << b;
  }
}

TEST(Half, F32ToF16MatchesReference) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<uint32_t> bits;
  for (int i = 0; i < 2000000; ++i) {
    uint32_t u = bits(rng);
    float f;
    std::memcpy(&f, &u, 4);
    if (std::isnan(f)) continue;
    ASSERT_EQ(aimass::f32_to_f16(f), ref_f16_bits(f)) << "float bits " << std::hex << u;
  }
}

TEST(Half, BF16RoundsToNearestEven) {
  EXPECT_EQ(aimass::f32_to_bf16(1.0f), 0x3f80);
  uint32_t tie = 0x3f808000u;  // exactly halfway between two bf16 values, lower is even
  float f;
  std::memcpy(&f, &tie, 4);
  EXPECT_EQ(aimass::f32_to_bf16(f), 0x3f80);
  tie = 0x3f818000u;  // halfway, upper is even
  std::memcpy(&f, &tie, 4);
  EXPECT_EQ(aimass::f32_to_bf16(f), 0x3f82);
  EXPECT_TRUE(std::isnan(aimass::bf16_to_f32(aimass::f32_to_bf16(NAN))));
}

TEST(Parallel, CoversRangeExactlyOnce) {
  for (int threads : {1, 2, 3, 8}) {
    aimass::set_num_threads(threads);
    std::vector<std::atomic<int>> hits(10007);
    aimass::parallel_for(0, 10007, 16, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) hits[i]++;
    });
    for (auto& h : hits) ASSERT_EQ(h.load(), 1);
  }
}

TEST(Parallel, NestedCallsRunAndExceptionsPropagate) {
  aimass::set_num_threads(4);
  std::atomic<int64_t> total{0};
  aimass::parallel_for(0, 8, 1, [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i)
      aimass::parallel_for(0, 100, 1, [&](int64_t b2, int64_t e2) { total += e2 - b2; });
  });
  EXPECT_EQ(total.load(), 800);
  EXPECT_THROW(aimass::parallel_for(0, 100, 1,
                                    [](int64_t b, int64_t) {
                                      if (b == 0) throw aimass::ValueError("boom");
                                    }),
               aimass::ValueError);
  EXPECT_THROW(aimass::set_num_threads(0), aimass::ValueError);
}

TEST(CpuFeatures, LevelCapsAndNames) {
  auto best = aimass::set_simd_level(aimass::SimdLevel::AVX512);
  EXPECT_EQ(aimass::set_simd_level(aimass::SimdLevel::Scalar), aimass::SimdLevel::Scalar);
  EXPECT_EQ(aimass::simd_level(), aimass::SimdLevel::Scalar);
  aimass::set_simd_level(best);
  EXPECT_EQ(aimass::parse_simd_level("avx2"), aimass::SimdLevel::AVX2);
  EXPECT_THROW(aimass::parse_simd_level("sse9"), aimass::ValueError);
}

TEST(DType, ParseAndSizes) {
  EXPECT_EQ(aimass::parse_dtype("float32"), aimass::DType::F32);
  EXPECT_EQ(aimass::dtype_size(aimass::parse_dtype("bfloat16")), 2u);
  EXPECT_THROW(aimass::parse_dtype("complex64"), aimass::TypeError);
}

}  // namespace

namespace {
// Back-to-back tiny jobs, each with its own short-lived function object: a worker
// that kept a previous job's function would call a destroyed object here.
TEST(Parallel, BackToBackJobsNeverReuseAFinishedJob) {
  aimass::set_num_threads(2);
  for (int iter = 0; iter < 20000; ++iter) {
    std::vector<int> hits(3, 0);
    aimass::parallel_chunks(3, [&hits](int c, int) { hits[c] += 1; });
    ASSERT_EQ(hits[0] + hits[1] + hits[2], 3) << "iteration " << iter;
  }
}
}  // namespace
