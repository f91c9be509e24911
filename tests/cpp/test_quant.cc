#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/half.h"
#include "aimass/quant.h"

namespace q = aimass::quant;
using aimass::SimdLevel;

namespace {

std::vector<SimdLevel> fast_levels() {
  std::vector<SimdLevel> out;
  const auto& f = aimass::cpu_features();
  if (f.avx2 && f.fma && f.f16c) out.push_back(SimdLevel::AVX2);
  if (f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) out.push_back(SimdLevel::AVX512);
  return out;
}

std::vector<float> random_floats(size_t n, uint32_t seed, float scale = 3.0f) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (auto& x : v) x = d(rng);
  return v;
}

// lengths around the vector widths (8, 16, 32, 64) and their tails
const int64_t kLengths[] = {0, 1, 2, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 65, 127, 128, 129, 1000, 4099};

TEST(QuantKernels, MinMaxSimdEqualsScalar) {
  for (SimdLevel lvl : fast_levels()) {
    for (int64_t n : kLengths) {
      if (n == 0) continue;
      auto x = random_floats(n, 1 + n);
      const auto a = q::minmax(x.data(), n, SimdLevel::Scalar), b = q::minmax(x.data(), n, lvl);
      EXPECT_EQ(a.min, b.min) << n;
      EXPECT_EQ(a.max, b.max) << n;
      EXPECT_TRUE(a.finite && b.finite);
    }
  }
}

TEST(QuantKernels, MinMaxFlagsNaNAndInfAnywhere) {
  std::vector<SimdLevel> levels = fast_levels();
  levels.push_back(SimdLevel::Scalar);
  for (SimdLevel lvl : levels) {
    for (int64_t n : {1, 9, 40, 100}) {
      for (int64_t pos : {int64_t{0}, n / 2, n - 1}) {
        for (float bad : {NAN, INFINITY, -INFINITY}) {
          auto x = random_floats(n, 7);
          x[pos] = bad;
          EXPECT_FALSE(q::minmax(x.data(), n, lvl).finite) << n << " " << pos << " " << bad;
        }
      }
    }
  }
}

TEST(QuantKernels, QuantizeRunSimdEqualsScalarBitForBit) {
  struct R { int32_t zp, qmin, qmax; };
  const R ranges[] = {{0, -127, 127}, {0, -7, 7}, {128, 0, 255}, {3, 0, 15}, {0, 0, 255}, {255, 0, 255}};
  for (SimdLevel lvl : fast_levels()) {
    for (int64_t n : kLengths) {
      auto x = random_floats(n, 100 + n);
      // plant exact half-way values (k + 0.5) * scale to exercise round-half-even
      const float scale = 0.0625f;
      for (int64_t j = 0; j < n; j += 5) x[j] = (static_cast<float>(j % 21) - 10.0f + 0.5f) * scale;
      for (const R& r : ranges) {
        for (float sc : {scale, 0.0173f, 1.0f, 1e-30f}) {
          std::vector<int8_t> a(n + 1, 0x55), b(n + 1, 0x55);
          q::quantize_run(x.data(), n, sc, r.zp, r.qmin, r.qmax, a.data(), SimdLevel::Scalar);
          q::quantize_run(x.data(), n, sc, r.zp, r.qmin, r.qmax, b.data(), lvl);
          ASSERT_EQ(a, b) << "n=" << n << " scale=" << sc << " qmax=" << r.qmax;  // incl. the guard byte
        }
      }
    }
  }
}

TEST(QuantKernels, ScalarRoundsHalfToEvenAndSaturates) {
  const float x[] = {0.5f, 1.5f, 2.5f, -0.5f, -2.5f, 1000.0f, -1000.0f};
  int8_t out[7];
  q::quantize_run(x, 7, 1.0f, 0, -127, 127, out, SimdLevel::Scalar);
  const int8_t want[] = {0, 2, 2, 0, -2, 127, -127};
  EXPECT_EQ(std::memcmp(out, want, 7), 0);
  uint8_t u[7];
  q::quantize_run(x, 7, 1.0f, 10, 0, 255, reinterpret_cast<int8_t*>(u), SimdLevel::Scalar);
  const uint8_t wantu[] = {10, 12, 12, 10, 8, 255, 0};
  EXPECT_EQ(std::memcmp(u, wantu, 7), 0);
}

TEST(QuantKernels, DequantizeAndNibblesSimdEqualScalar) {
  for (SimdLevel lvl : fast_levels()) {
    for (int64_t n : kLengths) {
      std::mt19937 rng(n);
      std::vector<int8_t> v(n);
      for (auto& b : v) b = static_cast<int8_t>(rng());
      for (bool is_unsigned : {false, true}) {
        std::vector<float> a(n), b(n);
        q::dequantize_run(v.data(), n, is_unsigned, 0.031f, is_unsigned ? 131 : 0, a.data(), SimdLevel::Scalar);
        q::dequantize_run(v.data(), n, is_unsigned, 0.031f, is_unsigned ? 131 : 0, b.data(), lvl);
        ASSERT_TRUE(n == 0 || std::memcmp(a.data(), b.data(), n * 4) == 0) << n;  // memcmp(nullptr, .., 0) is UB
      }
      std::vector<uint8_t> pa((n + 1) / 2 + 1, 0xAA), pb((n + 1) / 2 + 1, 0xAA);
      q::pack_nibbles(v.data(), n, pa.data(), SimdLevel::Scalar);
      q::pack_nibbles(v.data(), n, pb.data(), lvl);
      ASSERT_EQ(pa, pb) << n;
      for (bool is_signed : {false, true}) {
        std::vector<int8_t> ua(n), ub(n);
        q::unpack_nibbles(pa.data(), n, is_signed, ua.data(), SimdLevel::Scalar);
        q::unpack_nibbles(pa.data(), n, is_signed, ub.data(), lvl);
        ASSERT_EQ(ua, ub) << n;
        for (int64_t j = 0; j < n; ++j) {
          const int nib = v[j] & 0xF;
          ASSERT_EQ(ua[j], is_signed ? static_cast<int8_t>((nib ^ 8) - 8) : nib);
        }
      }
    }
  }
}

TEST(QuantKernels, WidenHalfSimdEqualsScalarForAllBitPatterns) {
  std::vector<uint16_t> all(65536 + 13);
  for (size_t j = 0; j < all.size(); ++j) all[j] = static_cast<uint16_t>(j * 40503u);  // every pattern, shuffled
  for (size_t j = 0; j < 65536; ++j) all[j] = static_cast<uint16_t>(j);
  const int64_t n = static_cast<int64_t>(all.size());
  for (SimdLevel lvl : fast_levels()) {
    for (bool bf16 : {false, true}) {
      std::vector<float> a(n), b(n);
      q::widen_to_f32(all.data(), n, bf16, a.data(), SimdLevel::Scalar);
      q::widen_to_f32(all.data(), n, bf16, b.data(), lvl);
      for (int64_t j = 0; j < n; ++j) {
        if (std::isnan(a[j])) {
          ASSERT_TRUE(std::isnan(b[j])) << j;
          continue;
        }
        ASSERT_EQ(std::memcmp(&a[j], &b[j], 4), 0) << "bits " << all[j] << " bf16=" << bf16;
      }
    }
  }
}

TEST(QuantKernels, PackNibblesLayout) {
  const int8_t v[] = {-7, 7, -3, 0, 1};
  uint8_t out[3];
  q::pack_nibbles(v, 5, out, SimdLevel::Scalar);
  EXPECT_EQ(out[0], 0x79);
  EXPECT_EQ(out[1], 0x0D);
  EXPECT_EQ(out[2], 0x01);  // odd tail: high nibble 0
}

q::QuantSpec spec(int bits, q::Scheme s, q::Granularity g, int64_t outer, int64_t c, int64_t inner, int64_t gs) {
  q::QuantSpec sp;
  sp.bits = bits;
  sp.scheme = s;
  sp.granularity = g;
  sp.outer = outer;
  sp.channels = c;
  sp.inner = inner;
  sp.group_size = gs;
  return sp;
}

TEST(Quant, EndToEndSameBytesAtEveryLevel) {
  const SimdLevel best = aimass::simd_level();
  // inner = 65: strided walk; 5 and 1: transposed to [C, K]; outer = 1: fused leading axis
  struct Shape { int64_t outer, C, inner, G; };
  for (const Shape& sh : {Shape{3, 37, 65, 15}, Shape{3, 37, 5, 5}, Shape{45, 37, 1, 9}, Shape{1, 37, 66, 11}}) {
    const int64_t outer = sh.outer, C = sh.C, inner = sh.inner, G = sh.G;
    auto x = random_floats(outer * C * inner, 5);
    for (int64_t j = 0; j < inner * outer; ++j) x[(j / inner * C + 4) * inner + j % inner] = 0.0f;  // zero channel
    for (SimdLevel lvl : fast_levels())
      for (int bits : {8, 4})
        for (auto sch : {q::Scheme::Symmetric, q::Scheme::Asymmetric})
          for (auto gr : {q::Granularity::Tensor, q::Granularity::Channel, q::Granularity::Group}) {
            const auto sp = spec(bits, sch, gr, outer, C, inner, G);
            std::vector<float> s0(q::num_blocks(sp)), s1(s0.size()), d0(x.size()), d1(x.size());
            std::vector<int32_t> z0(s0.size()), z1(s0.size());
            std::vector<uint8_t> o0(q::data_bytes(sp)), o1(o0.size());
            aimass::set_simd_level(SimdLevel::Scalar);
            q::quantize_auto(sp, x.data(), s0.data(), z0.data(), o0.data());
            q::dequantize(sp, o0.data(), s0.data(), z0.data(), d0.data());
            aimass::set_simd_level(lvl);
            q::quantize_auto(sp, x.data(), s1.data(), z1.data(), o1.data());
            q::dequantize(sp, o1.data(), s1.data(), z1.data(), d1.data());
            EXPECT_EQ(std::memcmp(s0.data(), s1.data(), s0.size() * 4), 0);
            EXPECT_EQ(z0, z1);
            EXPECT_EQ(o0, o1);
            EXPECT_EQ(std::memcmp(d0.data(), d1.data(), d0.size() * 4), 0);
            if (gr == q::Granularity::Channel) EXPECT_EQ(s0[4], 1.0f);  // zero channel: unit scale, never NaN
            // the separate compute_params + quantize path gives the same bytes as the fused/transposed one
            std::vector<float> s2(s0.size());
            std::vector<int32_t> z2(s0.size());
            std::vector<uint8_t> o2(o0.size());
            q::compute_params(sp, x.data(), s2.data(), z2.data());
            q::quantize(sp, x.data(), s2.data(), z2.data(), o2.data());
            EXPECT_EQ(std::memcmp(s0.data(), s2.data(), s0.size() * 4), 0);
            EXPECT_EQ(o0, o2);
            for (size_t j = 0; j < x.size(); ++j) ASSERT_TRUE(std::isfinite(d0[j]));
          }
  }
  aimass::set_simd_level(best);
}

TEST(Quant, HalfInputEqualsWidenedFloatInput) {
  auto x = random_floats(6 * 40, 21);
  std::vector<uint16_t> h(x.size());
  for (size_t j = 0; j < x.size(); ++j) h[j] = aimass::f32_to_bf16(x[j]);
  std::vector<float> wide(x.size());
  q::widen_to_f32(h.data(), static_cast<int64_t>(h.size()), true, wide.data(), SimdLevel::Scalar);
  for (int64_t outer : {1, 2}) {
    const auto sp = spec(4, q::Scheme::Asymmetric, q::Granularity::Group, outer, 6 / outer * 1, 40, 8);
    std::vector<float> s0(q::num_blocks(sp)), s1(s0.size());
    std::vector<int32_t> z0(s0.size()), z1(s0.size());
    std::vector<uint8_t> o0(q::data_bytes(sp)), o1(o0.size());
    q::quantize_auto(sp, wide.data(), s0.data(), z0.data(), o0.data());
    q::quantize_auto(sp, h.data(), aimass::DType::BF16, s1.data(), z1.data(), o1.data());
    EXPECT_EQ(std::memcmp(s0.data(), s1.data(), s0.size() * 4), 0);
    EXPECT_EQ(z0, z1);
    EXPECT_EQ(o0, o1);
  }
  float s[8];
  uint8_t o[300];
  EXPECT_THROW(q::quantize_auto(spec(8, q::Scheme::Symmetric, q::Granularity::Tensor, 1, 1, 4, 0), h.data(),
                                aimass::DType::I16, s, nullptr, o),
               aimass::TypeError);
}

TEST(Quant, RejectsBadSpecsAndNonFiniteInput) {
  auto x = random_floats(64, 9);
  float s[64];
  int32_t z[64];
  uint8_t o[64];
  EXPECT_THROW(q::validate(spec(3, q::Scheme::Symmetric, q::Granularity::Tensor, 1, 1, 64, 0)), aimass::ValueError);
  EXPECT_THROW(q::validate(spec(8, q::Scheme::Symmetric, q::Granularity::Group, 1, 4, 16, 5)), aimass::ValueError);
  EXPECT_THROW(q::validate(spec(8, q::Scheme::Symmetric, q::Granularity::Channel, 1, 0, 16, 0)), aimass::ValueError);
  x[17] = NAN;
  EXPECT_THROW(q::quantize_auto(spec(8, q::Scheme::Symmetric, q::Granularity::Tensor, 1, 1, 64, 0), x.data(), s, z, o),
               aimass::ValueError);
  x[17] = INFINITY;
  EXPECT_THROW(q::quantize_auto(spec(4, q::Scheme::Asymmetric, q::Granularity::Group, 2, 4, 8, 4), x.data(), s, z, o),
               aimass::ValueError);
  const float big[] = {-3e38f, 3e38f};
  EXPECT_THROW(q::quantize_auto(spec(8, q::Scheme::Asymmetric, q::Granularity::Tensor, 1, 1, 2, 0), big, s, z, o),
               aimass::ValueError);
}

}  // namespace
