// AVX-512 comm kernels: 16 lanes, masked loads/stores for the tail.
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "comm/kernels_impl.h"

namespace aimass {
namespace comm {
namespace isa {
namespace {

inline __m512 load16(int kind, const uint16_t* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  if (kind == 0) return _mm512_cvtph_ps(h);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

inline void store16(int kind, uint16_t* p, __m512 v, __mmask16 m) {
  __m256i h;
  if (kind == 0) {
    h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  } else {
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmpgt_epi32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    h = _mm512_cvtepi32_epi16(r);
  }
  _mm256_mask_storeu_epi16(p, m, h);
}

inline __m512 apply(int op, __m512 a, __m512 b) {
  if (op == 0) return _mm512_add_ps(a, b);
  if (op == 1) return _mm512_min_ps(a, b);
  return _mm512_max_ps(a, b);
}

inline __mmask16 tail_mask(size_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

}  // namespace

void half_to_f32_avx512(int kind, const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    _mm512_mask_storeu_ps(out + i, m, load16(kind, in + i, m));
  }
}

void f32_to_half_avx512(int kind, const float* in, uint16_t* out, size_t n, float scale) {
  const __m512 s = _mm512_set1_ps(scale);
  const bool do_scale = scale != 1.0f;
  for (size_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    __m512 v = _mm512_maskz_loadu_ps(m, in + i);
    if (do_scale) v = _mm512_mul_ps(v, s);
    store16(kind, out + i, v, m);
  }
}

void reduce_half_avx512(int kind, int op, const uint16_t* in, uint16_t* inout, size_t n) {
  for (size_t i = 0; i < n; i += 16) {
    __mmask16 m = tail_mask(n - i);
    store16(kind, inout + i, apply(op, load16(kind, in + i, m), load16(kind, inout + i, m)), m);
  }
}

void reduce_f32_avx512(int op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale) {
  const bool scaled = scale != 1.0f;
  const __m512 s = _mm512_set1_ps(scale);
  auto masked = [&](size_t i, __mmask16 m) {
    __m512 acc = _mm512_maskz_loadu_ps(m, srcs[0] + i);
    for (int j = 1; j < k; ++j) acc = apply(op, _mm512_maskz_loadu_ps(m, srcs[j] + i), acc);
    if (scaled) acc = _mm512_mul_ps(acc, s);
    _mm512_mask_storeu_ps(dst + i, m, acc);
    if (dst2) _mm512_mask_storeu_ps(dst2 + i, m, acc);
  };
  size_t i = 0;
  // A dst that starts inside a 64-byte line: the elements up to the next line first, so the full-width
  // stores below (and the loads of sources at the same offset in their lines, as numpy's arrays, 16 bytes
  // into a page, usually are) never straddle two lines. Each element's arithmetic is the same either way.
  const size_t mis = reinterpret_cast<uintptr_t>(dst) & 63;
  if (mis != 0 && mis % 4 == 0 && n > 16) {
    i = (64 - mis) / 4;
    masked(0, static_cast<__mmask16>((1u << i) - 1));
  }
  if (k == 2 && !scaled) {  // the common case (two ranks per node), unrolled: memory-bound, keep loads in flight
    const float* a = srcs[0];
    const float* b = srcs[1];
    for (; i + 64 <= n; i += 64) {
      __m512 r0 = apply(op, _mm512_loadu_ps(b + i), _mm512_loadu_ps(a + i));
      __m512 r1 = apply(op, _mm512_loadu_ps(b + i + 16), _mm512_loadu_ps(a + i + 16));
      __m512 r2 = apply(op, _mm512_loadu_ps(b + i + 32), _mm512_loadu_ps(a + i + 32));
      __m512 r3 = apply(op, _mm512_loadu_ps(b + i + 48), _mm512_loadu_ps(a + i + 48));
      _mm512_storeu_ps(dst + i, r0);
      _mm512_storeu_ps(dst + i + 16, r1);
      _mm512_storeu_ps(dst + i + 32, r2);
      _mm512_storeu_ps(dst + i + 48, r3);
      if (dst2) {
        _mm512_storeu_ps(dst2 + i, r0);
        _mm512_storeu_ps(dst2 + i + 16, r1);
        _mm512_storeu_ps(dst2 + i + 32, r2);
        _mm512_storeu_ps(dst2 + i + 48, r3);
      }
    }
  }
  for (; i < n; i += 16) masked(i, tail_mask(n - i));
}

// 16-bit floats over k sources (see comm_kernels.h): widen, op(running, source) in fp32, round once; an
// average rounds the sum, widens, scales and rounds again. The head runs up to dst's next line.
void reduce_half_sources_avx512(int kind, int op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                                uint16_t* dst2, float scale) {
  const bool scaled = scale != 1.0f;
  const __m512 s = _mm512_set1_ps(scale);
  auto block = [&](size_t i, __mmask16 m) {
    __m512 acc = load16(kind, srcs[0] + i, m);
    for (int j = 1; j < k; ++j) acc = apply(op, acc, load16(kind, srcs[j] + i, m));
    if (scaled) {  // the sum's own rounding first, as the separate pass had it
      store16(kind, dst + i, acc, m);
      acc = _mm512_mul_ps(load16(kind, dst + i, m), s);
    }
    store16(kind, dst + i, acc, m);
    if (dst2) store16(kind, dst2 + i, acc, m);
  };
  size_t i = 0;
  const size_t mis = reinterpret_cast<uintptr_t>(dst) & 63;
  if (mis != 0 && mis % 2 == 0 && n > 32) {
    const size_t h = (64 - mis) / 2;  // up to 31 elements: two masked blocks
    for (; i < h; i += 16) block(i, tail_mask(h - i));
    i = h;
  }
  for (; i < n; i += 16) block(i, tail_mask(n - i));
}

// fp64, as reduce_f32_avx512 (the head up to dst's next line, whole-line stores, masked tail). The operand
// order is the scalar loops': acc + v, v < acc ? v : acc (vminpd(v, acc)), and the average divides.
void reduce_f64_avx512(int op, const double* const* srcs, int k, double* dst, size_t n, double* dst2,
                       double divisor) {
  const bool divided = divisor != 1.0;
  const __m512d dv = _mm512_set1_pd(divisor);
  auto apply_pd = [op](__m512d v, __m512d acc) {
    return op == 0 ? _mm512_add_pd(acc, v) : op == 1 ? _mm512_min_pd(v, acc) : _mm512_max_pd(v, acc);
  };
  auto masked = [&](size_t i, __mmask8 m) {
    __m512d acc = _mm512_maskz_loadu_pd(m, srcs[0] + i);
    for (int j = 1; j < k; ++j) acc = apply_pd(_mm512_maskz_loadu_pd(m, srcs[j] + i), acc);
    if (divided) acc = _mm512_div_pd(acc, dv);
    _mm512_mask_storeu_pd(dst + i, m, acc);
    if (dst2) _mm512_mask_storeu_pd(dst2 + i, m, acc);
  };
  size_t i = 0;
  const size_t mis = reinterpret_cast<uintptr_t>(dst) & 63;
  if (mis != 0 && mis % 8 == 0 && n > 8) {
    i = (64 - mis) / 8;
    masked(0, static_cast<__mmask8>((1u << i) - 1));
  }
  if (k == 2 && !divided) {  // two ranks per node: memory-bound, keep loads in flight
    const double* a = srcs[0];
    const double* b = srcs[1];
    for (; i + 32 <= n; i += 32) {
      __m512d r0 = apply_pd(_mm512_loadu_pd(b + i), _mm512_loadu_pd(a + i));
      __m512d r1 = apply_pd(_mm512_loadu_pd(b + i + 8), _mm512_loadu_pd(a + i + 8));
      __m512d r2 = apply_pd(_mm512_loadu_pd(b + i + 16), _mm512_loadu_pd(a + i + 16));
      __m512d r3 = apply_pd(_mm512_loadu_pd(b + i + 24), _mm512_loadu_pd(a + i + 24));
      _mm512_storeu_pd(dst + i, r0);
      _mm512_storeu_pd(dst + i + 8, r1);
      _mm512_storeu_pd(dst + i + 16, r2);
      _mm512_storeu_pd(dst + i + 24, r3);
      if (dst2) {
        _mm512_storeu_pd(dst2 + i, r0);
        _mm512_storeu_pd(dst2 + i + 8, r1);
        _mm512_storeu_pd(dst2 + i + 16, r2);
        _mm512_storeu_pd(dst2 + i + 24, r3);
      }
    }
  }
  for (; i < n; i += 8) masked(i, n - i >= 8 ? static_cast<__mmask8>(0xff) : static_cast<__mmask8>((1u << (n - i)) - 1));
}

// dst[i, n) = src[i, n) in blocks of 4 vectors, unaligned loads, streaming (dst + i on a 64-byte line) or
// plain stores; returns where the blocks end (the caller copies the tail). In an unnamed namespace: a
// template with external linkage compiled with this file's ISA flags could be the one another file links.
namespace {
template <bool kStream>
size_t copy_blocks_avx512(char* d, const char* s, size_t i, size_t n) {
  for (; i + 256 <= n; i += 256) {
    const __m512i a = _mm512_loadu_si512(s + i), b = _mm512_loadu_si512(s + i + 64);
    const __m512i c = _mm512_loadu_si512(s + i + 128), e = _mm512_loadu_si512(s + i + 192);
    if (kStream) {
      auto* w = reinterpret_cast<__m512i*>(d + i);
      _mm512_stream_si512(w, a);
      _mm512_stream_si512(w + 1, b);
      _mm512_stream_si512(w + 2, c);
      _mm512_stream_si512(w + 3, e);
    } else {
      _mm512_storeu_si512(d + i, a);
      _mm512_storeu_si512(d + i + 64, b);
      _mm512_storeu_si512(d + i + 128, c);
      _mm512_storeu_si512(d + i + 192, e);
    }
  }
  return i;
}
}  // namespace

// Unaligned head with memcpy up to dst's next 64-byte boundary, then 4 vectors a step with streaming
// stores (they need an aligned destination), the tail with memcpy; the sfence orders the streaming
// stores before whatever the caller publishes next.
void copy_streaming_avx512(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  // (no std::min: an inline template compiled with this file's ISA flags could be the one linked)
  const size_t lead = static_cast<size_t>((0 - reinterpret_cast<uintptr_t>(d)) & 63);
  const size_t head = lead < n ? lead : n;
  std::memcpy(d, s, head);
  const size_t i = copy_blocks_avx512<true>(d, s, head, n);
  std::memcpy(d + i, s + i, n - i);
  _mm_sfence();
}

// 4 vectors a step, unaligned loads and stores (copy_bytes takes it where rep movsb is slow); the tail
// with memcpy (under 256 bytes: not rep movsb)
void copy_vectors_avx512(void* dst, const void* src, size_t n) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
  const size_t i = copy_blocks_avx512<false>(d, s, 0, n);
  std::memcpy(d + i, s + i, n - i);
}

}  // namespace isa
}  // namespace comm
}  // namespace aimass
