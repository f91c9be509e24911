// Quantization driver: layout walking, scale computation, parallel split and
// run-time ISA dispatch. The element kernels live in quantize_{scalar,avx2,avx512}.cc.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <vector>

#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/quant.h"
#include "quant/quantize_kernels.h"

namespace aimass {
namespace quant {

// ------------------------------------------------------------------ dispatch
MinMax minmax(const float* x, int64_t n, SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::minmax_avx512(x, n);
  if (level >= SimdLevel::AVX2) return detail::minmax_avx2(x, n);
  return detail::minmax_scalar(x, n);
}
void quantize_run(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax, int8_t* q,
                  SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::quantize_run_avx512(x, n, scale, zp, qmin, qmax, q);
  if (level >= SimdLevel::AVX2) return detail::quantize_run_avx2(x, n, scale, zp, qmin, qmax, q);
  detail::quantize_run_scalar(x, n, scale, zp, qmin, qmax, q);
}
void dequantize_run(const int8_t* q, int64_t n, bool is_unsigned, float scale, int32_t zp, float* out,
                    SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::dequantize_run_avx512(q, n, is_unsigned, scale, zp, out);
  if (level >= SimdLevel::AVX2) return detail::dequantize_run_avx2(q, n, is_unsigned, scale, zp, out);
  detail::dequantize_run_scalar(q, n, is_unsigned, scale, zp, out);
}
void pack_nibbles(const int8_t* q, int64_t n, uint8_t* out, SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::pack_nibbles_avx512(q, n, out);
  if (level >= SimdLevel::AVX2) return detail::pack_nibbles_avx2(q, n, out);
  detail::pack_nibbles_scalar(q, n, out);
}
void unpack_nibbles(const uint8_t* in, int64_t n, bool is_signed, int8_t* q, SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::unpack_nibbles_avx512(in, n, is_signed, q);
  if (level >= SimdLevel::AVX2) return detail::unpack_nibbles_avx2(in, n, is_signed, q);
  detail::unpack_nibbles_scalar(in, n, is_signed, q);
}

void widen_to_f32(const uint16_t* in, int64_t n, bool is_bf16, float* out, SimdLevel level) {
  if (level >= SimdLevel::AVX512) return detail::widen_to_f32_avx512(in, n, is_bf16, out);
  if (level >= SimdLevel::AVX2) return detail::widen_to_f32_avx2(in, n, is_bf16, out);
  detail::widen_to_f32_scalar(in, n, is_bf16, out);
}

// ------------------------------------------------------------------ layout
void validate(const QuantSpec& s) {
  AIMASS_CHECK(s.bits == 8 || s.bits == 4, ValueError, "bits must be 8 or 4, got ", s.bits);
  AIMASS_CHECK(s.scheme == Scheme::Symmetric || s.scheme == Scheme::Asymmetric, ValueError,
               "scheme must be symmetric or asymmetric");
  AIMASS_CHECK(s.outer >= 1 && s.channels >= 1 && s.inner >= 1, ValueError,
               "w must have at least one element (got view [", s.outer, ", ", s.channels, ", ", s.inner, "])");
  if (s.granularity == Granularity::Group) {
    const int64_t k = s.outer * s.inner;
    AIMASS_CHECK(s.group_size >= 1 && k % s.group_size == 0, ValueError, "group_size=", s.group_size,
                 " must divide the ", k, " elements of each channel; pick a divisor of ", k);
  } else {
    AIMASS_CHECK(s.granularity == Granularity::Tensor || s.granularity == Granularity::Channel, ValueError,
                 "granularity must be tensor, channel or group");
  }
}

int64_t numel(const QuantSpec& s) { return s.outer * s.channels * s.inner; }

int64_t num_blocks(const QuantSpec& s) {
  switch (s.granularity) {
    case Granularity::Tensor: return 1;
    case Granularity::Channel: return s.channels;
    case Granularity::Group: return s.channels * (s.outer * s.inner / s.group_size);
  }
  return 1;
}

int64_t data_bytes(const QuantSpec& s) { return s.bits == 8 ? numel(s) : (numel(s) + 1) / 2; }

namespace {

constexpr int64_t kTile = 1 << 15;  // elements per parallel task (even: nibble pairs never straddle tasks)

struct Range {
  int32_t qmin, qmax;
};
Range qrange(const QuantSpec& s) {
  if (s.scheme == Scheme::Symmetric) return s.bits == 8 ? Range{-127, 127} : Range{-7, 7};
  return s.bits == 8 ? Range{0, 255} : Range{0, 15};
}

// Calls fn(start, len, block) for the runs of flat elements [e0, e1) that share one scale.
template <typename Fn>
void for_each_run(const QuantSpec& s, int64_t e0, int64_t e1, Fn&& fn) {
  if (s.granularity == Granularity::Tensor) {
    fn(e0, e1 - e0, int64_t{0});
    return;
  }
  const int64_t inner = s.inner, C = s.channels;
  const int64_t G = s.group_size, ngroups = s.granularity == Granularity::Group ? s.outer * inner / G : 1;
  int64_t e = e0;
  while (e < e1) {
    const int64_t r = e / inner, i = e - r * inner;
    const int64_t o = r / C, c = r - o * C;
    int64_t end = std::min((r + 1) * inner, e1);
    int64_t block = c;
    if (s.granularity == Granularity::Group) {
      const int64_t k = o * inner + i;
      block = c * ngroups + k / G;
      end = std::min(end, e + (G - k % G));
    }
    fn(e, end - e, block);
    e = end;
  }
}

void params_from_range(const QuantSpec& s, const MinMax& mm, float* scale, int32_t* zp) {
  AIMASS_CHECK(mm.finite, ValueError, "w contains NaN or Inf; quantization needs finite weights "
               "(check the model for diverged values)");
  const Range q = qrange(s);
  if (s.scheme == Scheme::Symmetric) {
    const float amax = std::max(std::fabs(mm.min), std::fabs(mm.max));
    float sc = amax / static_cast<float>(q.qmax);
    if (sc == 0.0f) sc = 1.0f;  // all-zero block (or a subnormal max that underflows): never NaN
    *scale = sc;
    if (zp) *zp = 0;
    return;
  }
  const float lo = std::min(mm.min, 0.0f), hi = std::max(mm.max, 0.0f);  // zero stays representable
  float sc = (hi - lo) / static_cast<float>(q.qmax);
  AIMASS_CHECK(std::isfinite(sc), ValueError, "w's range [", lo, ", ", hi,
               "] overflows float32 in max - min; use scheme='symmetric'");
  if (sc == 0.0f) sc = 1.0f;  // hi == lo (all zeros)
  float z = std::nearbyint(-lo / sc);
  z = std::min(std::max(z, 0.0f), static_cast<float>(q.qmax));
  *scale = sc;
  *zp = static_cast<int32_t>(z);
}

}  // namespace

void compute_params(const QuantSpec& s, const float* x, float* scale, int32_t* zero_point) {
  validate(s);
  AIMASS_CHECK(s.scheme == Scheme::Symmetric || zero_point != nullptr, ValueError,
               "asymmetric quantization needs a zero_point output");
  const SimdLevel lvl = simd_level();
  const int64_t n = numel(s);
  if (s.granularity == Granularity::Tensor) {
    const int64_t nchunks = std::max<int64_t>(1, std::min<int64_t>((n + kTile - 1) / kTile, 256));
    std::vector<MinMax> part(nchunks);
    parallel_for(0, nchunks, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t b = n * c / nchunks, e = n * (c + 1) / nchunks;
        part[c] = minmax(x + b, e - b, lvl);
      }
    });
    MinMax all{INFINITY, -INFINITY, true};
    for (const auto& p : part) {
      all.min = std::min(all.min, p.min);
      all.max = std::max(all.max, p.max);
      all.finite = all.finite && p.finite;
    }
    params_from_range(s, all, scale, zero_point);
    return;
  }
  // channel / group: channel c owns its blocks, so channels run in parallel with no reduction
  const int64_t C = s.channels, inner = s.inner, outer = s.outer;
  const int64_t G = s.granularity == Granularity::Group ? s.group_size : outer * inner;
  const int64_t ngroups = outer * inner / G;
  const int64_t grain = std::max<int64_t>(1, kTile / std::max<int64_t>(1, outer * inner));
  parallel_for(0, C, grain, [&](int64_t c0, int64_t c1) {
    std::vector<MinMax> acc(ngroups);
    for (int64_t c = c0; c < c1; ++c) {
      std::fill(acc.begin(), acc.end(), MinMax{INFINITY, -INFINITY, true});
      for (int64_t o = 0; o < outer; ++o) {
        const float* row = x + (o * C + c) * inner;
        int64_t i = 0;
        while (i < inner) {
          const int64_t k = o * inner + i, g = k / G;
          const int64_t len = std::min(inner - i, G - k % G);
          const MinMax m = minmax(row + i, len, lvl);
          MinMax& a = acc[g];
          a.min = std::min(a.min, m.min);
          a.max = std::max(a.max, m.max);
          a.finite = a.finite && m.finite;
          i += len;
        }
      }
      for (int64_t g = 0; g < ngroups; ++g)
        params_from_range(s, acc[g], scale + c * ngroups + g, zero_point ? zero_point + c * ngroups + g : nullptr);
    }
  });
}

void quantize(const QuantSpec& s, const float* x, const float* scale, const int32_t* zero_point, void* out) {
  validate(s);
  const SimdLevel lvl = simd_level();
  const Range q = qrange(s);
  const int64_t n = numel(s);
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const bool asym = s.scheme == Scheme::Asymmetric;
  AIMASS_CHECK(!asym || zero_point != nullptr, ValueError, "asymmetric quantization needs zero_point");
  int8_t* out8 = static_cast<int8_t*>(out);
  parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> buf(s.bits == 4 ? kTile : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      int8_t* dst = s.bits == 8 ? out8 + e0 : buf.data();
      for_each_run(s, e0, e1, [&](int64_t st, int64_t len, int64_t b) {
        quantize_run(x + st, len, scale[b], asym ? zero_point[b] : 0, q.qmin, q.qmax, dst + (st - e0), lvl);
      });
      if (s.bits == 4) pack_nibbles(buf.data(), e1 - e0, reinterpret_cast<uint8_t*>(out8) + e0 / 2, lvl);
    }
  });
}

namespace {

// Channel runs shorter than this (a non-leading axis near the end, e.g. axis=-1 of a
// Linear weight) make the strided walk call the kernels per handful of elements; such
// layouts are transposed to the canonical [C, K] layout instead.
constexpr int64_t kTransposeBelow = 64;

bool transpose_ok(const QuantSpec& s) {
  return s.granularity != Granularity::Tensor && s.outer > 1 && s.inner < kTransposeBelow;
}

// dst[c, r, i] = src[r, c, i] for src viewed as [rows, cols, inner]. Tiles go through a small
// local buffer: reading and writing whole rows of a tile keeps power-of-two strides (4096
// columns = 16 KiB apart) from evicting each other in L1 before their lines are used.
template <typename T>
void transpose_blocks(const T* src, T* dst, int64_t rows, int64_t cols, int64_t inner) {
  int64_t B = 4;  // tile of B x B runs, at most 16 KiB
  while ((2 * B) * (2 * B) * inner * static_cast<int64_t>(sizeof(T)) <= 16384) B *= 2;
  const int64_t ctiles = (cols + B - 1) / B;
  parallel_for(0, ctiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<T> buf(B * B * inner);
    T* bp = buf.data();
    for (int64_t ct = t0; ct < t1; ++ct) {
      const int64_t c0 = ct * B, nc = std::min(cols, c0 + B) - c0;
      for (int64_t r0 = 0; r0 < rows; r0 += B) {
        const int64_t nr = std::min(rows, r0 + B) - r0;
        for (int64_t r = 0; r < nr; ++r)  // contiguous reads: row r0+r, columns c0..c0+nc
          std::memcpy(bp + r * B * inner, src + ((r0 + r) * cols + c0) * inner,
                      static_cast<size_t>(nc * inner) * sizeof(T));
        for (int64_t c = 0; c < nc; ++c) {  // contiguous writes: row c0+c of dst, rows r0..r0+nr
          T* dp = dst + ((c0 + c) * rows + r0) * inner;
          if (inner == 1) {
            for (int64_t r = 0; r < nr; ++r) dp[r] = bp[r * B + c];
          } else {
            for (int64_t r = 0; r < nr; ++r)
              std::memcpy(dp + r * inner, bp + (r * B + c) * inner, static_cast<size_t>(inner) * sizeof(T));
          }
        }
      }
    }
  });
}

// Leading axis (blocks are contiguous, channel c = x[c*K, (c+1)*K)): scan and quantize each
// channel while it is still in cache, one pass over memory instead of two. Half inputs are
// widened one channel at a time into a thread-local buffer. Packed 4-bit output needs even K so
// that every channel starts on a byte; pack=false writes one int8 per value instead.
bool fused_ok(const QuantSpec& s) {
  return s.granularity != Granularity::Tensor && s.outer == 1 && (s.bits == 8 || s.inner % 2 == 0);
}

void quantize_fused(const QuantSpec& s, const void* x, DType dtype, float* scale, int32_t* zero_point,
                    void* out, bool pack) {
  const SimdLevel lvl = simd_level();
  const Range q = qrange(s);
  const int64_t K = s.inner;
  const int64_t G = s.granularity == Granularity::Group ? s.group_size : K, ngroups = K / G;
  const bool asym = s.scheme == Scheme::Asymmetric;
  const bool packed = s.bits == 4 && pack;
  int8_t* out8 = static_cast<int8_t*>(out);
  parallel_for(0, s.channels, std::max<int64_t>(1, kTile / K), [&](int64_t c0, int64_t c1) {
    std::vector<int8_t> buf(packed ? K : 0);
    std::vector<float> wide(dtype == DType::F32 ? 0 : K);
    for (int64_t c = c0; c < c1; ++c) {
      const float* row;
      if (dtype == DType::F32) {
        row = static_cast<const float*>(x) + c * K;
      } else {
        widen_to_f32(static_cast<const uint16_t*>(x) + c * K, K, dtype == DType::BF16, wide.data(), lvl);
        row = wide.data();
      }
      int8_t* dst = packed ? buf.data() : out8 + c * K;
      for (int64_t g = 0; g < ngroups; ++g) {
        const int64_t b = c * ngroups + g;
        params_from_range(s, minmax(row + g * G, G, lvl), scale + b, zero_point ? zero_point + b : nullptr);
        quantize_run(row + g * G, G, scale[b], asym ? zero_point[b] : 0, q.qmin, q.qmax, dst + g * G, lvl);
      }
      if (packed) pack_nibbles(buf.data(), K, reinterpret_cast<uint8_t*>(out8) + c * K / 2, lvl);
    }
  });
}

std::unique_ptr<float[]> widen_all(const void* x, DType dtype, int64_t n) {
  auto wide = std::unique_ptr<float[]>(new float[static_cast<size_t>(n)]);
  const SimdLevel lvl = simd_level();
  parallel_for(0, n, kTile, [&](int64_t b, int64_t e) {
    widen_to_f32(static_cast<const uint16_t*>(x) + b, e - b, dtype == DType::BF16, wide.get() + b, lvl);
  });
  return wide;
}

void pack_all(const int8_t* q, int64_t n, void* out) {
  const SimdLevel lvl = simd_level();
  const int64_t ntiles = (n + kTile - 1) / kTile;
  parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      pack_nibbles(q + e0, e1 - e0, static_cast<uint8_t*>(out) + e0 / 2, lvl);
    }
  });
}

// Scratch arrays that every element is written to before it is read: no zero fill.
template <typename T>
std::unique_ptr<T[]> scratch(int64_t n) {
  return std::unique_ptr<T[]>(new T[static_cast<size_t>(n)]);
}

QuantSpec canonical(const QuantSpec& s) {
  QuantSpec c = s;
  c.outer = 1;
  c.inner = s.outer * s.inner;
  return c;
}

// [outer, C, inner] -> canonical [C, K]: quantize there (fused), then put the values back.
void quantize_transposed(const QuantSpec& s, const float* x, float* scale, int32_t* zero_point, void* out) {
  const int64_t n = numel(s);
  auto xt = scratch<float>(n);
  transpose_blocks(x, xt.get(), s.outer, s.channels, s.inner);
  auto qt = scratch<int8_t>(n);
  quantize_fused(canonical(s), xt.get(), DType::F32, scale, zero_point, qt.get(), /*pack=*/false);
  if (s.bits == 8) {
    transpose_blocks(qt.get(), static_cast<int8_t*>(out), s.channels, s.outer, s.inner);
    return;
  }
  auto q = scratch<int8_t>(n);
  transpose_blocks(qt.get(), q.get(), s.channels, s.outer, s.inner);
  pack_all(q.get(), n, out);
}

}  // namespace

void quantize_auto(const QuantSpec& s, const void* x, DType dtype, float* scale, int32_t* zero_point,
                   void* out) {
  validate(s);
  AIMASS_CHECK(dtype == DType::F32 || dtype == DType::F16 || dtype == DType::BF16, TypeError,
               "w must be float32, float16 or bfloat16, got ", dtype_name(dtype));
  AIMASS_CHECK(s.scheme == Scheme::Symmetric || zero_point != nullptr, ValueError,
               "asymmetric quantization needs a zero_point output");
  if (fused_ok(s)) return quantize_fused(s, x, dtype, scale, zero_point, out, /*pack=*/true);
  // other layouts read each element twice: half inputs are widened once into an fp32 copy
  std::unique_ptr<float[]> wide;
  const float* xf = static_cast<const float*>(x);
  if (dtype != DType::F32) {
    wide = widen_all(x, dtype, numel(s));
    xf = wide.get();
  }
  if (transpose_ok(s)) return quantize_transposed(s, xf, scale, zero_point, out);
  compute_params(s, xf, scale, zero_point);
  quantize(s, xf, scale, zero_point, out);
}

void quantize_auto(const QuantSpec& s, const float* x, float* scale, int32_t* zero_point, void* out) {
  quantize_auto(s, static_cast<const void*>(x), DType::F32, scale, zero_point, out);
}

namespace {

// Dequantizes the flat elements [0, n) whose values are already unpacked to int8 (or uint8).
void dequantize_unpacked(const QuantSpec& s, const int8_t* q, bool is_unsigned, const float* scale,
                         const int32_t* zero_point, float* out) {
  const SimdLevel lvl = simd_level();
  const int64_t n = numel(s);
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const bool asym = s.scheme == Scheme::Asymmetric;
  parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      for_each_run(s, e0, e1, [&](int64_t st, int64_t len, int64_t b) {
        dequantize_run(q + st, len, is_unsigned, scale[b], asym ? zero_point[b] : 0, out + st, lvl);
      });
    }
  });
}

}  // namespace

void dequantize(const QuantSpec& s, const void* data, const float* scale, const int32_t* zero_point,
                float* out) {
  validate(s);
  const SimdLevel lvl = simd_level();
  const int64_t n = numel(s);
  const int64_t ntiles = (n + kTile - 1) / kTile;
  const bool asym = s.scheme == Scheme::Asymmetric;
  AIMASS_CHECK(!asym || zero_point != nullptr, ValueError, "asymmetric dequantization needs zero_point");
  // 4-bit values are unpacked to int8 (both schemes fit), 8-bit asymmetric is uint8
  const bool is_unsigned = asym && s.bits == 8;
  const int8_t* in8 = static_cast<const int8_t*>(data);
  if (transpose_ok(s)) {
    std::unique_ptr<int8_t[]> q;
    if (s.bits == 4) {
      q = scratch<int8_t>(n);
      parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
          unpack_nibbles(reinterpret_cast<const uint8_t*>(in8) + e0 / 2, e1 - e0, !asym, q.get() + e0, lvl);
        }
      });
      in8 = q.get();
    }
    auto qt = scratch<int8_t>(n);
    transpose_blocks(in8, qt.get(), s.outer, s.channels, s.inner);
    auto ot = scratch<float>(n);
    dequantize_unpacked(canonical(s), qt.get(), is_unsigned, scale, zero_point, ot.get());
    transpose_blocks(ot.get(), out, s.channels, s.outer, s.inner);
    return;
  }
  parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    std::vector<int8_t> buf(s.bits == 4 ? kTile : 0);
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t e0 = t * kTile, e1 = std::min(n, e0 + kTile);
      const int8_t* src = in8 + e0;
      if (s.bits == 4) {
        unpack_nibbles(reinterpret_cast<const uint8_t*>(in8) + e0 / 2, e1 - e0, !asym, buf.data(), lvl);
        src = buf.data();
      }
      for_each_run(s, e0, e1, [&](int64_t st, int64_t len, int64_t b) {
        dequantize_run(src + (st - e0), len, is_unsigned, scale[b], asym ? zero_point[b] : 0, out + st, lvl);
      });
    }
  });
}

}  // namespace quant
}  // namespace aimass
