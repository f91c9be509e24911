// CPU operator kernels of the runtime (fp32, NCHW, row-major). Each splits its
// work with aimass::parallel_for; GEMM-shaped work goes to aimass::sgemm.
#pragma once
#include <cstdint>
#include <string>
#include <vector>

#include "aimass/memory.h"

namespace aimass::runtime::ops {

enum class Act : int { None = 0, Relu, Gelu, GeluTanh, Silu, Sigmoid, Tanh };
Act parse_act(const std::string& name);  // ValueError on unknown

// Weights of one fp32 Linear packed once at plan build for the small-M kernel
// (runtime/packed_gemm.h); 64-byte aligned, owned.
struct PackedLinear {
  int64_t N = 0, K = 0;
  AlignedBuffer wbuf, bbuf;  // huge-page aligned when large (aimass/memory.h)
  float* w = nullptr;  // num_panels(N) * K * kPanel
  float* b = nullptr;  // num_panels(N) * kPanel, zero-padded; null without bias
  PackedLinear(const float* weight, const float* bias, int64_t N, int64_t K);
  PackedLinear(const PackedLinear&) = delete;
  PackedLinear& operator=(const PackedLinear&) = delete;
  int64_t bytes() const;
};

// y[R, N] = act(x[R, K] @ w[N, K]^T + bias) (+ res[R, N] when res is given). With `packed`,
// R <= packed_max_rows() (aimass/runtime.h) and not linear_prefers_sgemm(R, K), the packed
// kernel runs (bias, ReLU/GELU and the residual fused in its register epilogue); else OpenBLAS
// sgemm on row ranges split over the pool, each range's epilogue right after its GEMM.
bool linear_prefers_sgemm(int64_t R, int64_t K);
void linear(const float* x, int64_t R, int64_t K, const float* w, int64_t N, const float* bias, Act act, float* y,
            const PackedLinear* packed = nullptr, const float* res = nullptr);
// The packed kernel's register epilogue for `act` (packed_gemm.h kEpi*), -1 where it has none.
int packed_epilogue(Act act);
// Whether linear() runs the packed kernel with every epilogue in registers at R rows; then
// linear_rows(), the same arithmetic on the calling thread only, may run any row range of it
// (the executor's row chains split the rows over the pool themselves).
bool linear_rows_ok(int64_t R, int64_t K, Act act, const PackedLinear* packed);
void linear_rows(const float* x, int64_t R, int64_t K, int64_t N, Act act, float* y, const PackedLinear& packed,
                 const float* res);
// Boundaries b[0] = 0 < b[1] .. < b[nchunks] = T of row ranges, as even as may be, that
// linear_rows() can run apart and still give every output bit of one call over all T rows
// (T >= 2 * nchunks * 12).
std::vector<int64_t> linear_row_splits(int64_t T, int nchunks);
// Bias (per row of `channels`, each `plane` long) + activation over y in place.
void epilogue(float* y, int64_t outer, int64_t channels, int64_t plane, const float* bias, Act act);

struct Conv2dShape {
  int64_t C, H, W, O, KH, KW, SH, SW, PH, PW, DH, DW, G, OH, OW;
};
// A 1x1, stride-1, unpadded conv: each sample's input is already its GEMM operand (no im2col).
inline bool is_pointwise(const Conv2dShape& s) {
  return s.KH == 1 && s.KW == 1 && s.SH == 1 && s.SW == 1 && s.PH == 0 && s.PW == 0;
}
// Grouped convs (groups > 1; the executor runs groups == 1 through runtime/ops_conv.h).
// One sample at a time: with AVX2 or AVX-512, im2col into the packed small-GEMM layout and
// the packed kernel on the engine's pool; at the scalar level im2col + sgemm (1x1/stride-1
// convs skip im2col). `col` holds conv2d_col_floats(s) floats.
int64_t conv2d_col_floats(const Conv2dShape& s);
void conv2d(const float* x, int64_t N, const Conv2dShape& s, const float* w, const float* bias, Act act, float* col,
            float* y);

struct Pool2dShape {
  int64_t C, H, W, KH, KW, SH, SW, PH, PW, DH, DW, OH, OW;
  bool count_include_pad;
};
void max_pool2d(const float* x, int64_t N, const Pool2dShape& s, float* y);
void avg_pool2d(const float* x, int64_t N, const Pool2dShape& s, float* y);
void adaptive_avg_pool2d(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                         float* y);

void activation(const float* x, int64_t n, Act act, float* y);
void softmax(const float* x, int64_t outer, int64_t axis, int64_t inner, bool log, float* y);
void layer_norm(const float* x, int64_t R, int64_t D, const float* w, const float* b, double eps, float* y);
// Every index must be in [0, V): ValueError naming `where` (the node), the index and the range.
void embedding(const int64_t* idx, int64_t n, const float* table, int64_t V, int64_t D, float* y,
               const char* where = "embedding");
void channel_affine(const float* x, int64_t outer, int64_t C, int64_t plane, const float* scale,
                    const float* shift, float* y);

enum class BinOp : int { Add = 0, Sub, Mul, Div };
// out = a (op) b with numpy broadcasting; shapes are full (rank <= 8), strides in
// elements with 0 on broadcast dims. b may be a scalar (b_shape empty).
void binary(BinOp op, const float* a, const std::vector<int64_t>& a_strides, const float* b,
            const std::vector<int64_t>& b_strides, const std::vector<int64_t>& out_shape, float* y);

}  // namespace aimass::runtime::ops
