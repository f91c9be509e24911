// CRC32C with the SSE4.2 crc32 instruction, 8 bytes per step. Compiled with
// -msse4.2; called only when cpu_features().sse42 (see crc32c.cc).
#include <nmmintrin.h>

#include <cstring>

#include "aimass/data.h"

namespace aimass {
namespace data {

uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc) {
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint64_t c = ~crc;
  while (n >= 8) {
    uint64_t v;
    std::memcpy(&v, p, 8);
    c = _mm_crc32_u64(c, v);
    p += 8;
    n -= 8;
  }
  uint32_t c32 = static_cast<uint32_t>(c);
  while (n--) c32 = _mm_crc32_u8(c32, *p++);
  return ~c32;
}

}  // namespace data
}  // namespace aimass
