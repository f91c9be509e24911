// Contiguous quantization kernels, one set per ISA. The scalar set is the
// reference; the AVX2/AVX-512 sets must give identical bytes/bits.
#pragma once
#include <cstdint>

#include "aimass/quant.h"

namespace aimass {
namespace quant {
namespace detail {

#define AIMASS_QUANT_KERNELS(SUFFIX)                                                               \
  MinMax minmax_##SUFFIX(const float* x, int64_t n);                                              \
  void quantize_run_##SUFFIX(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin,     \
                             int32_t qmax, int8_t* q);                                             \
  void dequantize_run_##SUFFIX(const int8_t* q, int64_t n, bool is_unsigned, float scale,          \
                               int32_t zp, float* out);                                            \
  void pack_nibbles_##SUFFIX(const int8_t* q, int64_t n, uint8_t* out);                            \
  void unpack_nibbles_##SUFFIX(const uint8_t* in, int64_t n, bool is_signed, int8_t* q);             \
  void widen_to_f32_##SUFFIX(const uint16_t* in, int64_t n, bool is_bf16, float* out);

AIMASS_QUANT_KERNELS(scalar)
AIMASS_QUANT_KERNELS(avx2)
AIMASS_QUANT_KERNELS(avx512)
#undef AIMASS_QUANT_KERNELS

}  // namespace detail
}  // namespace quant
}  // namespace aimass
