// Per-ISA entry points of the comm kernels (defined in kernels_avx2.cc and
// kernels_avx512.cc, which are compiled with their ISA flags). Plain functions
// on raw pointers only: no std:: templates cross the ISA boundary.
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass {
namespace comm {
namespace isa {
// kind: 0 = fp16, 1 = bf16; op: 0 sum, 1 min, 2 max
void half_to_f32_avx2(int kind, const uint16_t* in, float* out, size_t n);
void f32_to_half_avx2(int kind, const float* in, uint16_t* out, size_t n, float scale);
void reduce_half_avx2(int kind, int op, const uint16_t* in, uint16_t* inout, size_t n);
void reduce_f32_avx2(int op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale);
void reduce_f32_avx512(int op, const float* const* srcs, int k, float* dst, size_t n, float* dst2, float scale);
void reduce_f64_avx2(int op, const double* const* srcs, int k, double* dst, size_t n, double* dst2, double divisor);
void reduce_f64_avx512(int op, const double* const* srcs, int k, double* dst, size_t n, double* dst2,
                       double divisor);
void reduce_half_sources_avx2(int kind, int op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                              uint16_t* dst2, float scale);
void reduce_half_sources_avx512(int kind, int op, const uint16_t* const* srcs, int k, uint16_t* dst, size_t n,
                                uint16_t* dst2, float scale);
// ref::reduce_half_sources over elements [from, n) (kernels.cc, compiled without ISA flags)
void ref_reduce_half_sources(int kind, int op, const uint16_t* const* srcs, int k, size_t from, size_t n,
                             uint16_t* dst, uint16_t* dst2, float scale);
void half_to_f32_avx512(int kind, const uint16_t* in, float* out, size_t n);
void f32_to_half_avx512(int kind, const float* in, uint16_t* out, size_t n, float scale);
void reduce_half_avx512(int kind, int op, const uint16_t* in, uint16_t* inout, size_t n);
// dst = src (n bytes) with non-temporal stores, then an sfence (kernels.cc: copy_streaming)
void copy_streaming_avx2(void* dst, const void* src, size_t n);
void copy_streaming_avx512(void* dst, const void* src, size_t n);
// dst = src (n bytes) with plain unaligned loads and stores (kernels.cc: copy_bytes_in_window)
void copy_vectors_avx2(void* dst, const void* src, size_t n);
void copy_vectors_avx512(void* dst, const void* src, size_t n);
}  // namespace isa
}  // namespace comm
}  // namespace aimass
