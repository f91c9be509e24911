// Extension ops of the runtime: tensor manipulation (matmul between activations,
// permute, concat, slice, reduce, where, compare, cast, positions), fused
// scaled-dot-product attention and the recurrent layers (LSTM, GRU). Each node is
// built once per plan into an ExtKernel that the executor runs with the batch's
// row count; shapes are per-row (the batch dimension is implicit and first).
// Weights prepared at build (packed GEMM panels, ...) live in the WeightCache the
// executor shares between its plans (one plan per sequence length).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "aimass/runtime.h"

namespace aimass::runtime {

struct ExtValue {
  ValueType dtype = ValueType::Float32;
  std::vector<int64_t> row;  // shape without the batch dimension
};

// Prepared weights keyed by node name (+ role); shared by every plan of one executor.
struct WeightCache {
  std::map<std::string, std::shared_ptr<void>> items;
};

class ExtKernel {
 public:
  virtual ~ExtKernel() = default;
  // in[i]: the batch's rows of input i (row-major, per-row shape from build); out: room for rows.
  virtual void run(int64_t rows, const std::vector<const void*>& in, void* out) = 0;
};

extern const char* const kExtOps;  // names, for error messages
bool is_ext_op(const std::string& op);
// Validates node `n` against its inputs' per-row shapes, sets `out`, returns the kernel.
// Throws ValueError / TypeError naming the node on bad shapes or attributes.
std::unique_ptr<ExtKernel> build_ext(const Model& m, const Node& n, const std::vector<ExtValue>& in, ExtValue& out,
                                     WeightCache& cache);

namespace ext {
// Builders of the op families (ops_tensor.cc, ops_attention.cc, ops_rnn.cc); nullptr: not this family.
std::unique_ptr<ExtKernel> build_tensor_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                           ExtValue& out, WeightCache& cache);
std::unique_ptr<ExtKernel> build_attention_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                              ExtValue& out, WeightCache& cache);
std::unique_ptr<ExtKernel> build_rnn_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                        ExtValue& out, WeightCache& cache);

// Shared helpers for the builders.
std::string where(const Node& n);
std::string shape_str(const std::vector<int64_t>& s);
int64_t attr_int(const Node& n, const char* key, int64_t def, bool required = false);
double attr_num(const Node& n, const char* key, double def);
bool has_attr(const Node& n, const char* key);
std::vector<int64_t> attr_ints(const Node& n, const char* key);
std::string attr_str(const Node& n, const char* key, const std::string& def);
// A float32 parameter of `n` with the given shape (empty: any); nullptr when absent and not required.
const float* param_f32(const Model& m, const Node& n, const char* role, const std::vector<int64_t>& shape,
                       bool required, std::vector<int64_t>* shape_out = nullptr);
int64_t numel(const std::vector<int64_t>& row, const Node& n);  // checked product
// y = act(y + r) over n floats (conv + residual epilogue); ReLU keeps NaN as torch does.
void residual_act(float* y, const float* r, int64_t n, int act);
// Full-rank index of a per-row dim: `dim` counts the batch as 0 and may be negative.
int64_t full_dim(const Node& n, int64_t dim, size_t row_rank, const char* what);
}  // namespace ext

}  // namespace aimass::runtime
