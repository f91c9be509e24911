// Scalar reference kernels: the definition every SIMD level is tested against.
#include <algorithm>
#include <cmath>

#include "qlinear/kernels.h"

namespace aimass::quant::detail {
namespace {

inline int int4_at(const uint8_t* row, int64_t k) { return int4_get(row, k); }

void weight_only_int8(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                      int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w.w8 + n * w.Kp;
    const float* sr = w.scale + n * w.ng;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t g = 0; g < w.ng; ++g) {
        float ga = 0.f;
        for (int64_t k = g * w.G; k < (g + 1) * w.G; ++k) ga += static_cast<float>(wr[k]) * xr[k];
        acc += ga * sr[g];
      }
      y[m * ldy + n] = acc;
    }
  }
}

void weight_only_int4(const WeightView& w, const float* x, int64_t ldx, int64_t M, float* y, int64_t ldy,
                      int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w.w4 + n * (w.Kp / 2);
    const float* sr = w.scale + n * w.ng;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * ldx;
      float acc = 0.f;
      for (int64_t g = 0; g < w.ng; ++g) {
        float ga = 0.f;
        for (int64_t k = g * w.G; k < (g + 1) * w.G; ++k) ga += static_cast<float>(int4_at(wr, k)) * xr[k];
        acc += ga * sr[g];
      }
      y[m * ldy + n] = acc;
    }
  }
}

namespace {
// Symmetric per-row quantization to [-qmax, qmax] with round half to even; a row holding
// NaN/Inf gets scale NaN and zeros (the int8 and int16 activation formats differ only in qmax).
template <typename T>
void quant_rows_sym(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, T* qx, float* sx, float qmax) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * ldx;
    T* q = qx + m * Kp;
    float amax = 0.f, poison = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      amax = std::fmax(amax, std::fabs(xr[k]));
      poison += xr[k] * 0.f;  // NaN iff some element is NaN or Inf
    }
    if (poison != 0.f || std::isnan(poison)) {
      sx[m] = NAN;
      amax = 0.f;
    } else {
      sx[m] = amax / qmax;
    }
    const float inv = amax > 0.f ? qmax / amax : 0.f;
    for (int64_t k = 0; k < K; ++k)
      q[k] = static_cast<T>(std::fmin(qmax, std::fmax(-qmax, std::nearbyint(xr[k] * inv))));
    for (int64_t k = K; k < Kp; ++k) q[k] = 0;
  }
}
}  // namespace

void quant_rows(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, int8_t* qx, float* sx) {
  quant_rows_sym(x, ldx, M, K, Kp, qx, sx, 127.f);
}

void dynamic(const WeightView& w, const int8_t* qx, const float* sx, int64_t M, float* y, int64_t ldy,
             int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w.wq + n * w.Kp;
    const float* sr = w.scale + n * w.ng;
    for (int64_t m = 0; m < M; ++m) {
      const int8_t* q = qx + m * w.Kp;
      float acc = 0.f;
      for (int64_t g = 0; g < w.ng; ++g) {
        int32_t dot = 0;
        for (int64_t k = g * w.G; k < (g + 1) * w.G; ++k) dot += static_cast<int32_t>(q[k]) * wr[k];
        acc += static_cast<float>(dot) * sr[g];
      }
      y[m * ldy + n] = acc * sx[m];
    }
  }
}

void quant_rows16(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  quant_rows_sym(x, ldx, M, K, Kp, static_cast<int16_t*>(qa), sx, 32767.f);
}

void weight_only_int8_a16(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  const int16_t* q = static_cast<const int16_t*>(qa);
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* wr = w.w8 + n * w.Kp;
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* qr = q + m * w.Kp;
      int64_t dot = 0;
      for (int64_t k = 0; k < w.K; ++k) dot += static_cast<int32_t>(qr[k]) * wr[k];
      y[m * ldy + n] = static_cast<float>(static_cast<double>(dot) * static_cast<double>(sx[m] * w.scale[n]));
    }
  }
}

// int16 rows [Kp] at a stride of int4_a16_row_bytes(Kp) bytes.
void quant_rows16_int4(const float* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, void* qa, float* sx) {
  for (int64_t m = 0; m < M; ++m)
    quant_rows16(x + m * ldx, ldx, 1, K, Kp, static_cast<uint8_t*>(qa) + m * int4_a16_row_bytes(Kp), sx + m);
}

// The reference of the int4 int16-activation kernels (kernels.h): an exact int32 dot per
// 128-chunk of k, then fp32 fma with the chunk's group scale, chunks in order.
void weight_only_int4_a16(const WeightView& w, const void* qa, const float* sx, int64_t M, float* y, int64_t ldy,
                          int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const uint8_t* wr = w.w4 + n * (w.Kp / 2);
    for (int64_t m = 0; m < M; ++m) {
      const int16_t* q =
          reinterpret_cast<const int16_t*>(static_cast<const uint8_t*>(qa) + m * int4_a16_row_bytes(w.Kp));
      float f = 0.f;
      for (int64_t c = 0; c < w.Kp / 128; ++c) {
        int32_t d = 0;
        const int64_t k1 = std::min(128 * (c + 1), w.K);
        for (int64_t k = 128 * c; k < k1; ++k) d += static_cast<int32_t>(q[k]) * int4_get(wr, k);
        f = std::fma(static_cast<float>(d), w.scale[n * w.ng + (w.per_channel ? 0 : 128 * c / w.G)], f);
      }
      y[m * ldy + n] = f * sx[m];
    }
  }
}

}  // namespace

const KernelTable& scalar_kernels() {
  static const KernelTable t{weight_only_int8, weight_only_int4, quant_rows, dynamic, 1, 1, nullptr, nullptr,
                             quant_rows16, weight_only_int8_a16, nullptr, quant_rows16_int4, weight_only_int4_a16};
  return t;
}

}  // namespace aimass::quant::detail
