// Scalar references and the run-time dispatch of the comm kernels.
#include <algorithm>
#include <cstring>
#include <vector>

#include "aimass/comm_kernels.h"
#include "aimass/cpu_features.h"
#include "aimass/half.h"
#include "comm/kernels_impl.h"

namespace aimass {
namespace comm {

namespace ref {
namespace {
inline float to_f32(Half k, uint16_t h) { return k == Half::F16 ? f16_to_f32(h) : bf16_to_f32(h); }
inline uint16_t to_half(Half k, float f) { return k == Half::F16 ? f32_to_f16(f) : f32_to_bf16(f); }
// Same NaN-propagation as vminps/vmaxps (returns the second operand when either is NaN).
inline float op_min(float a, float b) { return a < b ? a : b; }
inline float op_max(float a, float b) { return a > b ? a : b; }
inline float apply(ElemOp op, float v, float acc) {
  switch (op) {
    case ElemOp::Sum: return v + acc;
    case ElemOp::Min: return op_min(v, acc);
    case ElemOp::Max: return op_max(v, acc);
    case ElemOp::Prod: return v * acc;
  }
  return acc;
}
}  // namespace

void half_to_f32(Half kind, const uint16_t* in, float* out, size_t n) {
  for (size_t i = 0; i < n; ++i) out[i] = to_f32(kind, in[i]);
}
void f32_to_half(Half kind, const float* in, uint16_t* out, size_t n, float scale) {
  for (size_t i = 0; i < n; ++i) out[i] = to_half(kind, scale == 1.0f ? in[i] : in[i] * scale);
}
void reduce_half(Half kind, ElemOp op, const uint16_t* in, uint16_t* inout, size_t n) {
  for (size_t i = 0; i < n; ++i) {
    const float a = to_f32(kind, in[i]), b = to_f32(kind, inout[i]);
    inout[i] = to_half(kind, apply(op, a, b));
  }
}
void reduce_f32(ElemOp op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale) {
  for (size_t i = 0; i < n; ++i) {
    float acc = srcs[0][i];
    for (int j = 1; j < k; ++j) {
      const float v = srcs[j][i];
      acc = apply(op, v, acc);
    }
    if (scale != 1.0f) acc *= scale;
    dst[i] = acc;
    if (dst2) dst2[i] = acc;
  }
}
void reduce_half_sources(Half kind, ElemOp op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                         uint16_t* dst2, float scale) {
  for (size_t i = 0; i < n; ++i) {
    float acc = to_f32(kind, srcs[0][i]);
    for (int j = 1; j < k; ++j) acc = apply(op, acc, to_f32(kind, srcs[j][i]));  // op(running, source)
    uint16_t h = to_half(kind, acc);
    if (scale != 1.0f) h = to_half(kind, to_f32(kind, h) * scale);
    dst[i] = h;
    if (dst2) dst2[i] = h;
  }
}

// fp64: the loops of shm_allreduce.cc's reduce_typed<double> and divide() in one pass.
void reduce_f64(ElemOp op, const double* const* srcs, int k, double* dst, size_t n, double* dst2, double divisor) {
  for (size_t i = 0; i < n; ++i) {
    double acc = srcs[0][i];
    for (int j = 1; j < k; ++j) {
      const double v = srcs[j][i];
      switch (op) {
        case ElemOp::Sum: acc += v; break;
        case ElemOp::Min: acc = v < acc ? v : acc; break;
        case ElemOp::Max: acc = v > acc ? v : acc; break;
        case ElemOp::Prod: acc *= v; break;
      }
    }
    if (divisor != 1.0) acc /= divisor;
    dst[i] = acc;
    if (dst2) dst2[i] = acc;
  }
}
}  // namespace ref

namespace isa {
void ref_reduce_half_sources(int kind, int op, const uint16_t* const* srcs, int k, size_t from, size_t n,
                             uint16_t* dst, uint16_t* dst2, float scale) {
  std::vector<const uint16_t*> at(static_cast<size_t>(k));
  for (int j = 0; j < k; ++j) at[static_cast<size_t>(j)] = srcs[j] + from;
  ref::reduce_half_sources(static_cast<Half>(kind), static_cast<ElemOp>(op), at.data(), k, dst + from, n - from,
                           dst2 ? dst2 + from : nullptr, scale);
}
}  // namespace isa

namespace {
// AVX2 paths need F16C for fp16 (every AVX2 CPU we dispatch to has it; checked anyway).
inline SimdLevel level() {
  SimdLevel l = simd_level();
  if (l == SimdLevel::AVX2 && !cpu_features().f16c) return SimdLevel::Scalar;
  return l;
}
}  // namespace

void half_to_f32(Half kind, const uint16_t* in, float* out, size_t n) {
  switch (level()) {
    case SimdLevel::AVX512: return isa::half_to_f32_avx512(static_cast<int>(kind), in, out, n);
    case SimdLevel::AVX2: return isa::half_to_f32_avx2(static_cast<int>(kind), in, out, n);
    default: return ref::half_to_f32(kind, in, out, n);
  }
}

void f32_to_half(Half kind, const float* in, uint16_t* out, size_t n, float scale) {
  switch (level()) {
    case SimdLevel::AVX512: return isa::f32_to_half_avx512(static_cast<int>(kind), in, out, n, scale);
    case SimdLevel::AVX2: return isa::f32_to_half_avx2(static_cast<int>(kind), in, out, n, scale);
    default: return ref::f32_to_half(kind, in, out, n, scale);
  }
}

void reduce_half(Half kind, ElemOp op, const uint16_t* in, uint16_t* inout, size_t n) {
  if (op == ElemOp::Prod) return ref::reduce_half(kind, op, in, inout, n);
  switch (level()) {
    case SimdLevel::AVX512:
      return isa::reduce_half_avx512(static_cast<int>(kind), static_cast<int>(op), in, inout, n);
    case SimdLevel::AVX2:
      return isa::reduce_half_avx2(static_cast<int>(kind), static_cast<int>(op), in, inout, n);
    default: return ref::reduce_half(kind, op, in, inout, n);
  }
}

void reduce_f32(ElemOp op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale) {
  if (op == ElemOp::Prod) return ref::reduce_f32(op, srcs, k, dst, n, dst2, scale);
  switch (level()) {
    case SimdLevel::AVX512: return isa::reduce_f32_avx512(static_cast<int>(op), srcs, k, dst, n, dst2, scale);
    case SimdLevel::AVX2: return isa::reduce_f32_avx2(static_cast<int>(op), srcs, k, dst, n, dst2, scale);
    default: return ref::reduce_f32(op, srcs, k, dst, n, dst2, scale);
  }
}

void reduce_half_sources(Half kind, ElemOp op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                         uint16_t* dst2, float scale) {
  if (op == ElemOp::Prod) return ref::reduce_half_sources(kind, op, srcs, k, dst, n, dst2, scale);
  switch (level()) {
    case SimdLevel::AVX512:
      return isa::reduce_half_sources_avx512(static_cast<int>(kind), static_cast<int>(op), srcs, k, dst, n, dst2,
                                             scale);
    case SimdLevel::AVX2:
      return isa::reduce_half_sources_avx2(static_cast<int>(kind), static_cast<int>(op), srcs, k, dst, n, dst2, scale);
    default: return ref::reduce_half_sources(kind, op, srcs, k, dst, n, dst2, scale);
  }
}

void reduce_f64(ElemOp op, const double* const* srcs, int k, double* dst, size_t n, double* dst2, double divisor) {
  if (op == ElemOp::Prod) return ref::reduce_f64(op, srcs, k, dst, n, dst2, divisor);
  switch (level()) {
    case SimdLevel::AVX512:
      return isa::reduce_f64_avx512(static_cast<int>(op), srcs, k, dst, n, dst2, divisor);
    case SimdLevel::AVX2: return isa::reduce_f64_avx2(static_cast<int>(op), srcs, k, dst, n, dst2, divisor);
    default: return ref::reduce_f64(op, srcs, k, dst, n, dst2, divisor);
  }
}

void copy_streaming(void* dst, const void* src, size_t n) {
  switch (simd_level()) {  // (no F16C needed: plain integer loads and stores)
    case SimdLevel::AVX512: return isa::copy_streaming_avx512(dst, src, n);
    case SimdLevel::AVX2: return isa::copy_streaming_avx2(dst, src, n);
    default: std::memcpy(dst, src, n);
  }
}

void copy_bytes_in_window(void* dst, const void* src, size_t n) {
  switch (simd_level()) {  // (plain integer loads and stores: AVX2 / AVX-512F)
    case SimdLevel::AVX512: return isa::copy_vectors_avx512(dst, src, n);
    case SimdLevel::AVX2: return isa::copy_vectors_avx2(dst, src, n);
    default: std::memcpy(dst, src, n);
  }
}

void scale_half(Half kind, uint16_t* inout, size_t n, float scale) {
  constexpr size_t kBlock = 4096;
  float tmp[kBlock];
  for (size_t i = 0; i < n; i += kBlock) {
    const size_t m = std::min(kBlock, n - i);
    half_to_f32(kind, inout + i, tmp, m);
    f32_to_half(kind, tmp, inout + i, m, scale);
  }
}

}  // namespace comm
}  // namespace aimass
