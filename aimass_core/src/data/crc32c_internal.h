// Shared between the scalar, SSE4.2 and AVX-512 CRC32C translation units.
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass {
namespace data {
// Bytes per lane of the 3-lane interleaved SSE4.2 loop.
constexpr int kCrcLaneBytes = 256;
// [4][256] table: the raw CRC register after kCrcLaneBytes zero bytes, by input byte.
const uint32_t* crc32c_shift_table();
// Folding constants of the carry-less multiply path, pairs {x^(8D+32), x^(8D-32)} mod P
// (bit-reflected, shifted left by one) for D = 256, 64, 48, 32, 16 bytes: 10 values.
const uint64_t* crc32c_fold_constants();
// Whether the CPU has VPCLMULQDQ next to the AVX-512 level (checked once).
bool crc32c_avx512_supported();
// Also declared in aimass/data.h; repeated here so the SIMD TUs include no std:: containers.
uint32_t crc32c_sse42(const void* data, size_t n, uint32_t crc);
uint32_t crc32c_copy_sse42(void* dst, const void* src, size_t n, uint32_t crc);
uint32_t crc32c_avx512(const void* data, size_t n, uint32_t crc, const void* prefetch);
uint32_t crc32c_copy_avx512(void* dst, const void* src, size_t n, uint32_t crc, const void* prefetch);
}  // namespace data
}  // namespace aimass
