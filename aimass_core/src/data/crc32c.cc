// CRC32C: the table-driven scalar reference and the run-time dispatcher.
#include "aimass/cpu_features.h"
#include "aimass/data.h"
#include "data/crc32c_internal.h"

namespace aimass {
namespace data {
namespace {

struct Crc32cTable {
  uint32_t t[8][256];
  Crc32cTable() {
    for (uint32_t i = 0; i < 256; ++i) {
      uint32_t c = i;
      for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ 0x82f63b78u : (c >> 1);
      t[0][i] = c;
    }
    for (int s = 1; s < 8; ++s)
      for (uint32_t i = 0; i < 256; ++i) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xff];
  }
};
const Crc32cTable& table() {
  static const Crc32cTable tab;
  return tab;
}

struct ShiftTable {
  uint32_t t[4][256];
  ShiftTable() {
    const auto& T = table().t;
    for (int k = 0; k < 4; ++k)
      for (uint32_t v = 0; v < 256; ++v) {
        uint32_t c = v << (8 * k);
        for (int i = 0; i < kCrcLaneBytes; ++i) c = (c >> 8) ^ T[0][c & 0xff];
        t[k][v] = c;
      }
  }
};

}  // namespace

const uint32_t* crc32c_shift_table() {
  static const ShiftTable s;
  return &s.t[0][0];
}

uint32_t crc32c_scalar(const void* data, size_t n, uint32_t crc) {
  const auto& T = table().t;
  const uint8_t* p = static_cast<const uint8_t*>(data);
  uint32_t c = ~crc;
  // slicing-by-8: eight table lookups per 8 input bytes
  while (n >= 8) {
    uint32_t lo = c ^ (uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24);
    c = T[7][lo & 0xff] ^ T[6][(lo >> 8) & 0xff] ^ T[5][(lo >> 16) & 0xff] ^ T[4][lo >> 24] ^
        T[3][p[4]] ^ T[2][p[5]] ^ T[1][p[6]] ^ T[0][p[7]];
    p += 8;
    n -= 8;
  }
  while (n--) c = (c >> 8) ^ T[0][(c ^ *p++) & 0xff];
  return ~c;
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  static const bool sse42 = (crc32c_shift_table(), cpu_features().sse42);  // builds the table once
  if (sse42 && simd_level() != SimdLevel::Scalar) return crc32c_sse42(data, n, crc);
  return crc32c_scalar(data, n, crc);
}

}  // namespace data
}  // namespace aimass
