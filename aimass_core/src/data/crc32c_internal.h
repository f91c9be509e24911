// Shared between the scalar and SSE4.2 CRC32C translation units.
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass {
namespace data {
// Bytes per lane of the 3-lane interleaved SSE4.2 loop.
constexpr int kCrcLaneBytes = 256;
// [4][256] table: the raw CRC register after kCrcLaneBytes zero bytes, by input byte.
const uint32_t* crc32c_shift_table();
// Also declared in aimass/data.h; repeated here so the SSE4.2 TU includes no std:: containers.
uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc);
}  // namespace data
}  // namespace aimass
