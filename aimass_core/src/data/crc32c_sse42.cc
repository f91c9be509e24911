// CRC32C with the SSE4.2 crc32 instruction, 8 bytes per step. Compiled with
// -msse4.2; called only when cpu_features().sse42 (see crc32c.cc).
#include <nmmintrin.h>

#include <cstring>

#include "data/crc32c_internal.h"

namespace aimass {
namespace data {

namespace {
// The raw register after kCrcLaneBytes more zero bytes (CRC is linear in its state).
inline uint64_t shift(const uint32_t* t, uint64_t c) {
  return t[c & 0xff] ^ t[256 + ((c >> 8) & 0xff)] ^ t[512 + ((c >> 16) & 0xff)] ^ t[768 + ((c >> 24) & 0xff)];
}
}  // namespace

namespace {
// kCopy: also store every 8 bytes to dst as they are checksummed (one pass over the data).
template <bool kCopy>
inline uint32_t crc_lanes(uint8_t* dst, const uint8_t* p, size_t n, uint32_t crc) {
  uint64_t c = static_cast<uint32_t>(~crc);
  // Three independent lanes hide the crc32 instruction's 3-cycle latency; the lane
  // results are joined by shifting over the following lanes' length.
  constexpr size_t L = kCrcLaneBytes;
  if (n >= 3 * L) {
    const uint32_t* t = crc32c_shift_table();
    while (n >= 3 * L) {
      uint64_t c1 = 0, c2 = 0;
      for (size_t i = 0; i < L; i += 8) {
        uint64_t v0, v1, v2;
        std::memcpy(&v0, p + i, 8);
        std::memcpy(&v1, p + L + i, 8);
        std::memcpy(&v2, p + 2 * L + i, 8);
        if (kCopy) {
          std::memcpy(dst + i, &v0, 8);
          std::memcpy(dst + L + i, &v1, 8);
          std::memcpy(dst + 2 * L + i, &v2, 8);
        }
        c = _mm_crc32_u64(c, v0);
        c1 = _mm_crc32_u64(c1, v1);
        c2 = _mm_crc32_u64(c2, v2);
      }
      c = shift(t, c) ^ c1;
      c = shift(t, c) ^ c2;
      p += 3 * L;
      if (kCopy) dst += 3 * L;
      n -= 3 * L;
    }
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

uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc) {
  return crc_lanes<false>(nullptr, static_cast<const uint8_t*>(data), n, crc);
}

uint32_t crc32c_copy_sse42(void* dst, const void* src, size_t n, uint32_t crc) {
  return crc_lanes<true>(static_cast<uint8_t*>(dst), static_cast<const uint8_t*>(src), n, crc);
}

}  // namespace data
}  // namespace aimass
