// CRC32C: the table-driven scalar reference and the run-time dispatcher.
#include <cstring>

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

// x^n mod P, bit-reflected (bit 31 is x^0): multiplying by x is a right shift.
uint32_t xpow_mod(uint32_t n) {
  uint32_t v = 0x80000000u;
  while (n--) v = (v & 1) ? (v >> 1) ^ 0x82f63b78u : v >> 1;
  return v;
}

struct FoldConstants {
  uint64_t k[10];
  FoldConstants() {
    const uint32_t dist[5] = {256, 64, 48, 32, 16};
    for (int i = 0; i < 5; ++i) {
      k[2 * i] = static_cast<uint64_t>(xpow_mod(8 * dist[i] + 32)) << 1;      // times a block's first 8 bytes
      k[2 * i + 1] = static_cast<uint64_t>(xpow_mod(8 * dist[i] - 32)) << 1;  // times its last 8 bytes
    }
  }
};

enum class CrcImpl { Scalar, Sse42, Avx512 };
CrcImpl pick() {
  static const bool sse42 = (crc32c_shift_table(), crc32c_fold_constants(), cpu_features().sse42);  // tables once
  SimdLevel level = simd_level();
  if (level == SimdLevel::AVX512 && crc32c_avx512_supported()) return CrcImpl::Avx512;
  if (sse42 && level != SimdLevel::Scalar) return CrcImpl::Sse42;
  return CrcImpl::Scalar;
}

}  // namespace

const uint64_t* crc32c_fold_constants() {
  static const FoldConstants c;
  return c.k;
}

bool crc32c_avx512_supported() {
#if defined(__x86_64__)
  static const bool ok = [] {
    __builtin_cpu_init();
    const CpuFeatures& f = cpu_features();
    return f.sse42 && f.avx512f && f.avx512bw && f.avx512vl && __builtin_cpu_supports("vpclmulqdq") &&
           __builtin_cpu_supports("pclmul");
  }();
  return ok;
#else
  return false;
#endif
}

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

namespace {
void prefetch_all(const void* p, size_t n) {  // for the loops with no step to spread requests over
  const uintptr_t end = reinterpret_cast<uintptr_t>(p) + n;
  for (uintptr_t a = reinterpret_cast<uintptr_t>(p) & ~uintptr_t(63); a < end; a += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(a));
}
}  // namespace

uint32_t crc32c(const void* data, size_t n, uint32_t crc, const void* prefetch) {
  CrcImpl impl = pick();
  if (impl == CrcImpl::Avx512) return crc32c_avx512(data, n, crc, prefetch);
  if (prefetch) prefetch_all(prefetch, n);
  return impl == CrcImpl::Sse42 ? crc32c_sse42(data, n, crc) : crc32c_scalar(data, n, crc);
}

uint32_t crc32c(const void* data, size_t n, uint32_t crc) {
  switch (pick()) {
    case CrcImpl::Avx512: return crc32c_avx512(data, n, crc, nullptr);
    case CrcImpl::Sse42: return crc32c_sse42(data, n, crc);
    default: return crc32c_scalar(data, n, crc);
  }
}

uint32_t crc32c_copy(void* dst, const void* src, size_t n, uint32_t crc, const void* prefetch) {
  CrcImpl impl = pick();
  if (impl == CrcImpl::Avx512) return crc32c_copy_avx512(dst, src, n, crc, prefetch);
  if (prefetch) prefetch_all(prefetch, n);
  switch (impl) {
    case CrcImpl::Sse42: return crc32c_copy_sse42(dst, src, n, crc);
    default: break;
  }
  crc = crc32c_scalar(src, n, crc);
  if (n) std::memcpy(dst, src, n);  // the bytes are in L1 after the CRC pass
  return crc;
}

const char* crc32c_impl_name() {
  switch (pick()) {
    case CrcImpl::Avx512: return "avx512";
    case CrcImpl::Sse42: return "sse42";
    default: return "scalar";
  }
}

}  // namespace data
}  // namespace aimass
