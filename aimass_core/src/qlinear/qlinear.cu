// CUDA kernels for the quantized linear (int8 symmetric per-channel).
#include <cuda_runtime.h>

#include <cstdint>

#include "aimass/cuda_device.h"
#include "aimass/error.h"
#include "aimass/qlinear_cuda.h"

namespace aimass::quant::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float block_max(float v, float* shared) {
  for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < (blockDim.x >> 5) ? shared[threadIdx.x] : 0.f;
  if (warp == 0)
    for (int off = 16; off > 0; off >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, off));
  if (threadIdx.x == 0) shared[0] = v;
  __syncthreads();
  return shared[0];
}

// One block per row: amax -> scale -> q (fp32 division, rint = round half to even).
__global__ void quantize_rows_kernel(const float* __restrict__ w, int64_t K, int8_t* __restrict__ q,
                                     float* __restrict__ scale, int* __restrict__ bad) {
  __shared__ float shared[32];
  const int64_t row = blockIdx.x;
  const float* wr = w + row * K;
  float amax = 0.f;
  bool nonfinite = false;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float v = wr[k];
    nonfinite |= !isfinite(v);
    amax = fmaxf(amax, fabsf(v));
  }
  if (nonfinite) atomicExch(bad, 1);
  amax = block_max(amax, shared);
  const float s = amax > 0.f ? __fdiv_rn(amax, 127.f) : 1.f;
  if (threadIdx.x == 0) scale[row] = s;
  int8_t* qr = q + row * K;
  for (int64_t k = threadIdx.x; k < K; k += blockDim.x) {
    const float r = rintf(__fdiv_rn(wr[k], s));
    qr[k] = static_cast<int8_t>(fminf(127.f, fmaxf(-127.f, r)));
  }
}

__global__ void dequantize_rows_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale, int64_t N,
                                       int64_t K, float* __restrict__ out) {
  const int64_t total = N * K;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x)
    out[i] = static_cast<float>(q[i]) * scale[i / K];
}

// One warp per output row n; each lane strides over K and the warp reduces with
// shuffles. The weight row is read once per x row (it stays in L1/L2 for small M).
__global__ void linear_int8_kernel(const int8_t* __restrict__ q, const float* __restrict__ scale, int64_t N,
                                   int64_t K, const float* __restrict__ x, int64_t M,
                                   const float* __restrict__ bias, float* __restrict__ y) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x >> 5) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (n >= N) return;
  const int8_t* wr = q + n * K;
  const bool vec = (K % 4 == 0) && ((reinterpret_cast<uintptr_t>(q) & 3) == 0) &&
                   ((reinterpret_cast<uintptr_t>(x) & 15) == 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    float acc = 0.f;
    bool bad = false;
    if (vec) {
      const char4* w4 = reinterpret_cast<const char4*>(wr);
      const float4* x4 = reinterpret_cast<const float4*>(xr);
      for (int64_t k = lane; k < K / 4; k += 32) {
        const char4 wv = w4[k];
        const float4 xv = x4[k];
        acc = fmaf(static_cast<float>(wv.x), xv.x, acc);
        acc = fmaf(static_cast<float>(wv.y), xv.y, acc);
        acc = fmaf(static_cast<float>(wv.z), xv.z, acc);
        acc = fmaf(static_cast<float>(wv.w), xv.w, acc);
        bad |= !isfinite(xv.x) | !isfinite(xv.y) | !isfinite(xv.z) | !isfinite(xv.w);
      }
    } else {
      for (int64_t k = lane; k < K; k += 32) {
        acc = fmaf(static_cast<float>(wr[k]), xr[k], acc);
        bad |= !isfinite(xr[k]);
      }
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    // docs/qlinear.md: a row of x holding NaN or +-inf gives an all-NaN output row on every path
    const bool row_bad = __any_sync(0xffffffffu, bad);
    if (lane == 0) y[m * N + n] = row_bad ? __int_as_float(0x7fc00000) : acc * scale[n] + (bias ? bias[n] : 0.f);
  }
}

void check_launch(const char* what) { aimass::cuda::check_last(what); }

}  // namespace

void quantize_int8_rows(const float* w, int64_t N, int64_t K, int8_t* q, float* scale, uintptr_t stream) {
  AIMASS_CHECK(N > 0 && K > 0, ValueError, "quantize_int8_rows: shape must be positive, got [", N, ", ", K, "]");
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  int* bad = nullptr;
  if (cudaMalloc(&bad, sizeof(int)) != cudaSuccess) check_launch("quantize_int8_rows: cudaMalloc");
  cudaMemsetAsync(bad, 0, sizeof(int), s);
  quantize_rows_kernel<<<static_cast<unsigned>(N), kThreads, 0, s>>>(w, K, q, scale, bad);
  check_launch("quantize_int8_rows");
  int host_bad = 0;
  cudaMemcpyAsync(&host_bad, bad, sizeof(int), cudaMemcpyDeviceToHost, s);
  cudaStreamSynchronize(s);
  cudaFree(bad);
  check_launch("quantize_int8_rows: synchronize");
  AIMASS_CHECK(!host_bad, ValueError, "w contains NaN or Inf; quantization needs finite weights");
}

void dequantize_int8_rows(const int8_t* q, const float* scale, int64_t N, int64_t K, float* out, uintptr_t stream) {
  AIMASS_CHECK(N > 0 && K > 0, ValueError, "dequantize_int8_rows: shape must be positive, got [", N, ", ", K, "]");
  const int64_t total = N * K;
  const unsigned blocks = static_cast<unsigned>((total + kThreads - 1) / kThreads < 65535 ? (total + kThreads - 1) / kThreads : 65535);
  dequantize_rows_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(q, scale, N, K, out);
  check_launch("dequantize_int8_rows");
}

void linear_int8(const int8_t* q, const float* scale, int64_t N, int64_t K, const float* x, int64_t M,
                 const float* bias, float* y, uintptr_t stream) {
  AIMASS_CHECK(N > 0 && K > 0 && M >= 0, ValueError, "linear_int8: bad shape N=", N, " K=", K, " M=", M);
  if (M == 0) return;
  const int64_t rows_per_block = kThreads / 32;
  const unsigned blocks = static_cast<unsigned>((N + rows_per_block - 1) / rows_per_block);
  linear_int8_kernel<<<blocks, kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(q, scale, N, K, x, M, bias, y);
  check_launch("linear_int8");
}

}  // namespace aimass::quant::cuda
