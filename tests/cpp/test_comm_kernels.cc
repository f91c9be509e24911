// comm kernels: every SIMD level available on this CPU against the scalar reference.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "aimass/comm_kernels.h"
#include "aimass/cpu_features.h"
#include "aimass/half.h"

namespace {

using aimass::SimdLevel;
using aimass::comm::ElemOp;
using aimass::comm::Half;

std::vector<SimdLevel> levels() {
  std::vector<SimdLevel> out{SimdLevel::Scalar};
  const auto& f = aimass::cpu_features();
  if (f.avx2 && f.f16c && f.fma) out.push_back(SimdLevel::AVX2);
  if (f.avx512f && f.avx512bw && f.avx512vl) out.push_back(SimdLevel::AVX512);
  return out;
}

struct LevelGuard {
  SimdLevel saved = aimass::simd_level();
  ~LevelGuard() { aimass::set_simd_level(SimdLevel::AVX512); aimass::set_simd_level(saved); }
};

bool is_nan_half(Half k, uint16_t h) {
  return k == Half::F16 ? ((h & 0x7c00) == 0x7c00 && (h & 0x3ff)) : ((h & 0x7f80) == 0x7f80 && (h & 0x7f));
}

// Equal bits, or both NaN (the vector units keep NaN payloads the reference does not).
void expect_same_half(Half k, const std::vector<uint16_t>& a, const std::vector<uint16_t>& b, const char* what) {
  ASSERT_EQ(a.size(), b.size());
  for (size_t i = 0; i < a.size(); ++i) {
    if (is_nan_half(k, a[i]) && is_nan_half(k, b[i])) continue;
    ASSERT_EQ(a[i], b[i]) << what << " at " << i;
  }
}

std::vector<float> interesting_floats(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) {
    uint32_t bits = rng();
    if (i % 3 == 0) {  // ordinary magnitudes, where rounding matters
      v[i] = std::ldexp(static_cast<float>(rng() % 2000000) / 1000000.0f - 1.0f, static_cast<int>(rng() % 40) - 20);
    } else {
      std::memcpy(&v[i], &bits, 4);
    }
  }
  const float specials[] = {0.0f, -0.0f, INFINITY, -INFINITY, NAN, 65504.0f, 65520.0f, 1e-8f, 5.96e-8f, 3e38f};
  for (size_t i = 0; i < sizeof(specials) / sizeof(float) && i < n; ++i) v[i] = specials[i];
  return v;
}

TEST(CommKernels, HalfToF32MatchesReferenceOnAllBitPatterns) {
  std::vector<uint16_t> all(65536 + 7);
  for (size_t i = 0; i < all.size(); ++i) all[i] = static_cast<uint16_t>(i);
  LevelGuard g;
  for (Half k : {Half::F16, Half::BF16}) {
    std::vector<float> ref(all.size());
    aimass::comm::ref::half_to_f32(k, all.data(), ref.data(), all.size());
    for (SimdLevel l : levels()) {
      aimass::set_simd_level(l);
      std::vector<float> got(all.size());
      aimass::comm::half_to_f32(k, all.data(), got.data(), all.size());
      for (size_t i = 0; i < all.size(); ++i) {
        if (std::isnan(ref[i])) {
          ASSERT_TRUE(std::isnan(got[i])) << i;
        } else {
          ASSERT_EQ(std::memcmp(&ref[i], &got[i], 4), 0) << "level " << aimass::simd_level_name(l) << " bits " << i;
        }
      }
    }
  }
}

TEST(CommKernels, F32ToHalfMatchesReference) {
  LevelGuard g;
  for (size_t n : {0u, 1u, 7u, 8u, 15u, 16u, 17u, 1000u, 100003u}) {
    auto v = interesting_floats(n, static_cast<uint32_t>(n) + 1);
    for (Half k : {Half::F16, Half::BF16}) {
      for (float scale : {1.0f, 0.25f}) {
        std::vector<uint16_t> ref(n);
        aimass::comm::ref::f32_to_half(k, v.data(), ref.data(), n, scale);
        for (SimdLevel l : levels()) {
          aimass::set_simd_level(l);
          std::vector<uint16_t> got(n, 0xdead);
          aimass::comm::f32_to_half(k, v.data(), got.data(), n, scale);
          expect_same_half(k, ref, got, aimass::simd_level_name(l));
        }
      }
    }
  }
}

TEST(CommKernels, ScalarF16ConversionIsIeeeRoundToNearestEven) {
  auto v = interesting_floats(20000, 7);
  for (float f : v) {
    _Float16 h = static_cast<_Float16>(f);
    uint16_t want;
    std::memcpy(&want, &h, 2);
    uint16_t got = aimass::f32_to_f16(f);
    if (std::isnan(f)) continue;
    ASSERT_EQ(got, want) << f;
  }
}

TEST(CommKernels, ReduceHalfMatchesReferenceForEveryOp) {
  LevelGuard g;
  for (size_t n : {1u, 9u, 16u, 33u, 4099u}) {
    auto a = interesting_floats(n, 11), b = interesting_floats(n, 12);
    for (Half k : {Half::F16, Half::BF16}) {
      std::vector<uint16_t> ha(n), hb(n);
      aimass::comm::ref::f32_to_half(k, a.data(), ha.data(), n, 1.0f);
      aimass::comm::ref::f32_to_half(k, b.data(), hb.data(), n, 1.0f);
      for (ElemOp op : {ElemOp::Sum, ElemOp::Min, ElemOp::Max, ElemOp::Prod}) {
        std::vector<uint16_t> ref = hb;
        aimass::comm::ref::reduce_half(k, op, ha.data(), ref.data(), n);
        for (SimdLevel l : levels()) {
          aimass::set_simd_level(l);
          std::vector<uint16_t> got = hb;
          aimass::comm::reduce_half(k, op, ha.data(), got.data(), n);
          expect_same_half(k, ref, got, aimass::simd_level_name(l));
        }
      }
    }
  }
}

TEST(CommKernels, ReduceHalfSumsInFp32WithOneRounding) {
  // 2048 + 1 is not representable in fp16 (spacing 2 there): the sum rounds to even once.
  uint16_t a = aimass::f32_to_f16(2048.0f), b = aimass::f32_to_f16(1.0f);
  uint16_t io = b;
  aimass::comm::reduce_half(Half::F16, ElemOp::Sum, &a, &io, 1);
  EXPECT_EQ(aimass::f16_to_f32(io), 2048.0f);
  uint16_t c = aimass::f32_to_f16(3.0f), io2 = aimass::f32_to_f16(2048.0f);
  aimass::comm::reduce_half(Half::F16, ElemOp::Sum, &c, &io2, 1);
  EXPECT_EQ(aimass::f16_to_f32(io2), 2052.0f);  // 2051 -> nearest even 2052
}

TEST(CommKernels, ProductOfFloatsAndHalves) {
  const float a[3] = {1.5f, -2.0f, 0.0f}, b[3] = {2.0f, 3.0f, 7.0f};
  const float* srcs[2] = {a, b};
  float out[3];
  aimass::comm::reduce_f32(ElemOp::Prod, srcs, 2, out, 3);
  EXPECT_EQ(out[0], 3.0f);
  EXPECT_EQ(out[1], -6.0f);
  EXPECT_EQ(out[2], 0.0f);
  uint16_t h = aimass::f32_to_bf16(1.5f), io = aimass::f32_to_bf16(-4.0f);
  aimass::comm::reduce_half(Half::BF16, ElemOp::Prod, &h, &io, 1);
  EXPECT_EQ(aimass::bf16_to_f32(io), -6.0f);
}

TEST(CommKernels, ScaleHalf) {
  std::vector<uint16_t> v(5000);
  for (size_t i = 0; i < v.size(); ++i) v[i] = aimass::f32_to_bf16(static_cast<float>(i));
  aimass::comm::scale_half(Half::BF16, v.data(), v.size(), 0.5f);
  for (size_t i = 0; i < v.size(); ++i)
    ASSERT_EQ(v[i], aimass::f32_to_bf16(aimass::bf16_to_f32(aimass::f32_to_bf16(static_cast<float>(i))) * 0.5f));
}

}  // namespace

namespace {
TEST(CommKernels, ReduceF32OverSourcesMatchesReference) {
  LevelGuard g;
  for (size_t n : {0u, 1u, 15u, 16u, 17u, 1001u}) {
    for (int k : {1, 2, 3, 4}) {
      std::vector<std::vector<float>> src;
      std::vector<const float*> ptrs;
      for (int j = 0; j < k; ++j) src.push_back(interesting_floats(n, 100 + j));
      for (auto& s : src) ptrs.push_back(s.data());
      for (ElemOp op : {ElemOp::Sum, ElemOp::Min, ElemOp::Max, ElemOp::Prod}) {
        std::vector<float> ref(n);
        aimass::comm::ref::reduce_f32(op, ptrs.data(), k, ref.data(), n);
        for (SimdLevel l : levels()) {
          aimass::set_simd_level(l);
          std::vector<float> got(n), copy(n), scaled_ref(n), scaled(n), scaled_copy(n);
          aimass::comm::reduce_f32(op, ptrs.data(), k, got.data(), n, copy.data());
          ASSERT_TRUE(n == 0 || std::memcmp(got.data(), copy.data(), n * 4) == 0) << "second destination differs";
          if (op == ElemOp::Sum) {  // the average's scale, folded into the pass
            aimass::comm::ref::reduce_f32(op, ptrs.data(), k, scaled_ref.data(), n, nullptr, 1.0f / 3);
            aimass::comm::reduce_f32(op, ptrs.data(), k, scaled.data(), n, scaled_copy.data(), 1.0f / 3);
            for (size_t i = 0; i < n; ++i) {
              if (std::isnan(scaled_ref[i])) continue;
              ASSERT_EQ(std::memcmp(&scaled_ref[i], &scaled[i], 4), 0) << aimass::simd_level_name(l) << " i=" << i;
              ASSERT_EQ(std::memcmp(&scaled[i], &scaled_copy[i], 4), 0);
              float want = ref[i] * (1.0f / 3);
              ASSERT_EQ(std::memcmp(&want, &scaled_ref[i], 4), 0) << "ref: scale applies after the reduction";
            }
          }
          for (size_t i = 0; i < n; ++i) {
            if (std::isnan(ref[i])) {
              ASSERT_TRUE(std::isnan(got[i]));
            } else {
              ASSERT_EQ(std::memcmp(&ref[i], &got[i], 4), 0) << aimass::simd_level_name(l) << " k=" << k << " i=" << i;
            }
          }
        }
      }
    }
  }
}
}  // namespace

namespace {
// The SIMD kernels first reduce the elements up to dst's next line (or half line) boundary, then go on
// with whole-line stores: outputs and sources at any 4-byte offset within their lines (numpy's arrays
// start 16 bytes in), sources at dst's offset or at another, in place, a second destination elsewhere,
// sizes shorter and longer than the head: the reference's exact bits at every level.
TEST(CommKernels, ReduceF32WithADestinationInsideALineMatchesReference) {
  LevelGuard g;
  for (size_t off : {4u, 16u, 32u, 44u, 60u}) {
    for (size_t src_off : {off, size_t(0), size_t(8)}) {
      for (size_t n : {1u, 5u, 11u, 12u, 13u, 16u, 17u, 29u, 64u, 65u, 200u, 1001u}) {
        for (int k : {1, 2, 3}) {
          // 64-byte aligned blocks; element i of every array sits at its offset + 4i
          const size_t words = n + 32;
          std::vector<std::vector<float>> blocks(k + 3, std::vector<float>(words + 16));
          auto at = [&](std::vector<float>& b, size_t byte_off) {
            const uintptr_t a = (reinterpret_cast<uintptr_t>(b.data()) + 63) / 64 * 64;
            return reinterpret_cast<float*>(a + byte_off);
          };
          std::vector<const float*> ptrs;
          for (int j = 0; j < k; ++j) {
            float* p = at(blocks[j], j == 0 ? off : src_off);
            const std::vector<float> v = interesting_floats(n, 300 + j);
            std::copy(v.begin(), v.end(), p);
            ptrs.push_back(p);
          }
          for (ElemOp op : {ElemOp::Sum, ElemOp::Min, ElemOp::Max}) {
            for (float scale : {1.0f, 0.25f}) {
              std::vector<float> ref(n);
              aimass::comm::ref::reduce_f32(op, ptrs.data(), k, ref.data(), n, nullptr, scale);
              for (SimdLevel l : levels()) {
                aimass::set_simd_level(l);
                float* dst = at(blocks[k], off);
                float* dst2 = at(blocks[k + 1], 20);
                aimass::comm::reduce_f32(op, ptrs.data(), k, dst, n, dst2, scale);
                // in place: dst is the first source (a copy of it, at the same offset)
                float* own = at(blocks[k + 2], off);
                std::copy(ptrs[0], ptrs[0] + n, own);
                std::vector<const float*> in_place(ptrs);
                in_place[0] = own;
                aimass::comm::reduce_f32(op, in_place.data(), k, own, n, nullptr, scale);
                for (size_t i = 0; i < n; ++i) {
                  if (std::isnan(ref[i])) {
                    ASSERT_TRUE(std::isnan(dst[i]) && std::isnan(dst2[i]) && std::isnan(own[i]));
                    continue;
                  }
                  ASSERT_EQ(std::memcmp(&ref[i], &dst[i], 4), 0)
                      << aimass::simd_level_name(l) << " off " << off << " src_off " << src_off << " n " << n
                      << " k " << k << " i " << i;
                  ASSERT_EQ(std::memcmp(&ref[i], &dst2[i], 4), 0) << "second destination, i " << i;
                  ASSERT_EQ(std::memcmp(&ref[i], &own[i], 4), 0) << "in place, i " << i;
                }
              }
            }
          }
        }
      }
    }
  }
}
}  // namespace

namespace {
std::vector<double> interesting_doubles(size_t n, uint32_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<double> v(n);
  for (size_t i = 0; i < n; ++i) {
    if (i % 3 == 0) {  // ordinary magnitudes, where rounding matters
      v[i] = std::ldexp(static_cast<double>(rng() % 2000000001) / 1e9 - 1.0, static_cast<int>(rng() % 80) - 40);
    } else {
      const uint64_t bits = rng();
      std::memcpy(&v[i], &bits, 8);
    }
  }
  const double specials[] = {0.0, -0.0, INFINITY, -INFINITY, NAN, 1e308, -1e308, 5e-324, 1.0, 3.0};
  for (size_t i = 0; i < sizeof(specials) / sizeof(double) && i < n; ++i) v[i] = specials[i];
  return v;
}

// fp64 (the staged allreduce's result slot and output in one pass): the plain loops it replaced
// (dst = src0; dst op= src_j in order; min/max as `s < d ? s : d`; the average divided by the rank
// count) give the reference's exact bits; every level gives them too, with dst and a second destination
// at any 8-byte offset within their lines, sources at dst's offset or another, in place, any k.
// The streaming copy (a large allgather's own rows) writes exactly the source bytes at every level,
// whatever the destination's and source's offsets in their lines, and nothing past the end.
TEST(CommKernels, CopyStreamingCopiesExactBytesAtEveryOffset) {
  LevelGuard g;
  std::mt19937 rng(7);
  for (SimdLevel l : levels()) {
    aimass::set_simd_level(l);
    for (size_t dst_off : {0u, 1u, 31u, 32u, 63u}) {
      for (size_t src_off : {0u, 5u, 64u}) {
        for (size_t n : {0u, 1u, 31u, 63u, 64u, 127u, 128u, 255u, 256u, 257u, 1000u, 4096u, 70000u}) {
          std::vector<uint8_t> src(n + 128), dst(n + 256, 0xA5);
          for (auto& b : src) b = static_cast<uint8_t>(rng());
          const uintptr_t base = (reinterpret_cast<uintptr_t>(dst.data()) + 63) / 64 * 64;
          auto* d = reinterpret_cast<uint8_t*>(base) + dst_off;
          const size_t before = static_cast<size_t>(d - dst.data());
          aimass::comm::copy_streaming(d, src.data() + src_off, n);
          ASSERT_EQ(0, std::memcmp(d, src.data() + src_off, n)) << "level " << static_cast<int>(l) << " n " << n;
          for (size_t i = 0; i < before; ++i) ASSERT_EQ(dst[i], 0xA5) << "wrote before the destination";
          for (size_t i = before + n; i < dst.size(); ++i) ASSERT_EQ(dst[i], 0xA5) << "wrote past the end";
        }
      }
    }
  }
}

// copy_bytes (the engine's copies between its slots and the caller's arrays) writes exactly the source bytes
// at every level and nothing outside the destination, both where it takes memcpy and where (dst 1-63 bytes
// past src modulo 4 KiB, 4 KiB and more) it takes the vector loop: distances across that window's edges,
// sizes across the 4 KiB threshold and the loops' tails.
TEST(CommKernels, CopyBytesCopiesExactBytesAtEveryDistance) {
  LevelGuard g;
  std::mt19937 rng(11);
  std::vector<uint8_t> src(80000 + 8192);
  for (auto& b : src) b = static_cast<uint8_t>(rng());
  // src page-aligned + 16 (numpy's large arrays); dst at src + 4096 * k + dist
  const uintptr_t sbase = (reinterpret_cast<uintptr_t>(src.data()) + 4095) / 4096 * 4096 + 16;
  const auto* s = reinterpret_cast<const uint8_t*>(sbase);
  for (SimdLevel l : levels()) {
    aimass::set_simd_level(l);
    for (size_t dist : {0u, 1u, 4u, 8u, 16u, 24u, 32u, 48u, 63u, 64u, 65u, 4080u, 4095u}) {
      for (size_t n : {0u, 100u, 4095u, 4096u, 4097u, 4096u + 127u, 4096u + 255u, 70000u}) {
        std::vector<uint8_t> dst(n + 3 * 4096, 0xA5);
        const uintptr_t page = (reinterpret_cast<uintptr_t>(dst.data()) + 4095) / 4096 * 4096;
        auto* d = reinterpret_cast<uint8_t*>(page + ((sbase + dist - page) & 4095));
        ASSERT_EQ((reinterpret_cast<uintptr_t>(d) - sbase) & 4095, dist);
        const size_t before = static_cast<size_t>(d - dst.data());
        aimass::comm::copy_bytes(d, s, n);
        ASSERT_EQ(0, std::memcmp(d, s, n)) << "level " << static_cast<int>(l) << " dist " << dist << " n " << n;
        for (size_t i = 0; i < before; ++i) ASSERT_EQ(dst[i], 0xA5) << "wrote before the destination";
        for (size_t i = before + n; i < dst.size(); ++i) ASSERT_EQ(dst[i], 0xA5) << "wrote past the end";
      }
    }
  }
}

TEST(CommKernels, ReduceF64MatchesTheScalarLoopsAtEveryOffset) {
  LevelGuard g;
  for (size_t off : {0u, 8u, 16u, 40u, 56u}) {
    for (size_t src_off : {off, size_t(0), size_t(24)}) {
      for (size_t n : {0u, 1u, 3u, 7u, 8u, 9u, 31u, 32u, 33u, 100u, 517u}) {
        for (int k : {1, 2, 3, 4}) {
          std::vector<std::vector<double>> blocks(k + 3, std::vector<double>(n + 24));
          auto at = [&](std::vector<double>& b, size_t byte_off) {
            const uintptr_t a = (reinterpret_cast<uintptr_t>(b.data()) + 63) / 64 * 64;
            return reinterpret_cast<double*>(a + byte_off);
          };
          std::vector<const double*> ptrs;
          for (int j = 0; j < k; ++j) {
            double* p = at(blocks[j], j == 0 ? off : src_off);
            const std::vector<double> v = interesting_doubles(n, 500 + j + static_cast<uint32_t>(n));
            std::copy(v.begin(), v.end(), p);
            ptrs.push_back(p);
          }
          for (ElemOp op : {ElemOp::Sum, ElemOp::Min, ElemOp::Max, ElemOp::Prod}) {
            for (double divisor : {1.0, 3.0}) {
              if (divisor != 1.0 && op != ElemOp::Sum) continue;
              std::vector<double> loops(n);  // the loops of reduce_typed<double> and divide()
              std::copy(ptrs[0], ptrs[0] + n, loops.begin());
              for (int j = 1; j < k; ++j)
                for (size_t i = 0; i < n; ++i) {
                  const double s = ptrs[j][i];
                  double& d = loops[i];
                  d = op == ElemOp::Min ? (s < d ? s : d) : op == ElemOp::Max ? (s > d ? s : d)
                      : op == ElemOp::Prod ? d * s : d + s;
                }
              if (divisor != 1.0)
                for (double& d : loops) d /= 3;
              std::vector<double> ref(n);
              aimass::comm::ref::reduce_f64(op, ptrs.data(), k, ref.data(), n, nullptr, divisor);
              for (size_t i = 0; i < n; ++i) {
                if (std::isnan(loops[i])) {
                  ASSERT_TRUE(std::isnan(ref[i]));
                  continue;
                }
                ASSERT_EQ(std::memcmp(&loops[i], &ref[i], 8), 0) << "ref, i " << i;
              }
              for (SimdLevel l : levels()) {
                aimass::set_simd_level(l);
                double* dst = at(blocks[k], off);
                double* dst2 = at(blocks[k + 1], 48);
                aimass::comm::reduce_f64(op, ptrs.data(), k, dst, n, dst2, divisor);
                double* own = at(blocks[k + 2], off);  // in place: dst is (a copy of) the first source
                std::copy(ptrs[0], ptrs[0] + n, own);
                std::vector<const double*> in_place(ptrs);
                in_place[0] = own;
                aimass::comm::reduce_f64(op, in_place.data(), k, own, n, nullptr, divisor);
                for (size_t i = 0; i < n; ++i) {
                  if (std::isnan(ref[i])) {
                    ASSERT_TRUE(std::isnan(dst[i]) && std::isnan(dst2[i]) && std::isnan(own[i]));
                    continue;
                  }
                  ASSERT_EQ(std::memcmp(&ref[i], &dst[i], 8), 0)
                      << aimass::simd_level_name(l) << " off " << off << " src_off " << src_off << " n " << n
                      << " k " << k << " i " << i;
                  ASSERT_EQ(std::memcmp(&ref[i], &dst2[i], 8), 0) << "second destination, i " << i;
                  ASSERT_EQ(std::memcmp(&ref[i], &own[i], 8), 0) << "in place, i " << i;
                }
              }
            }
          }
        }
      }
    }
  }
}
}  // namespace

namespace {
// 16-bit floats over k sources in one pass (the staged allreduce's result slot and output at once, an
// average's scale folded in): the composition it replaced (widen each source, reduce_f32 over {source,
// running}, round once; for an average scale_half() of the rounded sum) gives the reference's bits, and
// every level gives them too, with dst and dst2 at any 2-byte offset within their lines, in place, any k.
TEST(CommKernels, ReduceHalfSourcesMatchesTheComposedPasses) {
  LevelGuard g;
  for (Half kind : {Half::F16, Half::BF16}) {
    for (size_t off : {0u, 2u, 16u, 62u}) {
      for (size_t n : {0u, 1u, 7u, 15u, 16u, 17u, 31u, 33u, 64u, 100u, 1037u}) {
        for (int k : {1, 2, 3, 5}) {
          std::vector<std::vector<uint16_t>> blocks(k + 3, std::vector<uint16_t>(n + 64));
          auto at = [&](std::vector<uint16_t>& b, size_t byte_off) {
            const uintptr_t a = (reinterpret_cast<uintptr_t>(b.data()) + 63) / 64 * 64;
            return reinterpret_cast<uint16_t*>(a + byte_off);
          };
          std::vector<const uint16_t*> ptrs;
          for (int j = 0; j < k; ++j) {
            uint16_t* p = at(blocks[j], j == 1 ? 6 : off);
            const std::vector<float> f = interesting_floats(n, 700 + j + static_cast<uint32_t>(n));
            aimass::comm::ref::f32_to_half(kind, f.data(), p, n, 1.0f);
            ptrs.push_back(p);
          }
          for (ElemOp op : {ElemOp::Sum, ElemOp::Min, ElemOp::Max, ElemOp::Prod}) {
            for (float scale : {1.0f, 0.5f, 1.0f / 3}) {
              if (scale != 1.0f && op != ElemOp::Sum) continue;
              aimass::set_simd_level(SimdLevel::Scalar);  // the composed passes, at the reference level
              std::vector<float> acc(n), tmp(n);
              std::vector<uint16_t> composed(n);
              aimass::comm::half_to_f32(kind, ptrs[0], acc.data(), n);
              for (int j = 1; j < k; ++j) {
                aimass::comm::half_to_f32(kind, ptrs[j], tmp.data(), n);
                const float* two[2] = {tmp.data(), acc.data()};
                aimass::comm::reduce_f32(op, two, 2, acc.data(), n);
              }
              aimass::comm::f32_to_half(kind, acc.data(), composed.data(), n);
              if (scale != 1.0f) aimass::comm::scale_half(kind, composed.data(), n, scale);
              std::vector<uint16_t> ref(n);
              aimass::comm::ref::reduce_half_sources(kind, op, ptrs.data(), k, ref.data(), n, nullptr, scale);
              expect_same_half(kind, composed, ref, "reference against the composed passes");
              for (SimdLevel l : levels()) {
                aimass::set_simd_level(l);
                uint16_t* dst = at(blocks[k], off);
                uint16_t* dst2 = at(blocks[k + 1], 34);
                aimass::comm::reduce_half_sources(kind, op, ptrs.data(), k, dst, n, dst2, scale);
                uint16_t* own = at(blocks[k + 2], off);  // in place: dst is (a copy of) the first source
                std::copy(ptrs[0], ptrs[0] + n, own);
                std::vector<const uint16_t*> in_place(ptrs);
                in_place[0] = own;
                aimass::comm::reduce_half_sources(kind, op, in_place.data(), k, own, n, nullptr, scale);
                const std::string what = std::string(aimass::simd_level_name(l)) + " off " + std::to_string(off) +
                                         " n " + std::to_string(n) + " k " + std::to_string(k);
                expect_same_half(kind, ref, std::vector<uint16_t>(dst, dst + n), what.c_str());
                expect_same_half(kind, ref, std::vector<uint16_t>(dst2, dst2 + n), "second destination");
                expect_same_half(kind, ref, std::vector<uint16_t>(own, own + n), "in place");
              }
            }
          }
        }
      }
    }
  }
}
}  // namespace
