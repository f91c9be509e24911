// CUDA side of the quantized linear: symmetric int8 per-channel quantize /
// dequantize of a [N, K] weight and an int8 weight-only GEMV/small-M GEMM.
// All pointers are device pointers; `stream` is a cudaStream_t as an integer (0 =
// default stream). Calls are asynchronous except where noted; errors in launches
// throw aimass::Error naming the call.
#pragma once
#include <cstdint>

namespace aimass::quant::cuda {

// q[N, K] int8, scale[N] fp32 from w[N, K] fp32, per docs/quant_format.md (fp32 division,
// round half to even, scale 1 for an all-zero row). Synchronises on `stream` to report
// NaN/Inf in w as aimass::ValueError.
void quantize_int8_rows(const float* w, int64_t N, int64_t K, int8_t* q, float* scale, uintptr_t stream);
// out[N, K] = q * scale[n].
void dequantize_int8_rows(const int8_t* q, const float* scale, int64_t N, int64_t K, float* out,
                          uintptr_t stream);
// y[M, N] = x[M, K] @ (q * scale)^T + bias (bias may be null); fp32 accumulate.
// One warp per output row; meant for small M (decode-style batches).
void linear_int8(const int8_t* q, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                 const float* bias, float* y, uintptr_t stream);

}  // namespace aimass::quant::cuda
