// CRC32C by carry-less multiplication folding (VPCLMULQDQ on 512-bit registers),
// optionally fused with a copy of the bytes (the loader checks a record while it
// copies it into the batch, so the record is read once). Compiled with the AVX-512
// flags; the functions also need VPCLMULQDQ/PCLMUL and are called only when
// crc32c_avx512_supported() (see crc32c.cc).
//
// Folding (Intel, "Fast CRC Computation Using PCLMULQDQ", reflected form): a 128-bit
// block L:H (L = its first 8 bytes) moved D bytes forward equals
// clmul(L, x^(8D+32) mod P) ^ clmul(H, x^(8D-32) mod P) in the CRC's field. Four
// 512-bit accumulators fold 256 bytes per step; they are folded into one 128-bit
// block X, and since the raw CRC register of a message equals the register of X
// alone started from 0, two crc32 instructions finish it (no Barrett reduction).
#include <immintrin.h>

#include <cstring>

// GCC 12's intrinsics headers initialise their "undefined" operands from themselves.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "data/crc32c_internal.h"

namespace aimass {
namespace data {

#define AIMASS_CRC_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,vpclmulqdq,pclmul,sse4.2")))

namespace {

AIMASS_CRC_TARGET inline __m128i pair(const uint64_t* k) {
  return _mm_set_epi64x(static_cast<long long>(k[1]), static_cast<long long>(k[0]));
}
// Lanes a, b, c, d (lane 0 first) of {first-half, second-half} constant pairs.
AIMASS_CRC_TARGET inline __m512i pairs(const uint64_t* a, const uint64_t* b, const uint64_t* c, const uint64_t* d) {
  auto ll = [](uint64_t v) { return static_cast<long long>(v); };
  return _mm512_set_epi64(ll(d[1]), ll(d[0]), ll(c[1]), ll(c[0]), ll(b[1]), ll(b[0]), ll(a[1]), ll(a[0]));
}
#define AIMASS_LANE(x, i) _mm512_extracti32x4_epi32((x), (i))

// x * k folded forward, xor d: one vpclmulqdq per 64-bit half, one 3-way xor.
AIMASS_CRC_TARGET inline __m512i fold(__m512i x, __m512i k, __m512i d) {
  return _mm512_ternarylogic_epi64(_mm512_clmulepi64_epi128(x, k, 0x00), _mm512_clmulepi64_epi128(x, k, 0x11), d,
                                   0x96);
}

AIMASS_CRC_TARGET inline void prefetch_lines(const uint8_t* p, size_t n) {
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    _mm_prefetch(reinterpret_cast<const char*>(a), _MM_HINT_T0);
}

// pf (may be null): n bytes to prefetch, a few lines per 256-byte step, so that the
// requests for the next record spread over this one's work instead of queueing up at once.
template <bool kCopy>
AIMASS_CRC_TARGET inline uint32_t crc_fold(uint8_t* dst, const uint8_t* p, size_t n, uint32_t crc,
                                           const uint8_t* pf) {
  uint64_t c = static_cast<uint32_t>(~crc);
  if (pf && n < 256) prefetch_lines(pf, n);
  if (n >= 256) {
    if (pf) {
      prefetch_lines(pf, 256);
      pf += 256;
    }
    const uint64_t* k = crc32c_fold_constants();
    const __m512i k256 = pairs(k, k, k, k);
    const __m512i k64 = pairs(k + 2, k + 2, k + 2, k + 2);
    const __m128i k16 = pair(k + 8);
    // lanes 0, 1, 2 of the last 64 bytes move 48, 32, 16 bytes forward onto lane 3
    const uint64_t zero[2] = {0, 0};
    const __m512i kred = pairs(k + 4, k + 6, k + 8, zero);
    __m512i x0 = _mm512_loadu_si512(p), x1 = _mm512_loadu_si512(p + 64), x2 = _mm512_loadu_si512(p + 128),
            x3 = _mm512_loadu_si512(p + 192);
    if (kCopy) {
      _mm512_storeu_si512(dst, x0);
      _mm512_storeu_si512(dst + 64, x1);
      _mm512_storeu_si512(dst + 128, x2);
      _mm512_storeu_si512(dst + 192, x3);
      dst += 256;
    }
    // the initial register is xored into the first 4 message bytes
    x0 = _mm512_xor_si512(x0, _mm512_zextsi128_si512(_mm_cvtsi32_si128(static_cast<int>(c))));
    p += 256;
    n -= 256;
    while (n >= 256) {
      if (pf) {
        prefetch_lines(pf, 256);
        pf += 256;
      }
      const __m512i d0 = _mm512_loadu_si512(p), d1 = _mm512_loadu_si512(p + 64), d2 = _mm512_loadu_si512(p + 128),
                    d3 = _mm512_loadu_si512(p + 192);
      if (kCopy) {
        _mm512_storeu_si512(dst, d0);
        _mm512_storeu_si512(dst + 64, d1);
        _mm512_storeu_si512(dst + 128, d2);
        _mm512_storeu_si512(dst + 192, d3);
        dst += 256;
      }
      x0 = fold(x0, k256, d0);
      x1 = fold(x1, k256, d1);
      x2 = fold(x2, k256, d2);
      x3 = fold(x3, k256, d3);
      p += 256;
      n -= 256;
    }
    if (pf) prefetch_lines(pf, n);  // the last partial step
    x0 = fold(x0, k64, x1);
    x0 = fold(x0, k64, x2);
    x0 = fold(x0, k64, x3);
    while (n >= 64) {
      const __m512i d = _mm512_loadu_si512(p);
      if (kCopy) {
        _mm512_storeu_si512(dst, d);
        dst += 64;
      }
      x0 = fold(x0, k64, d);
      p += 64;
      n -= 64;
    }
    const __m512i t = _mm512_xor_si512(_mm512_clmulepi64_epi128(x0, kred, 0x00), _mm512_clmulepi64_epi128(x0, kred, 0x11));
    __m128i r = _mm_ternarylogic_epi64(AIMASS_LANE(x0, 3), _mm512_castsi512_si128(t), AIMASS_LANE(t, 1), 0x96);
    r = _mm_xor_si128(r, AIMASS_LANE(t, 2));
    while (n >= 16) {
      const __m128i d = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
      if (kCopy) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), d);
        dst += 16;
      }
      r = _mm_ternarylogic_epi64(_mm_clmulepi64_si128(r, k16, 0x00), _mm_clmulepi64_si128(r, k16, 0x11), d, 0x96);
      p += 16;
      n -= 16;
    }
    c = _mm_crc32_u64(0, static_cast<uint64_t>(_mm_cvtsi128_si64(r)));
    c = _mm_crc32_u64(c, static_cast<uint64_t>(_mm_extract_epi64(r, 1)));
  }
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    if (kCopy) {
      std::memcpy(dst, &v, 8);
      dst += 8;
    }
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) {
    if (kCopy) *dst++ = *p;
    c32 = _mm_crc32_u8(c32, *p++);
  }
  return ~c32;
}

}  // namespace

AIMASS_CRC_TARGET uint32_t crc32c_avx512(const void* data, size_t n, uint32_t crc, const void* prefetch) {
  return crc_fold<false>(nullptr, static_cast<const uint8_t*>(data), n, crc, static_cast<const uint8_t*>(prefetch));
}

AIMASS_CRC_TARGET uint32_t crc32c_copy_avx512(void* dst, const void* src, size_t n, uint32_t crc,
                                              const void* prefetch) {
  return crc_fold<true>(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n, crc,
                        static_cast<const uint8_t*>(prefetch));
}

}  // namespace data
}  // namespace aimass
