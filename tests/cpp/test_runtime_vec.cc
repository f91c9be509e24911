// The vectorized runtime kernels (runtime/vec_kernels.h) at every SIMD level the CPU
// has, against the scalar reference: odd sizes (1, 7, 17, 1000), the documented error
// bound |simd - ref| <= 1e-5 |ref| + 1e-6 max(1, |x|), and NaN / +-inf propagation
// identical to the reference (which follows torch).
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "aimass/cpu_features.h"
#include "runtime/packed_gemm.h"
#include "runtime/vec_kernels.h"

namespace vec = aimass::runtime::vec;
using aimass::SimdLevel;

namespace {

constexpr float kNaN = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();
const int64_t kSizes[] = {1, 7, 17, 1000};

// The levels this CPU runs (the scalar table always).
std::vector<const vec::Kernels*> levels() {
  std::vector<const vec::Kernels*> out{&vec::kernels_for(SimdLevel::Scalar)};
  for (SimdLevel l : {SimdLevel::AVX2, SimdLevel::AVX512})
    if (vec::kernels_for(l).level == l) out.push_back(&vec::kernels_for(l));
  return out;
}
const vec::Kernels& ref() { return vec::kernels_for(SimdLevel::Scalar); }

// Same value class (NaN, +inf, -inf) exactly; finite values within the bound.
void expect_close(const std::vector<float>& got, const std::vector<float>& want, const std::vector<float>& x,
                  const std::string& what) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) {
    const float g = got[i], w = want[i];
    const float xi = i < x.size() ? x[i] : 0.f;
    if (std::isnan(w) || std::isinf(w)) {
      ASSERT_TRUE(std::isnan(w) ? std::isnan(g) : g == w) << what << " i=" << i << " got " << g << " want " << w;
      continue;
    }
    ASSERT_TRUE(std::isfinite(g)) << what << " i=" << i << " got " << g << " want " << w;
    const double tol = 1e-5 * std::fabs(w) + 1e-6 * std::max(1.0, std::fabs(double(xi)));
    ASSERT_LE(std::fabs(double(g) - w), tol) << what << " i=" << i << " x=" << xi << " got " << g << " want " << w;
  }
}

std::vector<float> randv(std::mt19937& rng, int64_t n, float lo, float hi) {
  std::uniform_real_distribution<float> d(lo, hi);
  std::vector<float> v(n);
  for (auto& e : v) e = d(rng);
  return v;
}

}  // namespace

TEST(RuntimeVec, DispatchHonoursTheLevel) {
  EXPECT_EQ(vec::kernels_for(SimdLevel::Scalar).level, SimdLevel::Scalar);
  EXPECT_EQ(vec::kernels().level, vec::kernels_for(aimass::simd_level()).level);
  EXPECT_LE(static_cast<int>(vec::kernels().level), static_cast<int>(aimass::simd_level()));
}

TEST(RuntimeVec, GeluMatchesReferenceIncludingSpecials) {
  std::mt19937 rng(1);
  const std::vector<float> specials = {kNaN, kInf, -kInf, 0.f, -0.f, 1e30f, -1e30f, -10.f, 10.f, -5.5f,
                                       3e-8f, -3e-8f, 88.f, -88.f, 1e-40f, 5.f};
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t n : kSizes) {
      for (int variant = 0; variant < 2; ++variant) {
        std::vector<float> x = randv(rng, n, -12.f, 12.f);
        if (variant == 1)
          for (size_t i = 0; i < x.size(); ++i) x[i] = specials[i % specials.size()];
        for (int tanh_form = 0; tanh_form < 2; ++tanh_form) {
          auto f = tanh_form ? k->gelu_tanh : k->gelu;
          auto fr = tanh_form ? ref().gelu_tanh : ref().gelu;
          std::vector<float> got(n, -7.f), want(n);
          fr(x.data(), n, want.data());
          f(x.data(), n, got.data());
          expect_close(got, want, x, lvl + (tanh_form ? " gelu_tanh n=" : " gelu n=") + std::to_string(n));
          f(x.data(), n, x.data());  // in place
          expect_close(x, want, {}, lvl + " in place");
        }
      }
    }
    // torch's values at the specials: NaN -> NaN, -inf -> NaN (inf * 0), +inf -> +inf
    const float sp[3] = {kNaN, -kInf, kInf};
    float out[3];
    for (auto f : {k->gelu, k->gelu_tanh}) {
      f(sp, 3, out);
      EXPECT_TRUE(std::isnan(out[0]) && std::isnan(out[1])) << lvl;
      EXPECT_EQ(out[2], kInf) << lvl;
    }
  }
}

TEST(RuntimeVec, SoftmaxMatchesReferenceIncludingSpecials) {
  std::mt19937 rng(2);
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t n : kSizes) {
      for (int log = 0; log < 2; ++log) {
        // plain, NaN somewhere, +inf somewhere, some -inf, all -inf
        for (int variant = 0; variant < 5; ++variant) {
          std::vector<float> x = randv(rng, n, -30.f, 30.f);
          const int64_t at = n / 2;
          if (variant == 1) x[at] = kNaN;
          if (variant == 2) x[at] = kInf;
          if (variant == 3)
            for (int64_t i = 0; i < n; i += 3) x[i] = -kInf;
          if (variant == 4) std::fill(x.begin(), x.end(), -kInf);
          std::vector<float> got(n, -7.f), want(n);
          ref().softmax_row(x.data(), n, log, want.data());
          k->softmax_row(x.data(), n, log, got.data());
          const std::string what = lvl + (log ? " log_softmax" : " softmax") + " n=" + std::to_string(n) +
                                   " variant " + std::to_string(variant);
          expect_close(got, want, {}, what);
          if (variant == 1 || variant == 2 || variant == 4 || (variant == 3 && n == 1))
            for (float v : got) ASSERT_TRUE(std::isnan(v)) << what;  // torch: the whole row is NaN
          if (variant == 3 && n > 1)
            for (int64_t i = 0; i < n; i += 3) ASSERT_EQ(got[i], log ? -kInf : 0.f) << what;
          k->softmax_row(x.data(), n, log, x.data());  // in place (the fused attention's use)
          expect_close(x, want, {}, what + " in place");
        }
      }
    }
  }
}

// softmax(x + add) in place: the fused attention's scores with an additive mask row.
TEST(RuntimeVec, SoftmaxAddMatchesReferenceIncludingSpecials) {
  std::mt19937 rng(7);
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t n : kSizes) {
      // plain, -inf mask entries, NaN score, +inf mask entry, every key masked
      for (int variant = 0; variant < 5; ++variant) {
        std::vector<float> x = randv(rng, n, -30.f, 30.f), add = randv(rng, n, -5.f, 5.f);
        const int64_t at = n / 2;
        if (variant == 1)
          for (int64_t i = 0; i < n; i += 3) add[i] = -kInf;
        if (variant == 2) x[at] = kNaN;
        if (variant == 3) add[at] = kInf;
        if (variant == 4) std::fill(add.begin(), add.end(), -kInf);
        std::vector<float> want(x), got(x);
        ref().softmax_add_row(want.data(), add.data(), n);
        k->softmax_add_row(got.data(), add.data(), n);
        const std::string what = lvl + " softmax_add n=" + std::to_string(n) + " variant " + std::to_string(variant);
        expect_close(got, want, {}, what);
        // the same as adding first and taking the softmax
        std::vector<float> sum(x);
        for (int64_t i = 0; i < n; ++i) sum[i] += add[i];
        std::vector<float> two(n);
        k->softmax_row(sum.data(), n, false, two.data());
        expect_close(got, two, {}, what + " vs add + softmax");
        if (variant >= 2)  // a NaN score, a +inf, or every key masked: the whole row is NaN, as in torch
          for (float v : got) ASSERT_TRUE(std::isnan(v)) << what;
        if (variant == 1 && n > 1)
          for (int64_t i = 0; i < n; i += 3) ASSERT_EQ(got[i], 0.f) << what;
      }
    }
  }
}

// The attention's key pack: a pure copy, so every level equals the reference bit for bit
// (NaN payloads included), at edges of the 8 x 8 blocks and 32-key panels and a row stride.
TEST(RuntimeVec, PackKeysEqualsReference) {
  std::mt19937 rng(9);
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t Sk : {1, 7, 8, 32, 45, 128}) {
      for (int64_t D : {1, 5, 8, 64, 67}) {
        const int64_t ldk = D + 3, P = (Sk + 31) / 32;
        std::vector<float> src = randv(rng, Sk * ldk, -3.f, 3.f);
        src[0] = kNaN;
        std::vector<float> want(P * D * 32, -7.f), got(P * D * 32, -9.f);
        ref().pack_keys(src.data(), ldk, Sk, D, want.data());
        k->pack_keys(src.data(), ldk, Sk, D, got.data());
        ASSERT_EQ(std::memcmp(got.data(), want.data(), got.size() * sizeof(float)), 0)
            << lvl << " Sk=" << Sk << " D=" << D;
        for (int64_t j = 0; j < Sk; ++j)  // and it is the transpose
          for (int64_t d = 0; d < D; ++d)
            if (j + d > 0) ASSERT_EQ(want[(j / 32) * D * 32 + d * 32 + j % 32], src[j * ldk + d]);
      }
    }
  }
}

TEST(RuntimeVec, LayerNormMatchesReferenceIncludingSpecials) {
  std::mt19937 rng(3);
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t n : kSizes) {
      const std::vector<float> w = randv(rng, n, 0.5f, 2.f), b = randv(rng, n, -1.f, 1.f);
      for (int variant = 0; variant < 5; ++variant) {
        // plain, large offset (mean >> std), NaN, +inf, -inf
        std::vector<float> x = randv(rng, n, -3.f, 3.f);
        if (variant == 1)
          for (auto& v : x) v += 1000.f;
        if (variant == 2) x[n / 2] = kNaN;
        if (variant == 3) x[n / 2] = kInf;
        if (variant == 4) x[n / 3] = -kInf;
        for (int affine = 0; affine < 2; ++affine) {
          const float* wp = affine ? w.data() : nullptr;
          const float* bp = affine ? b.data() : nullptr;
          std::vector<float> got(n, -7.f), want(n);
          ref().layer_norm_row(x.data(), n, wp, bp, 1e-5, want.data());
          k->layer_norm_row(x.data(), n, wp, bp, 1e-5, got.data());
          const std::string what = lvl + " layer_norm n=" + std::to_string(n) + " variant " + std::to_string(variant);
          expect_close(got, want, {}, what);
          if (variant >= 2)
            for (float v : got) ASSERT_TRUE(std::isnan(v)) << what;  // torch: the row is NaN
        }
      }
    }
  }
}

TEST(RuntimeVec, RecurrentCellsMatchReference) {
  namespace pk = aimass::runtime::packed;
  std::mt19937 rng(4);
  for (const vec::Kernels* k : levels()) {
    const std::string lvl = aimass::simd_level_name(k->level);
    for (int64_t H : kSizes) {
      const int64_t groups = (H + vec::kUnits - 1) / vec::kUnits, NP = groups * pk::kPanel;  // LSTM's; GRU uses 3/4
      for (int variant = 0; variant < 2; ++variant) {
        std::vector<float> a = randv(rng, NP, -6.f, 6.f), b = randv(rng, NP, -6.f, 6.f);
        const std::vector<float> c0 = randv(rng, H, -3.f, 3.f), hp = randv(rng, H, -1.f, 1.f);
        if (variant == 1) {  // specials in the gates and the state
          a[0] = kNaN;
          if (NP > 9) b[9] = kInf;
          if (NP > 17) a[17] = -kInf;
        }
        for (int gru = 0; gru < 2; ++gru) {
          // two calls over split group ranges == one call over all (the threaded split)
          std::vector<float> c1 = c0, c2 = c0, h1(H, -7.f), h2(H, -7.f), o1(H, -7.f), o2(H, -7.f);
          const int64_t mid = groups / 2;
          if (gru) {
            ref().gru_cells(a.data(), b.data(), 0, groups, H, hp.data(), h1.data(), o1.data());
            k->gru_cells(a.data(), b.data(), 0, mid, H, hp.data(), h2.data(), o2.data());
            k->gru_cells(a.data(), b.data(), mid, groups, H, hp.data(), h2.data(), o2.data());
          } else {
            ref().lstm_cells(a.data(), b.data(), 0, groups, H, c1.data(), h1.data(), o1.data());
            k->lstm_cells(a.data(), b.data(), 0, mid, H, c2.data(), h2.data(), o2.data());
            k->lstm_cells(a.data(), b.data(), mid, groups, H, c2.data(), h2.data(), o2.data());
          }
          const std::string what = lvl + (gru ? " gru" : " lstm") + " H=" + std::to_string(H) + " variant " +
                                   std::to_string(variant);
          expect_close(h2, h1, {}, what + " h");
          expect_close(o2, h1, {}, what + " out");
          expect_close(c2, c1, {}, what + " c");
        }
      }
    }
  }
}
