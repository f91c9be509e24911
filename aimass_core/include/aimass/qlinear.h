// Fused quantized linear: y[M, N] = x[M, K] @ dequant(W)[N, K]^T + bias[N]
// (fp32 x, fp32 accumulate, fp32 y, all row-major and contiguous).
// Weights come in the canonical layout of docs/quant_format.md (symmetric only):
//   bits == 8: int8 [N, K];                      bits == 4: packed nibbles, flat row-major
//   (element 2j low nibble of byte j, two's complement, values -7..7; [N, K/2] when K is even).
//   group_size == 0: per-channel, scale [N];     group_size > 0: scale [N, K / group_size].
// pack_linear() prepacks once (like FBGEMM's packed weights); linear() picks the
// kernel by shape: weight-only GEMV/small-M GEMM, dynamic int8 GEMM (activations
// quantized per row), or dequantize + BLAS sgemm.
#pragma once
#include <cstdint>
#include <functional>
#include <memory>

namespace aimass::quant {

enum class LinearKernel : int {
  Auto = 0,        // choose by shape (see linear())
  WeightOnly = 1,  // fp32 activations times dequantized weights, on the fly
  DynamicInt8 = 2, // per-row symmetric int8 activations, s8*s8 int32 dot products
  DequantSgemm = 3 // dequantize panels of W to fp32, then aimass::sgemm
};
const char* linear_kernel_name(LinearKernel k);

// How the weight_only kernel feeds activations (dynamic_int8 always quantizes them to
// int8 per row; dequant_sgemm always uses fp32).
enum class ActivationPrecision : int {
  // Default. Each x row is rounded to 16-bit integers, q = rint(x * 32767 / max|x_row|),
  // and multiplied with the int8 weights in exact integer arithmetic (AVX-512 VNNI
  // vpdpbusd on two byte planes; AVX2 vpmaddwd). Extra error: at most max|x_row| / 65534
  // per x element (docs/numerics.md), ~250x below the int8 weight rounding.
  // Used for int8 per-channel (and per-tensor) weights, and int4 weights grouped in
  // multiples of 128 (or per-channel; AVX-512 VNNI vpdpbusd, AVX2 vpmaddubsw), with
  // K <= 65536; other weights run the fp32 path.
  Int16 = 0,
  FP32 = 1  // fp32 activations: no activation rounding at all
};
const char* activation_precision_name(ActivationPrecision a);
// "int16", "fp32"; throws ValueError otherwise.
ActivationPrecision parse_activation_precision(const char* name);
// "auto", "weight_only", "dynamic_int8", "dequant_sgemm"; throws ValueError otherwise.
LinearKernel parse_linear_kernel(const char* name);

struct PackedLinearImpl;

// Opaque prepacked weight. Immutable after pack_linear(): safe to share between threads.
class PackedLinear {
 public:
  explicit PackedLinear(std::unique_ptr<PackedLinearImpl> impl);
  ~PackedLinear();
  PackedLinear(const PackedLinear&) = delete;
  PackedLinear& operator=(const PackedLinear&) = delete;

  int bits() const;
  int64_t out_features() const;  // N
  int64_t in_features() const;   // K
  int64_t group_size() const;    // 0 = per-channel
  int64_t nbytes() const;        // memory held by the packed weights
  const PackedLinearImpl& impl() const { return *impl_; }

 private:
  std::unique_ptr<PackedLinearImpl> impl_;
};

// Validates the arguments (ValueError naming the bad one) and prepacks. `data` and
// `scale` are only read during the call. Scales must be finite and > 0.
std::shared_ptr<PackedLinear> pack_linear(int bits, int64_t N, int64_t K, int64_t group_size,
                                          const void* data, const float* scale);

// y = x @ dequant(W)^T + bias. Chooses the kernel by shape (LinearKernel::Auto).
void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y);
// Same with an explicit kernel choice (Auto behaves as above).
void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y,
            LinearKernel kernel, ActivationPrecision activations = ActivationPrecision::Int16);
// The caller's epilogue (activation, residual, ...) on output columns [n0, n1) of the M rows
// starting at y (row stride ldy), after the bias. The dynamic int8 VNNI path runs it on each
// block of columns and chunk of rows right after the GEMM wrote them (still in L1), so y may
// point at a later row of the output (an element's row is (pointer - output) / ldy); it runs
// from the pool's threads, so it must be thread-safe and must not start parallel work
// itself. The other paths run it once on all rows and [0, N) after linear().
using LinearEpilogue = std::function<void(float* y, int64_t M, int64_t ldy, int64_t n0, int64_t n1)>;
// y = epi(x @ dequant(W)^T + bias), the kernel chosen as in linear() (Auto, int16 activations).
void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y,
            const LinearEpilogue& epi);
// The kernel linear() would use for M rows at the current SIMD level (with the default int16
// activations; plan_linear() takes the activation precision into account).
LinearKernel choose_linear_kernel(const PackedLinear& w, int64_t M);
// What linear() runs for M rows with these arguments: the kernel and the activation
// format it uses ("fp32", "int16" or "int8").
struct LinearPlan {
  LinearKernel kernel;
  const char* activations;
};
LinearPlan plan_linear(const PackedLinear& w, int64_t M, LinearKernel kernel = LinearKernel::Auto,
                       ActivationPrecision activations = ActivationPrecision::Int16);

// Reference: dequantize the canonical layout into out[N, K] (fp32).
void dequantize_linear_weight(int bits, int64_t N, int64_t K, int64_t group_size, const void* data,
                              const float* scale, float* out);

}  // namespace aimass::quant
