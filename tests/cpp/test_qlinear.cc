// qlinear: every kernel at every available SIMD level against a double-precision
// reference of x @ dequant(W)^T + b, and argument checks.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/qlinear.h"

namespace {

using aimass::quant::LinearKernel;

struct Weight {
  int bits;
  int64_t N, K, G;
  std::vector<uint8_t> data;
  std::vector<float> scale;
};

Weight make_weight(int bits, int64_t N, int64_t K, int64_t G, uint32_t seed) {
  std::mt19937 rng(seed);
  const int qmax = bits == 8 ? 127 : 7;
  std::uniform_int_distribution<int> qd(-qmax, qmax);
  std::uniform_real_distribution<float> sd(0.01f, 0.1f);
  Weight w{bits, N, K, G, {}, {}};
  const int64_t ng = G == 0 ? 1 : K / G;
  for (int64_t i = 0; i < N * ng; ++i) w.scale.push_back(sd(rng));
  if (bits == 8) {
    for (int64_t i = 0; i < N * K; ++i) w.data.push_back(static_cast<uint8_t>(static_cast<int8_t>(qd(rng))));
  } else {
    w.data.assign(static_cast<size_t>((N * K + 1) / 2), 0);
    for (int64_t i = 0; i < N * K; ++i) {
      const uint8_t nib = static_cast<uint8_t>(qd(rng)) & 0xF;
      w.data[i / 2] |= (i & 1) ? static_cast<uint8_t>(nib << 4) : nib;
    }
  }
  return w;
}

class QLinear : public ::testing::TestWithParam<std::tuple<int, int64_t, int64_t, int64_t>> {};

TEST_P(QLinear, AllKernelsAllLevelsMatchReference) {
  const auto [bits, N, K, G] = GetParam();
  const Weight w = make_weight(bits, N, K, G, 7);
  auto packed = aimass::quant::pack_linear(bits, N, K, G, w.data.data(), w.scale.data());
  std::vector<float> deq(static_cast<size_t>(N * K));
  aimass::quant::dequantize_linear_weight(bits, N, K, G, w.data.data(), w.scale.data(), deq.data());
  std::mt19937 rng(3);
  std::normal_distribution<float> nd;
  std::vector<float> bias(static_cast<size_t>(N));
  for (auto& b : bias) b = nd(rng);
  const aimass::SimdLevel best = aimass::simd_level();
  for (int64_t M : {1, 3, 8, 64, 257}) {
    std::vector<float> x(static_cast<size_t>(M * K));
    for (auto& v : x) v = nd(rng);
    std::vector<double> ref(static_cast<size_t>(M * N));
    double rmax = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int64_t n = 0; n < N; ++n) {
        double s = bias[n];
        for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[m * K + k]) * deq[n * K + k];
        ref[m * N + n] = s;
        rmax = std::max(rmax, std::fabs(s));
      }
    for (int lvl = 0; lvl <= static_cast<int>(best); ++lvl) {
      aimass::set_simd_level(static_cast<aimass::SimdLevel>(lvl));
      for (LinearKernel k : {LinearKernel::WeightOnly, LinearKernel::DequantSgemm, LinearKernel::DynamicInt8}) {
        if (k == LinearKernel::DynamicInt8 && G != 0 && G % 64 != 0) continue;
        for (auto act : {aimass::quant::ActivationPrecision::FP32, aimass::quant::ActivationPrecision::Int16}) {
          std::vector<float> y(static_cast<size_t>(M * N), -1.f);
          aimass::quant::linear(*packed, x.data(), M, bias.data(), y.data(), k, act);
          const bool int16 = std::string(aimass::quant::plan_linear(*packed, M, k, act).activations) == "int16";
          // int4: whole 128-blocks per group (or per-channel)
          const bool int16_weights = (bits == 8 && G == 0) || (bits == 4 && G % 128 == 0);
          EXPECT_EQ(int16, k == LinearKernel::WeightOnly && int16_weights &&
                               act == aimass::quant::ActivationPrecision::Int16);
          const double tol = (k == LinearKernel::DynamicInt8 ? 2e-2 : 1e-5) * rmax;
          for (int64_t i = 0; i < M * N; ++i) {
            double bound = tol;
            if (int16) {  // documented: |dx| <= max|x_row| / 65534 per element
              const int64_t m = i / N, n = i % N;
              double amax = 0, wabs = 0;
              for (int64_t kk = 0; kk < K; ++kk) {
                amax = std::max(amax, std::fabs(static_cast<double>(x[m * K + kk])));
                wabs += std::fabs(static_cast<double>(deq[n * K + kk]));
              }
              bound += amax / 65534 * wabs;
            }
            ASSERT_NEAR(y[i], ref[i], bound) << "level " << lvl << " kernel " << aimass::quant::linear_kernel_name(k)
                                             << " M " << M << " i " << i;
          }
        }
      }
    }
    aimass::set_simd_level(best);
  }
}

INSTANTIATE_TEST_SUITE_P(Shapes, QLinear,
                         ::testing::Values(std::make_tuple(8, int64_t{37}, int64_t{200}, int64_t{0}),
                                           std::make_tuple(8, int64_t{32}, int64_t{256}, int64_t{64}),
                                           std::make_tuple(8, int64_t{9}, int64_t{48}, int64_t{16}),
                                           std::make_tuple(4, int64_t{33}, int64_t{384}, int64_t{128}),
                                           std::make_tuple(4, int64_t{21}, int64_t{99}, int64_t{0}),
                                           std::make_tuple(4, int64_t{16}, int64_t{96}, int64_t{32})));

// int4 weight-only with int16 activations: the AVX2 / AVX-512 kernels read the weights as
// 64-column panels (kernels.h); N tails inside a block, in its second half and across
// thread chunks, K padded to 128, groups of 128 / 256 / per-channel, 1-5 rows (the 2-row
// tile and its 1-row tail), 1 and 2 threads: every level gives the scalar reference's bits,
// and x of integers (q == x, sx == 1) with power-of-two scales give the exact dot.
TEST(QLinearInt4Int16, PanelsMatchScalarBitsAndExactDots) {
  const aimass::SimdLevel best = aimass::simd_level();
  const int threads0 = aimass::num_threads();
  for (auto [N, K, G] : {std::make_tuple(int64_t{131}, int64_t{1000}, int64_t{0}),
                         std::make_tuple(int64_t{97}, int64_t{384}, int64_t{128}),
                         std::make_tuple(int64_t{65}, int64_t{512}, int64_t{256}),
                         std::make_tuple(int64_t{1}, int64_t{128}, int64_t{128}),
                         std::make_tuple(int64_t{200}, int64_t{640}, int64_t{128})}) {
    Weight w = make_weight(4, N, K, G, static_cast<uint32_t>(N + K));
    std::mt19937 rng(static_cast<uint32_t>(N * K));
    for (auto& s : w.scale) s = std::ldexp(1.f, -static_cast<int>(rng() % 4) - 1);  // 2^-1 .. 2^-4
    auto packed = aimass::quant::pack_linear(4, N, K, G, w.data.data(), w.scale.data());
    std::vector<float> deq(static_cast<size_t>(N * K));
    aimass::quant::dequantize_linear_weight(4, N, K, G, w.data.data(), w.scale.data(), deq.data());
    for (int64_t M : {1, 2, 3, 5}) {
      std::vector<float> xi(static_cast<size_t>(M * K)), xg(xi.size());
      std::uniform_int_distribution<int> id(-100, 100);  // |y| < 2^19 in steps of 2^-4
      std::normal_distribution<float> nd;
      for (auto& v : xi) v = static_cast<float>(id(rng));
      for (int64_t m = 0; m < M; ++m) xi[m * K + rng() % K] = (m % 2) ? -32767.f : 32767.f;  // q == x
      for (auto& v : xg) v = nd(rng);
      for (int which = 0; which < 2; ++which) {
        const std::vector<float>& x = which == 0 ? xi : xg;
        std::vector<float> want;
        for (int lvl = 0; lvl <= static_cast<int>(best); ++lvl) {
          aimass::set_simd_level(static_cast<aimass::SimdLevel>(lvl));
          for (int th : {1, 2}) {
            aimass::set_num_threads(th);
            ASSERT_STREQ(aimass::quant::plan_linear(*packed, M, LinearKernel::WeightOnly).activations, "int16");
            std::vector<float> y(static_cast<size_t>(M * N), -1.f);
            aimass::quant::linear(*packed, x.data(), M, nullptr, y.data(), LinearKernel::WeightOnly);
            if (want.empty()) want = y;
            for (int64_t i = 0; i < M * N; ++i)
              ASSERT_EQ(y[i], want[i]) << "level " << lvl << " threads " << th << " N " << N << " K " << K << " G "
                                       << G << " M " << M << " i " << i;
          }
        }
        if (which == 0)  // every step exact: the double model of sum_k x * deq
          for (int64_t m = 0; m < M; ++m)
            for (int64_t n = 0; n < N; ++n) {
              double s = 0;
              for (int64_t k = 0; k < K; ++k) s += static_cast<double>(x[m * K + k]) * deq[n * K + k];
              ASSERT_EQ(static_cast<double>(want[m * N + n]), s) << "N " << N << " K " << K << " m " << m << " n " << n;
            }
      }
    }
  }
  aimass::set_simd_level(best);
  aimass::set_num_threads(threads0);
}

// linear(.., epi): the epilogue sees each output once, after the bias, on every path (the dynamic
// VNNI path per block of columns, from the pool's threads; the others once on [0, N)), and the
// result equals linear() followed by the same epilogue, bit for bit. A row with NaN x stays NaN.
TEST(QLinearEpilogue, SameAsLinearThenEpilogueAtEveryLevel) {
  const aimass::SimdLevel best = aimass::simd_level();
  for (auto [bits, N, K, G] : {std::make_tuple(8, int64_t{200}, int64_t{96}, int64_t{0}),
                               std::make_tuple(8, int64_t{70}, int64_t{256}, int64_t{64}),
                               std::make_tuple(4, int64_t{33}, int64_t{128}, int64_t{0})}) {
    const Weight w = make_weight(bits, N, K, G, 11);
    auto packed = aimass::quant::pack_linear(bits, N, K, G, w.data.data(), w.scale.data());
    std::mt19937 rng(5);
    std::normal_distribution<float> nd;
    std::vector<float> bias(static_cast<size_t>(N));
    for (auto& b : bias) b = nd(rng);
    for (int64_t M : {1, 7, 128, 301}) {
      std::vector<float> x(static_cast<size_t>(M * K)), res(static_cast<size_t>(M * N));
      for (auto& v : x) v = nd(rng);
      for (auto& v : res) v = nd(rng);
      if (M > 1) x[K + 3] = std::nanf("");  // row 1 is NaN everywhere
      // y: the first of `rows` rows, m0 rows into the output
      auto epi_fn = [&](float* y, int64_t m0, int64_t rows, int64_t ldy, int64_t n0, int64_t n1) {
        for (int64_t m = 0; m < rows; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            float& v = y[m * ldy + n];
            v = (v < 0.f ? 0.25f * v : v) + res[(m0 + m) * N + n];
          }
      };
      for (int lvl = 0; lvl <= static_cast<int>(best); ++lvl) {
        aimass::set_simd_level(static_cast<aimass::SimdLevel>(lvl));
        std::vector<float> want(static_cast<size_t>(M * N)), got(static_cast<size_t>(M * N), -7.f);
        aimass::quant::linear(*packed, x.data(), M, bias.data(), want.data());
        epi_fn(want.data(), 0, M, N, 0, N);
        std::vector<int> seen(static_cast<size_t>(M * N), 0);
        // The VNNI path calls it per block of columns and chunk of rows (y then points into
        // the output); the others once on everything.
        const aimass::quant::LinearEpilogue epi = [&](float* y, int64_t rows, int64_t ldy, int64_t n0, int64_t n1) {
          ASSERT_EQ(ldy, N);
          const int64_t off = y - got.data();
          ASSERT_TRUE(off >= 0 && off % N == 0 && off / N + rows <= M) << "rows " << rows << " at offset " << off;
          const int64_t m0 = off / N;
          for (int64_t m = 0; m < rows; ++m)
            for (int64_t n = n0; n < n1; ++n) ++seen[(m0 + m) * N + n];  // blocks never overlap
          epi_fn(y, m0, rows, ldy, n0, n1);
        };
        aimass::quant::linear(*packed, x.data(), M, bias.data(), got.data(), epi);
        for (int64_t i = 0; i < M * N; ++i) {
          ASSERT_EQ(seen[i], 1) << "level " << lvl << " M " << M << " i " << i;
          if (M > 1 && i / N == 1) {
            ASSERT_TRUE(std::isnan(got[i])) << "level " << lvl << " M " << M << " i " << i;
          } else {
            ASSERT_EQ(got[i], want[i]) << "level " << lvl << " bits " << bits << " M " << M << " i " << i;
          }
        }
      }
      aimass::set_simd_level(best);
    }
  }
}

TEST(QLinearArgs, BadArgumentsThrowTypedErrors) {
  std::vector<int8_t> d(16 * 64, 1);
  std::vector<float> s(16, 0.5f);
  EXPECT_THROW(aimass::quant::pack_linear(3, 16, 64, 0, d.data(), s.data()), aimass::ValueError);
  EXPECT_THROW(aimass::quant::pack_linear(8, 16, 64, 24, d.data(), s.data()), aimass::ValueError);
  EXPECT_THROW(aimass::quant::pack_linear(8, 0, 64, 0, d.data(), s.data()), aimass::ValueError);
  s[3] = -1.f;
  EXPECT_THROW(aimass::quant::pack_linear(8, 16, 64, 0, d.data(), s.data()), aimass::ValueError);
  s[3] = 0.5f;
  d[5] = -128;
  EXPECT_THROW(aimass::quant::pack_linear(8, 16, 64, 0, d.data(), s.data()), aimass::ValueError);
  d[5] = 1;
  auto p = aimass::quant::pack_linear(8, 16, 64, 0, d.data(), s.data());
  EXPECT_EQ(p->out_features(), 16);
  EXPECT_EQ(p->in_features(), 64);
  std::vector<float> x(64, 1.f), y(16);
  EXPECT_THROW(aimass::quant::linear(*p, x.data(), -1, nullptr, y.data()), aimass::ValueError);
  EXPECT_THROW(aimass::quant::parse_linear_kernel("fastest"), aimass::ValueError);
  aimass::quant::linear(*p, x.data(), 1, nullptr, y.data());
  for (float v : y) EXPECT_FLOAT_EQ(v, 32.f);  // 64 * (1 * 0.5)
}

}  // namespace
