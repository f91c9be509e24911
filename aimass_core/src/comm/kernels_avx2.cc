// AVX2 + F16C comm kernels. Tails go through a padded stack block so no scalar
// helper from a shared header is compiled with these flags (ODR safety).
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "comm/kernels_impl.h"

namespace aimass {
namespace comm {
namespace isa {
namespace {

inline __m256 load8(int kind, const uint16_t* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  if (kind == 0) return _mm256_cvtph_ps(h);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline __m128i round8(int kind, __m256 v) {
  if (kind == 0) return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256i u = _mm256_castps_si256(v);
  // round to nearest even; NaN keeps its top bits and is made quiet
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  __m256i nan_bits = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  __m256i is_nan = _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)),
                                      _mm256_set1_epi32(0x7f800000));
  r = _mm256_blendv_epi8(r, nan_bits, is_nan);
  __m256i packed = _mm256_packus_epi32(r, r);  // per 128-bit lane: r0..3 r0..3 | r4..7 r4..7
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(packed, 0x08));
}

inline __m256 apply(int op, __m256 a, __m256 b) {
  if (op == 0) return _mm256_add_ps(a, b);
  if (op == 1) return _mm256_min_ps(a, b);
  return _mm256_max_ps(a, b);
}

}  // namespace

void half_to_f32_avx2(int kind, const uint16_t* in, float* out, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, load8(kind, in + i));
  if (i < n) {
    uint16_t tin[8] = {0};
    float tout[8];
    std::memcpy(tin, in + i, (n - i) * 2);
    _mm256_storeu_ps(tout, load8(kind, tin));
    std::memcpy(out + i, tout, (n - i) * 4);
  }
}

void f32_to_half_avx2(int kind, const float* in, uint16_t* out, size_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  const bool do_scale = scale != 1.0f;
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 v = _mm256_loadu_ps(in + i);
    if (do_scale) v = _mm256_mul_ps(v, s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out + i), round8(kind, v));
  }
  if (i < n) {
    float tin[8] = {0};
    uint16_t tout[8];
    std::memcpy(tin, in + i, (n - i) * 4);
    __m256 v = _mm256_loadu_ps(tin);
    if (do_scale) v = _mm256_mul_ps(v, s);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(tout), round8(kind, v));
    std::memcpy(out + i, tout, (n - i) * 2);
  }
}

void reduce_half_avx2(int kind, int op, const uint16_t* in, uint16_t* inout, size_t n) {
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 r = apply(op, load8(kind, in + i), load8(kind, inout + i));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(inout + i), round8(kind, r));
  }
  if (i < n) {
    uint16_t a[8] = {0}, b[8] = {0};
    std::memcpy(a, in + i, (n - i) * 2);
    std::memcpy(b, inout + i, (n - i) * 2);
    __m256 r = apply(op, load8(kind, a), load8(kind, b));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(b), round8(kind, r));
    std::memcpy(inout + i, b, (n - i) * 2);
  }
}

void reduce_f32_avx2(int op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale) {
  const bool scaled = scale != 1.0f;
  const __m256 s = _mm256_set1_ps(scale);
  auto one = [&](size_t i) {  // plain scalar: no shared inline helpers in this TU
    float acc = srcs[0][i];
    for (int j = 1; j < k; ++j) {
      const float v = srcs[j][i];
      acc = op == 0 ? v + acc : op == 1 ? (v < acc ? v : acc) : (v > acc ? v : acc);
    }
    if (scaled) acc *= scale;
    dst[i] = acc;
    if (dst2) dst2[i] = acc;
  };
  size_t i = 0;
  // A dst that starts inside a 32-byte half line: the elements up to the next one first, so no vector store
  // below straddles two lines (nor a load of a source at the same offset). The same arithmetic per element.
  const size_t mis = reinterpret_cast<uintptr_t>(dst) & 31;
  if (mis != 0 && mis % 4 == 0 && n > 8)
    for (; i < (32 - mis) / 4; ++i) one(i);
  for (; i + 8 <= n; i += 8) {
    __m256 acc = _mm256_loadu_ps(srcs[0] + i);
    for (int j = 1; j < k; ++j) acc = apply(op, _mm256_loadu_ps(srcs[j] + i), acc);
    if (scaled) acc = _mm256_mul_ps(acc, s);
    _mm256_storeu_ps(dst + i, acc);
    if (dst2) _mm256_storeu_ps(dst2 + i, acc);
  }
  for (; i < n; ++i) one(i);
}

// 16-bit floats over k sources, as reduce_half_sources_avx512 (8 lanes; the tail through padded blocks).
void reduce_half_sources_avx2(int kind, int op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                              uint16_t* dst2, float scale) {
  const bool scaled = scale != 1.0f;
  const __m256 s = _mm256_set1_ps(scale);
  auto block = [&](const uint16_t* const* src, size_t i, uint16_t* out) {  // 8 elements at src[j] + i
    __m256 acc = load8(kind, src[0] + i);
    for (int j = 1; j < k; ++j) acc = apply(op, acc, load8(kind, src[j] + i));
    __m128i h = round8(kind, acc);
    if (scaled) {
      alignas(16) uint16_t t[8];
      _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
      h = round8(kind, _mm256_mul_ps(load8(kind, t), s));
    }
    _mm_storeu_si128(reinterpret_cast<__m128i*>(out), h);
  };
  size_t i = 0;
  for (; i + 8 <= n; i += 8) {
    block(srcs, i, dst + i);
    if (dst2) std::memcpy(dst2 + i, dst + i, 16);
  }
  if (i < n && k > 16) {  // (more sources than the padded blocks hold: the reference, same bits)
    ref_reduce_half_sources(kind, op, srcs, k, i, n, dst, dst2, scale);
  } else if (i < n) {
    uint16_t pad[16][8] = {};
    const uint16_t* ps[16];
    for (int j = 0; j < k; ++j) {
      std::memcpy(pad[j], srcs[j] + i, (n - i) * 2);
      ps[j] = pad[j];
    }
    uint16_t out[8];
    block(ps, 0, out);
    std::memcpy(dst + i, out, (n - i) * 2);
    if (dst2) std::memcpy(dst2 + i, out, (n - i) * 2);
  }
}

// fp64, as reduce_f32_avx2 (head up to dst's next half line, then 4 lanes); the scalar loops' operand order.
void reduce_f64_avx2(int op, const double* const* srcs, int k, double* dst, size_t n, double* dst2, double divisor) {
  const bool divided = divisor != 1.0;
  const __m256d dv = _mm256_set1_pd(divisor);
  auto one = [&](size_t i) {
    double acc = srcs[0][i];
    for (int j = 1; j < k; ++j) {
      const double v = srcs[j][i];
      acc = op == 0 ? acc + v : op == 1 ? (v < acc ? v : acc) : (v > acc ? v : acc);
    }
    if (divided) acc /= divisor;
    dst[i] = acc;
    if (dst2) dst2[i] = acc;
  };
  size_t i = 0;
  const size_t mis = reinterpret_cast<uintptr_t>(dst) & 31;
  if (mis != 0 && mis % 8 == 0 && n > 4)
    for (; i < (32 - mis) / 8; ++i) one(i);
  for (; i + 4 <= n; i += 4) {
    __m256d acc = _mm256_loadu_pd(srcs[0] + i);
    for (int j = 1; j < k; ++j) {
      const __m256d v = _mm256_loadu_pd(srcs[j] + i);
      acc = op == 0 ? _mm256_add_pd(acc, v) : op == 1 ? _mm256_min_pd(v, acc) : _mm256_max_pd(v, acc);
    }
    if (divided) acc = _mm256_div_pd(acc, dv);
    _mm256_storeu_pd(dst + i, acc);
    if (dst2) _mm256_storeu_pd(dst2 + i, acc);
  }
  for (; i < n; ++i) one(i);
}

// dst[i, n) = src[i, n) in blocks of 4 vectors, unaligned loads, streaming (dst + i on a 32-byte line) or
// plain stores; returns where the blocks end (the caller copies the tail). In an unnamed namespace: a
// template with external linkage compiled with this file's ISA flags could be the one another file links.
namespace {
template <bool kStream>
size_t copy_blocks_avx2(char* d, const char* s, size_t i, size_t n) {
  for (; i + 128 <= n; i += 128) {
    const auto* v = reinterpret_cast<const __m256i*>(s + i);
    auto* w = reinterpret_cast<__m256i*>(d + i);
    const __m256i a = _mm256_loadu_si256(v), b = _mm256_loadu_si256(v + 1);
    const __m256i c = _mm256_loadu_si256(v + 2), e = _mm256_loadu_si256(v + 3);
    if (kStream) {
      _mm256_stream_si256(w, a);
      _mm256_stream_si256(w + 1, b);
      _mm256_stream_si256(w + 2, c);
      _mm256_stream_si256(w + 3, e);
    } else {
      _mm256_storeu_si256(w, a);
      _mm256_storeu_si256(w + 1, b);
      _mm256_storeu_si256(w + 2, c);
      _mm256_storeu_si256(w + 3, e);
    }
  }
  return i;
}
}  // namespace

// Unaligned head with memcpy up to dst's next 32-byte boundary, then 4 vectors a step with streaming
// stores (they need an aligned destination), the tail with memcpy; the sfence orders the streaming
// stores before whatever the caller publishes next.
void copy_streaming_avx2(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  // (no std::min: an inline template compiled with this file's ISA flags could be the one linked)
  const size_t lead = static_cast<size_t>((0 - reinterpret_cast<uintptr_t>(d)) & 31);
  const size_t head = lead < n ? lead : n;
  std::memcpy(d, s, head);
  const size_t i = copy_blocks_avx2<true>(d, s, head, n);
  std::memcpy(d + i, s + i, n - i);
  _mm_sfence();
}

// 4 vectors a step, unaligned loads and stores (copy_bytes takes it where rep movsb is slow); the tail
// with memcpy (under 128 bytes: not rep movsb)
void copy_vectors_avx2(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t i = copy_blocks_avx2<false>(d, s, 0, n);
  std::memcpy(d + i, s + i, n - i);
}

}  // namespace isa
}  // namespace comm
}  // namespace aimass
