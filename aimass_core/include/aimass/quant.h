// Weight quantization (int8 / int4; per tensor, channel or group; symmetric or
// asymmetric) with the exact numerics of docs/quant_format.md / docs/numerics.md.
//
// A tensor of any rank is described by its view [outer, channels, inner] around
// the quantization axis. Channel c's element sequence is (o, i) row-major, and
// group g of channel c is elements [g*G, (g+1)*G) of that sequence. Output data
// keeps the input's flat row-major order (4-bit: two per byte, low nibble first).
#pragma once
#include <cstdint>

#include "aimass/cpu_features.h"
#include "aimass/dtype.h"

namespace aimass {
namespace quant {

enum class Scheme : int { Symmetric = 0, Asymmetric = 1 };
enum class Granularity : int { Tensor = 0, Channel = 1, Group = 2 };

struct QuantSpec {
  int bits = 8;                    // 8 or 4
  Scheme scheme = Scheme::Symmetric;
  Granularity granularity = Granularity::Tensor;
  int64_t outer = 1;               // product of dims before the axis
  int64_t channels = 1;            // size of the axis
  int64_t inner = 1;               // product of dims after the axis
  int64_t group_size = 0;          // only for Granularity::Group; divides outer*inner
};

// Throws ValueError (naming the field) when the spec is inconsistent.
void validate(const QuantSpec& spec);
int64_t numel(const QuantSpec& spec);
// Number of scales: 1, channels, or channels * (outer*inner/group_size).
int64_t num_blocks(const QuantSpec& spec);
// Bytes of quantized data: numel (8-bit) or ceil(numel/2) (4-bit).
int64_t data_bytes(const QuantSpec& spec);

// Scales (and zero points when asymmetric; zero_point may be null when symmetric)
// for x, fp32 contiguous. Throws ValueError when x holds NaN/Inf or when its range
// overflows fp32.
void compute_params(const QuantSpec& spec, const float* x, float* scale, int32_t* zero_point);
// Quantizes x with the given parameters into out (data_bytes(spec) bytes: int8 for
// symmetric 8-bit, uint8 for asymmetric 8-bit, packed nibbles for 4-bit).
void quantize(const QuantSpec& spec, const float* x, const float* scale, const int32_t* zero_point,
              void* out);
// compute_params + quantize, in one pass over memory where the layout allows it.
void quantize_auto(const QuantSpec& spec, const float* x, float* scale, int32_t* zero_point, void* out);
// Same for an fp32, fp16 or bf16 input (half inputs are widened to fp32 exactly, in
// cache-sized pieces, never as a whole-tensor copy on the leading-axis path).
void quantize_auto(const QuantSpec& spec, const void* x, DType dtype, float* scale, int32_t* zero_point,
                   void* out);
// out[numel] = (q - zero_point) * scale in fp32.
void dequantize(const QuantSpec& spec, const void* data, const float* scale, const int32_t* zero_point,
                float* out);

// ---- contiguous kernels, one per SIMD level (exposed for the parity tests) ----
struct MinMax {
  float min;
  float max;
  bool finite;  // false when any element is NaN or +-Inf
};
// min/max of x[0..n) (n >= 1); an empty run gives {+inf, -inf, true}.
MinMax minmax(const float* x, int64_t n, SimdLevel level);
// q[j] = clamp(rint(x[j] / scale) + zp, qmin, qmax), rint = round half to even,
// evaluated in fp32 (symmetric: zp = 0, qmin = -qmax). q holds the low 8 bits of
// the value (uint8 values 128..255 are stored as the same byte).
void quantize_run(const float* x, int64_t n, float scale, int32_t zp, int32_t qmin, int32_t qmax,
                  int8_t* q, SimdLevel level);
// out[j] = float(q[j] - zp) * scale, q read as int8 (is_unsigned=false) or uint8.
void dequantize_run(const int8_t* q, int64_t n, bool is_unsigned, float scale, int32_t zp, float* out,
                    SimdLevel level);
// out[j] = fp32 value of the fp16 (is_bf16=false) or bf16 bits in[j]; exact.
void widen_to_f32(const uint16_t* in, int64_t n, bool is_bf16, float* out, SimdLevel level);
// Packs n 4-bit values (low nibble of q[j]) two per byte, element 2j low.
void pack_nibbles(const int8_t* q, int64_t n, uint8_t* out, SimdLevel level);
// Unpacks n nibbles to int8: sign-extended (is_signed) or 0..15.
void unpack_nibbles(const uint8_t* in, int64_t n, bool is_signed, int8_t* q, SimdLevel level);

}  // namespace quant
}  // namespace aimass
