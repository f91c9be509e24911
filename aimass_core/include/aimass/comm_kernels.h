// Element kernels of the collectives: fp16/bf16 <-> fp32 conversion and
// reductions of 16-bit floats computed in fp32 (one rounding per element).
// Each dispatches on simd_level() to an AVX-512 / AVX2+F16C path; the scalar
// reference (namespace ref, built on aimass/half.h) gives identical bits for
// every non-NaN input (NaNs stay NaN).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>

namespace aimass {
namespace comm {

enum class Half : int { F16 = 0, BF16 = 1 };
// What a reduction kernel computes per element (average is a sum divided afterwards).
// Prod has no SIMD path: the dispatchers run the scalar reference for it.
enum class ElemOp : int { Sum = 0, Min = 1, Max = 2, Prod = 3 };

void half_to_f32(Half kind, const uint16_t* in, float* out, size_t n);
// out = round_to_half(in * scale)
void f32_to_half(Half kind, const float* in, uint16_t* out, size_t n, float scale = 1.0f);
// inout[i] = round_to_half(op(float(in[i]), float(inout[i])))
void reduce_half(Half kind, ElemOp op, const uint16_t* in, uint16_t* inout, size_t n);
// inout[i] = round_to_half(float(inout[i]) * scale)
void scale_half(Half kind, uint16_t* inout, size_t n, float scale);

// dst[i] = scale * (op over k sources srcs[j][i]) (fp32; used by the shared-memory path),
// also stored to dst2 when it is not null (one pass writes a result and its copy).
// dst/dst2 may alias srcs[0]. scale != 1 applies to Sum only (an average).
void reduce_f32(ElemOp op, const float* const* srcs, int k, float* dst, size_t n, float* dst2 = nullptr,
                float scale = 1.0f);

// The same for fp64: dst[i] = (op over srcs[j][i], in source order) / divisor, also to dst2 (one pass
// writes the result and its copy: the staged allreduce's result slot and output). The same bits as the
// plain loops it replaced (sum/product left to right, min/max keep the earlier value on ties and NaN
// comparisons) and as the MPI path's average (divided, not multiplied by a reciprocal). Prod: scalar.
void reduce_f64(ElemOp op, const double* const* srcs, int k, double* dst, size_t n, double* dst2 = nullptr,
                double divisor = 1.0);

// 16-bit floats over k sources, as the staged allreduce reduces them: every source widened to fp32 and
// accumulated left to right (running = op(running, source): min/max keep the running value only when it
// is strictly smaller/larger), rounded once; with scale != 1 (an average) the rounded sum is then widened,
// scaled and rounded again, as scale_half() does after the sum. Also stored to dst2 (the output beside
// the result slot). dst/dst2 may alias srcs[0]. Prod: scalar.
void reduce_half_sources(Half kind, ElemOp op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                         uint16_t* dst2 = nullptr, float scale = 1.0f);

// dst[0, n) = src[0, n) with non-temporal stores (no read-for-ownership of dst's lines, which are not
// kept in the caches): for copies into memory much larger than the last-level cache that nobody reads
// before it is evicted anyway (a large allgather's own rows). Exact bytes at every SIMD level; the
// scalar path is memcpy. dst and src must not overlap.
void copy_streaming(void* dst, const void* src, size_t n);

// dst[0, n) = src[0, n) (no overlap): memcpy, except where dst sits less than 64 bytes past src modulo 4 KiB
// (dst - src mod 4096 in 1..63) and n >= 4 KiB: there glibc's `rep movsb` runs its slow microcoded path on
// AMD Zen (measured on this Zen 4 VM, glibc 2.36, 256 KiB copies from DRAM into a cached slot: 3.3 GB/s at
// a distance of 4 or 8 bytes, 8.4 at 16 or 24, 20-23 at 0, 32 or more; microsoft/STL#5658), and the
// engine's copies out of its page-aligned slots into numpy's arrays (16 bytes into a page) sit at 16
// every time. There a SIMD loop of plain loads and stores copies (17-21 GB/s at any distance); the
// scalar path is memcpy. Inline: the small copies of the low-latency paths pay only the test.
void copy_bytes_in_window(void* dst, const void* src, size_t n);  // (the SIMD dispatch)
inline void copy_bytes(void* dst, const void* src, size_t n) {
  const uintptr_t dist = (reinterpret_cast<uintptr_t>(dst) - reinterpret_cast<uintptr_t>(src)) & 4095;
  if (n < 4096 || dist == 0 || dist >= 64) {
    std::memcpy(dst, src, n);
  } else {
    copy_bytes_in_window(dst, src, n);
  }
}

namespace ref {
void reduce_half_sources(Half kind, ElemOp op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                         uint16_t* dst2 = nullptr, float scale = 1.0f);
void reduce_f64(ElemOp op, const double* const* srcs, int k, double* dst, size_t n, double* dst2 = nullptr,
                double divisor = 1.0);
void reduce_f32(ElemOp op, const float* const* srcs, int k, float* dst, size_t n, float* dst2 = nullptr,
                float scale = 1.0f);
void half_to_f32(Half kind, const uint16_t* in, float* out, size_t n);
void f32_to_half(Half kind, const float* in, uint16_t* out, size_t n, float scale);
void reduce_half(Half kind, ElemOp op, const uint16_t* in, uint16_t* inout, size_t n);
}  // namespace ref

}  // namespace comm
}  // namespace aimass
