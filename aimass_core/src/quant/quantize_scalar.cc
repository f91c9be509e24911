// Scalar reference kernels: the definition of the numerics that every SIMD
// path is tested against bit for bit.
#include <cmath>

#include "aimass/half.h"
#include "quant/quantize_kernels.h"

namespace aimass {
namespace quant {
namespace detail {

MinMax minmax_scalar(const float* x, int64_t n) {
  float mn = INFINITY, mx = -INFINITY;
  bool nan = false;
  for (int64_t j = 0; j < n; ++j) {
    const float v = x[j];
    nan |= (v != v);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  // Inf shows up in min/max; NaN is caught by the self-compare.
  const bool finite = !nan && (n == 0 || (std::isfinite(mn) && std::isfinite(mx)));
  return {mn, mx, finite};
}

void quantize_run_scalar(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                         int8_t* q) {
  const float fzp = static_cast<float>(zp), fmin = static_cast<float>(qmin), fmax = static_cast<float>(qmax);
  for (int64_t j = 0; j < n; ++j) {
    // nearbyint under the default rounding mode = round half to even; all in fp32
    float r = std::nearbyint(x[j] / scale) + fzp;
    r = r < fmin ? fmin : r;
    r = r > fmax ? fmax : r;
    q[j] = static_cast<int8_t>(static_cast<uint8_t>(static_cast<int32_t>(r)));
  }
}

void dequantize_run_scalar(const int8_t* q, int64_t n, bool is_unsigned, float scale, int32_t zp,
                           float* out) {
  if (is_unsigned) {
    const uint8_t* u = reinterpret_cast<const uint8_t*>(q);
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(static_cast<int32_t>(u[j]) - zp) * scale;
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = static_cast<float>(static_cast<int32_t>(q[j]) - zp) * scale;
  }
}

void pack_nibbles_scalar(const int8_t* q, int64_t n, uint8_t* out) {
  const int64_t pairs = n / 2;
  for (int64_t j = 0; j < pairs; ++j)
    out[j] = static_cast<uint8_t>((q[2 * j] & 0x0F) | ((q[2 * j + 1] & 0x0F) << 4));
  if (n & 1) out[pairs] = static_cast<uint8_t>(q[n - 1] & 0x0F);  // odd tail: high nibble 0
}

void unpack_nibbles_scalar(const uint8_t* in, int64_t n, bool is_signed, int8_t* q) {
  for (int64_t j = 0; j < n; ++j) {
    int v = (in[j >> 1] >> ((j & 1) * 4)) & 0x0F;
    if (is_signed) v = (v ^ 8) - 8;  // sign-extend the 4-bit two's complement value
    q[j] = static_cast<int8_t>(v);
  }
}

void widen_to_f32_scalar(const uint16_t* in, int64_t n, bool is_bf16, float* out) {
  if (is_bf16) {
    for (int64_t j = 0; j < n; ++j) out[j] = bf16_to_f32(in[j]);
  } else {
    for (int64_t j = 0; j < n; ++j) out[j] = f16_to_f32(in[j]);
  }
}

}  // namespace detail
}  // namespace quant
}  // namespace aimass
