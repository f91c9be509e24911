// Tensor-manipulation extension ops: matmul between activations (batched,
// broadcast), permute, concat, slice, reduce, where, compare, cast, positions.
// NaN/inf flow through as torch lets them: comparisons with NaN are false (ne is
// true), max/min reductions propagate NaN, where() copies the chosen operand.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <numeric>

#include "aimass/blas.h"
#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "runtime/ext_ops.h"

namespace aimass::runtime {

const char* const kExtOps =
    "matmul, permute, concat, slice, reduce, where, compare, cast, positions, sdpa, lstm, gru";

bool is_ext_op(const std::string& op) {
  static const char* names[] = {"matmul", "permute", "concat", "slice", "reduce", "where", "compare",
                                "cast",   "positions", "sdpa", "lstm",  "gru"};
  for (const char* n : names)
    if (op == n) return true;
  return false;
}

std::unique_ptr<ExtKernel> build_ext(const Model& m, const Node& n, const std::vector<ExtValue>& in, ExtValue& out,
                                     WeightCache& cache) {
  if (auto k = ext::build_tensor_op(m, n, in, out, cache)) return k;
  if (auto k = ext::build_attention_op(m, n, in, out, cache)) return k;
  if (auto k = ext::build_rnn_op(m, n, in, out, cache)) return k;
  throw ValueError(detail::concat(m.path(), ": node '", n.name, "': op '", n.op, "' is not supported"));
}

namespace ext {

std::string where(const Node& n) { return "node '" + n.name + "' (" + n.op + ")"; }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

bool has_attr(const Node& n, const char* key) { return n.attrs.count(key) != 0; }

int64_t attr_int(const Node& n, const char* key, int64_t def, bool required) {
  auto it = n.attrs.find(key);
  if (it == n.attrs.end()) {
    AIMASS_CHECK(!required, ValueError, where(n), " lacks attribute '", key, "'");
    return def;
  }
  AIMASS_CHECK(it->second.size() == 1, ValueError, where(n), ": attribute '", key, "' must be one number");
  return checked::to_int64<ValueError>(it->second[0], where(n) + " attribute '" + key + "'");
}

double attr_num(const Node& n, const char* key, double def) {
  auto it = n.attrs.find(key);
  if (it == n.attrs.end()) return def;
  AIMASS_CHECK(it->second.size() == 1, ValueError, where(n), ": attribute '", key, "' must be one number");
  return it->second[0];
}

std::vector<int64_t> attr_ints(const Node& n, const char* key) {
  auto it = n.attrs.find(key);
  AIMASS_CHECK(it != n.attrs.end(), ValueError, where(n), " lacks attribute '", key, "'");
  std::vector<int64_t> out;
  for (double d : it->second) out.push_back(checked::to_int64<ValueError>(d, where(n) + " attribute '" + key + "'"));
  return out;
}

std::string attr_str(const Node& n, const char* key, const std::string& def) {
  auto it = n.str_attrs.find(key);
  return it == n.str_attrs.end() ? def : it->second;
}

const float* param_f32(const Model& m, const Node& n, const char* role, const std::vector<int64_t>& shape,
                       bool required, std::vector<int64_t>* shape_out) {
  auto it = n.params.find(role);
  if (it == n.params.end()) {
    AIMASS_CHECK(!required, ValueError, where(n), " lacks its '", role, "' tensor");
    return nullptr;
  }
  const StoredTensor& t = m.tensor(it->second);
  AIMASS_CHECK(t.dtype == "F32", TypeError, where(n), ": tensor '", it->second, "' (", role, ") has dtype ", t.dtype,
               "; expected F32 (or F16/BF16)");
  AIMASS_CHECK(shape.empty() || t.shape == shape, ValueError, where(n), ": tensor '", it->second, "' (", role,
               ") has shape ", shape_str(t.shape), ", expected ", shape_str(shape));
  if (shape_out) *shape_out = t.shape;
  return static_cast<const float*>(t.data);
}

int64_t numel(const std::vector<int64_t>& row, const Node& n) {
  return static_cast<int64_t>(checked::product<ValueError>(row, where(n) + " shape " + shape_str(row)));
}

int64_t full_dim(const Node& n, int64_t dim, size_t row_rank, const char* what) {
  const int64_t r = static_cast<int64_t>(row_rank) + 1;
  if (dim < 0) dim += r;
  AIMASS_CHECK(dim >= 1 && dim < r, ValueError, where(n), ": ", what, " ", dim,
               " must index a non-batch dimension of a rank-", r, " value");
  return dim;
}

void residual_act(float* y, const float* r, int64_t n, int act) {
  const bool relu = act == 1;  // ops::Act::Relu
  parallel_for(0, n, 1 << 15, [&](int64_t b, int64_t e) {
    if (relu) {
      for (int64_t i = b; i < e; ++i) {
        const float v = y[i] + r[i];
        y[i] = (v > 0.f || v != v) ? v : 0.f;
      }
    } else {
      for (int64_t i = b; i < e; ++i) y[i] += r[i];
    }
  });
}

}  // namespace ext

namespace {
using namespace ext;

constexpr int64_t kGrain = 16384;

// Contiguous strides of a full shape.
std::vector<int64_t> strides_of(const std::vector<int64_t>& shape) {
  std::vector<int64_t> st(shape.size(), 1);
  for (int i = static_cast<int>(shape.size()) - 2; i >= 0; --i) st[i] = st[i + 1] * shape[i + 1];
  return st;
}

// ---------------------------------------------------------------- matmul
// out[R, b.., M, N] = a[R, a.., M, K] @ b[R, b.., K, N] (or b^T with trans_b), batch dims broadcast.
class MatMul : public ExtKernel {
 public:
  std::vector<int64_t> a_row, b_row, o_row;
  int64_t M = 0, N = 0, K = 0;
  bool trans_b = false;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const float* A = static_cast<const float*>(in[0]);
    const float* B = static_cast<const float*>(in[1]);
    float* C = static_cast<float*>(out);
    const size_t nb = o_row.size() - 2;  // batch dims inside the row
    std::vector<int64_t> ob(nb), as(nb), bs(nb);
    int64_t a_mat = M * K, b_mat = K * N, outer = 1;
    {
      int64_t sa = a_mat, sb = b_mat;
      for (int i = static_cast<int>(nb) - 1; i >= 0; --i) {
        ob[i] = o_row[i];
        as[i] = a_row[i] == 1 ? 0 : sa;
        bs[i] = b_row[i] == 1 ? 0 : sb;
        sa *= a_row[i];
        sb *= b_row[i];
        outer *= o_row[i];
      }
    }
    const int64_t a_rowsz = std::accumulate(a_row.begin(), a_row.end(), int64_t{1}, std::multiplies<>());
    const int64_t b_rowsz = std::accumulate(b_row.begin(), b_row.end(), int64_t{1}, std::multiplies<>());
    const int64_t total = rows * outer;
    const int64_t flops = M * N * K;
    parallel_for(0, total, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(flops, 1)), [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r = t / outer;
        int64_t rem = t % outer, oa = r * a_rowsz, obb = r * b_rowsz;
        for (int i = static_cast<int>(nb) - 1; i >= 0; --i) {
          const int64_t idx = rem % ob[i];
          rem /= ob[i];
          oa += idx * as[i];
          obb += idx * bs[i];
        }
        sgemm(false, trans_b, M, N, K, 1.f, A + oa, K, B + obb, trans_b ? K : N, 0.f, C + t * M * N, N);
      }
    });
  }
};

std::unique_ptr<ExtKernel> build_matmul(const Node& n, const std::vector<ExtValue>& in, ExtValue& out) {
  AIMASS_CHECK(in.size() == 2, ValueError, where(n), " takes two inputs");
  for (const auto& v : in)
    AIMASS_CHECK(v.dtype == ValueType::Float32, TypeError, where(n), ": inputs must be float32");
  auto k = std::make_unique<MatMul>();
  k->a_row = in[0].row;
  k->b_row = in[1].row;
  k->trans_b = attr_int(n, "trans_b", 0) != 0;
  AIMASS_CHECK(k->a_row.size() >= 2 && k->a_row.size() == k->b_row.size(), ValueError, where(n),
               ": operands must have the same rank >= 3 (batch included); got rows ", shape_str(k->a_row), " and ",
               shape_str(k->b_row));
  const size_t r = k->a_row.size();
  k->M = k->a_row[r - 2];
  k->K = k->a_row[r - 1];
  const int64_t bk = k->trans_b ? k->b_row[r - 1] : k->b_row[r - 2];
  k->N = k->trans_b ? k->b_row[r - 2] : k->b_row[r - 1];
  AIMASS_CHECK(bk == k->K, ValueError, where(n), ": inner dimensions differ (", k->K, " vs ", bk, ")");
  k->o_row.resize(r);
  for (size_t i = 0; i + 2 < r; ++i) {
    const int64_t da = k->a_row[i], db = k->b_row[i];
    AIMASS_CHECK(da == db || da == 1 || db == 1, ValueError, where(n), ": batch dims of ", shape_str(k->a_row),
                 " and ", shape_str(k->b_row), " do not broadcast");
    k->o_row[i] = std::max(da, db);
  }
  k->o_row[r - 2] = k->M;
  k->o_row[r - 1] = k->N;
  numel(k->o_row, n);
  out.row = k->o_row;
  return k;
}

// ---------------------------------------------------------------- permute
class Permute : public ExtKernel {
 public:
  std::vector<int64_t> in_row, perm;  // perm over row dims
  int64_t elem = 4;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    std::vector<int64_t> shape(in_row.size() + 1), ist = strides_of([&] {
      std::vector<int64_t> s{rows};
      s.insert(s.end(), in_row.begin(), in_row.end());
      return s;
    }());
    shape[0] = rows;
    std::vector<int64_t> st(shape.size());
    st[0] = ist[0];
    for (size_t i = 0; i < perm.size(); ++i) {
      shape[i + 1] = in_row[perm[i]];
      st[i + 1] = ist[perm[i] + 1];
    }
    const int r = static_cast<int>(shape.size());
    const int64_t last = shape[r - 1], sl = st[r - 1];
    int64_t outer = 1;
    for (int i = 0; i < r - 1; ++i) outer *= shape[i];
    const uint8_t* src = static_cast<const uint8_t*>(in[0]);
    uint8_t* dst = static_cast<uint8_t*>(out);
    parallel_for(0, outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(last, 1)), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        int64_t rem = o, off = 0;
        for (int i = r - 2; i >= 0; --i) {
          off += (rem % shape[i]) * st[i];
          rem /= shape[i];
        }
        uint8_t* d = dst + o * last * elem;
        if (sl == 1) {
          std::memcpy(d, src + off * elem, last * elem);
        } else if (elem == 4) {
          const float* s = reinterpret_cast<const float*>(src) + off;
          float* df = reinterpret_cast<float*>(d);
          for (int64_t j = 0; j < last; ++j) df[j] = s[j * sl];
        } else {
          for (int64_t j = 0; j < last; ++j) std::memcpy(d + j * elem, src + (off + j * sl) * elem, elem);
        }
      }
    });
  }
};

std::unique_ptr<ExtKernel> build_permute(const Node& n, const std::vector<ExtValue>& in, ExtValue& out) {
  AIMASS_CHECK(in.size() == 1, ValueError, where(n), " takes one input");
  auto perm = attr_ints(n, "perm");  // full rank, batch included
  const auto& row = in[0].row;
  AIMASS_CHECK(perm.size() == row.size() + 1 && perm[0] == 0, ValueError, where(n), ": perm ", shape_str(perm),
               " must list all ", row.size() + 1, " dims and keep the batch dim (0) first");
  std::vector<bool> seen(perm.size(), false);
  auto k = std::make_unique<Permute>();
  k->in_row = row;
  k->elem = in[0].dtype == ValueType::Int64 ? 8 : 4;
  out.row.clear();
  for (size_t i = 1; i < perm.size(); ++i) {
    AIMASS_CHECK(perm[i] >= 1 && perm[i] <= static_cast<int64_t>(row.size()) && !seen[perm[i]], ValueError,
                 where(n), ": perm ", shape_str(perm), " is not a permutation");
    seen[perm[i]] = true;
    k->perm.push_back(perm[i] - 1);
    out.row.push_back(row[perm[i] - 1]);
  }
  out.dtype = in[0].dtype;
  return k;
}

// ---------------------------------------------------------------- concat
class Concat : public ExtKernel {
 public:
  std::vector<int64_t> chunk;  // bytes per input per outer index
  int64_t outer_row = 1, total = 0;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const int64_t outer = rows * outer_row;
    uint8_t* dst = static_cast<uint8_t*>(out);
    parallel_for(0, outer, std::max<int64_t>(1, (kGrain * 4) / std::max<int64_t>(total, 1)), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o) {
        uint8_t* d = dst + o * total;
        for (size_t i = 0; i < chunk.size(); ++i) {
          std::memcpy(d, static_cast<const uint8_t*>(in[i]) + o * chunk[i], chunk[i]);
          d += chunk[i];
        }
      }
    });
  }
};

std::unique_ptr<ExtKernel> build_concat(const Node& n, const std::vector<ExtValue>& in, ExtValue& out) {
  AIMASS_CHECK(!in.empty(), ValueError, where(n), " needs at least one input");
  const auto& r0 = in[0].row;
  const int64_t d = full_dim(n, attr_int(n, "dim", 0, true), r0.size(), "dim") - 1;
  auto k = std::make_unique<Concat>();
  const int64_t elem = in[0].dtype == ValueType::Int64 ? 8 : 4;
  out.row = r0;
  out.row[d] = 0;
  for (const auto& v : in) {
    AIMASS_CHECK(v.dtype == in[0].dtype && v.row.size() == r0.size(), ValueError, where(n),
                 ": inputs must share dtype and rank");
    for (size_t i = 0; i < r0.size(); ++i)
      AIMASS_CHECK(static_cast<int64_t>(i) == d || v.row[i] == r0[i], ValueError, where(n), ": input rows ",
                   shape_str(r0), " and ", shape_str(v.row), " differ outside dim ", d + 1);
    int64_t inner = elem;
    for (size_t i = d; i < v.row.size(); ++i) inner = checked::mul<ValueError>(inner, v.row[i], where(n));
    k->chunk.push_back(inner);
    k->total += inner;
    out.row[d] += v.row[d];
  }
  for (int64_t i = 0; i < d; ++i) k->outer_row *= r0[i];
  out.dtype = in[0].dtype;
  return k;
}

// ---------------------------------------------------------------- slice
class Slice : public ExtKernel {
 public:
  int64_t outer_row = 1, dim_in = 0, dim_out = 0, inner = 1, start = 0, step = 1, elem = 4;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const uint8_t* src = static_cast<const uint8_t*>(in[0]);
    uint8_t* dst = static_cast<uint8_t*>(out);
    const int64_t outer = rows * outer_row, ib = inner * elem;
    parallel_for(0, outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(dim_out * inner, 1)), [&](int64_t o0, int64_t o1) {
      for (int64_t o = o0; o < o1; ++o)
        for (int64_t j = 0; j < dim_out; ++j)
          std::memcpy(dst + (o * dim_out + j) * ib, src + (o * dim_in + start + j * step) * ib, ib);
    });
  }
};

std::unique_ptr<ExtKernel> build_slice(const Node& n, const std::vector<ExtValue>& in, ExtValue& out) {
  AIMASS_CHECK(in.size() == 1, ValueError, where(n), " takes one input");
  const auto& row = in[0].row;
  const int64_t d = full_dim(n, attr_int(n, "dim", 0, true), row.size(), "dim") - 1;
  const int64_t size = row[d];
  int64_t start = attr_int(n, "start", 0), end = attr_int(n, "end", std::numeric_limits<int64_t>::max());
  const int64_t step = attr_int(n, "step", 1);
  AIMASS_CHECK(step >= 1, ValueError, where(n), ": step ", step, " must be >= 1");
  // Python slice semantics: negative from the end, clamped to [0, size].
  if (start < 0) start = std::max<int64_t>(0, start + size);
  if (end < 0) end = std::max<int64_t>(0, end + size);
  start = std::min(start, size);
  end = std::min(end, size);
  const int64_t len = end > start ? (end - start + step - 1) / step : 0;
  AIMASS_CHECK(len >= 1, ValueError, where(n), ": the slice [", start, ":", end, ":", step, "] of dim ", d + 1,
               " (size ", size, ") is empty");
  auto k = std::make_unique<Slice>();
  k->elem = in[0].dtype == ValueType::Int64 ? 8 : 4;
  for (int64_t i = 0; i < d; ++i) k->outer_row *= row[i];
  for (size_t i = d + 1; i < row.size(); ++i) k->inner *= row[i];
  k->dim_in = size;
  k->dim_out = len;
  k->start = start;
  k->step = step;
  out.row = row;
  out.row[d] = len;
  out.dtype = in[0].dtype;
  return k;
}

// ---------------------------------------------------------------- reduce
enum class Red { Sum, Mean, Max, Min };

class Reduce : public ExtKernel {
 public:
  std::vector<int64_t> row;       // input row
  std::vector<bool> reduced;      // per row dim
  Red kind = Red::Sum;
  int64_t count = 1;              // elements per output
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const float* x = static_cast<const float*>(in[0]);
    float* y = static_cast<float*>(out);
    // kept dims (batch first) and reduced dims with their input strides
    std::vector<int64_t> full{rows};
    full.insert(full.end(), row.begin(), row.end());
    auto st = strides_of(full);
    std::vector<int64_t> ks{full[0]}, kst{st[0]}, rs, rst;
    for (size_t i = 0; i < row.size(); ++i) {
      if (reduced[i]) { rs.push_back(full[i + 1]); rst.push_back(st[i + 1]); }
      else { ks.push_back(full[i + 1]); kst.push_back(st[i + 1]); }
    }
    int64_t nout = 1;
    for (auto v : ks) nout *= v;
    parallel_for(0, nout, std::max<int64_t>(1, kGrain / std::max<int64_t>(count, 1)), [&](int64_t o0, int64_t o1) {
      std::vector<int64_t> idx(rs.size());
      for (int64_t o = o0; o < o1; ++o) {
        int64_t rem = o, base = 0;
        for (int i = static_cast<int>(ks.size()) - 1; i >= 0; --i) {
          base += (rem % ks[i]) * kst[i];
          rem /= ks[i];
        }
        double acc = kind == Red::Max ? -INFINITY : kind == Red::Min ? INFINITY : 0.0;
        bool nan = false;
        std::fill(idx.begin(), idx.end(), 0);
        for (int64_t c = 0; c < count; ++c) {
          int64_t off = base;
          for (size_t i = 0; i < rs.size(); ++i) off += idx[i] * rst[i];
          const float v = x[off];
          if (kind == Red::Max) { if (v != v) nan = true; else if (v > acc) acc = v; }
          else if (kind == Red::Min) { if (v != v) nan = true; else if (v < acc) acc = v; }
          else acc += v;
          for (int i = static_cast<int>(rs.size()) - 1; i >= 0; --i) {
            if (++idx[i] < rs[i]) break;
            idx[i] = 0;
          }
        }
        if (kind == Red::Mean) acc /= static_cast<double>(count);
        y[o] = nan ? std::numeric_limits<float>::quiet_NaN() : static_cast<float>(acc);
      }
    });
  }
};

std::unique_ptr<ExtKernel> build_reduce(const Node& n, const std::vector<ExtValue>& in, ExtValue& out) {
  AIMASS_CHECK(in.size() == 1 && in[0].dtype == ValueType::Float32, ValueError, where(n),
               " takes one float32 input");
  auto k = std::make_unique<Reduce>();
  const std::string kind = attr_str(n, "kind", "sum");
  if (kind == "sum") k->kind = Red::Sum;
  else if (kind == "mean") k->kind = Red::Mean;
  else if (kind == "max") k->kind = Red::Max;
  else if (kind == "min") k->kind = Red::Min;
  else throw ValueError(detail::concat(where(n), ": kind '", kind, "' must be sum, mean, max or min"));
  k->row = in[0].row;
  k->reduced.assign(k->row.size(), false);
  for (int64_t d : attr_ints(n, "dims")) {
    const int64_t fd = full_dim(n, d, k->row.size(), "dim") - 1;
    AIMASS_CHECK(!k->reduced[fd], ValueError, where(n), ": dim ", d, " listed twice");
    k->reduced[fd] = true;
  }
  const bool keep = attr_int(n, "keepdim", 0) != 0;
  out.row.clear();
  for (size_t i = 0; i < k->row.size(); ++i) {
    if (k->reduced[i]) {
      k->count *= k->row[i];
      if (keep) out.row.push_back(1);
    } else {
      out.row.push_back(k->row[i]);
    }
  }
  return k;
}

// ------------------------------------------------- elementwise with broadcasting
// Operands: graph values (batched), stored tensors or scalars; numpy broadcasting, batch first.
struct Operand {
  int input = -1;  // index into the kernel's inputs
  const float* cst = nullptr;
  float scalar = 0;
  std::vector<int64_t> full;  // batched values: full[0] = -1
};

class Elementwise : public ExtKernel {
 public:
  std::vector<Operand> ops;
  std::vector<int64_t> out_full;  // out_full[0] = -1
  virtual void apply(const float* const* v, int64_t n, const int64_t* stride, float* y) = 0;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    std::vector<int64_t> shape = out_full;
    shape[0] = rows;
    const int r = static_cast<int>(shape.size());
    const size_t k = ops.size();
    std::vector<std::vector<int64_t>> st(k, std::vector<int64_t>(r, 0));
    std::vector<const float*> base(k);
    for (size_t i = 0; i < k; ++i) {
      const Operand& o = ops[i];
      if (o.input < 0 && !o.cst) {
        base[i] = &o.scalar;
        continue;
      }
      base[i] = o.input >= 0 ? static_cast<const float*>(in[o.input]) : o.cst;
      int64_t acc = 1;
      for (size_t j = 0; j < o.full.size(); ++j) {
        const size_t src = o.full.size() - 1 - j, dst = r - 1 - j;
        const int64_t dd = o.full[src] < 0 ? rows : o.full[src];
        st[i][dst] = dd == 1 ? 0 : acc;
        acc *= dd;
      }
    }
    const int64_t last = shape[r - 1];
    int64_t outer = 1;
    for (int i = 0; i < r - 1; ++i) outer *= shape[i];
    float* y = static_cast<float*>(out);
    parallel_for(0, outer, std::max<int64_t>(1, kGrain / std::max<int64_t>(last, 1)), [&](int64_t o0, int64_t o1) {
      std::vector<const float*> p(k);
      std::vector<int64_t> ls(k);
      for (size_t i = 0; i < k; ++i) ls[i] = st[i][r - 1];
      for (int64_t o = o0; o < o1; ++o) {
        for (size_t i = 0; i < k; ++i) p[i] = base[i];
        int64_t rem = o;
        for (int d = r - 2; d >= 0; --d) {
          const int64_t idx = rem % shape[d];
          rem /= shape[d];
          for (size_t i = 0; i < k; ++i) p[i] += idx * st[i][d];
        }
        apply(p.data(), last, ls.data(), y + o * last);
      }
    });
  }
};

enum class Cmp { Eq, Ne, Lt, Le, Gt, Ge };

class Compare : public Elementwise {
 public:
  Cmp cmp = Cmp::Eq;
  void apply(const float* const* v, int64_t n, const int64_t* s, float* y) override {
    const float* a = v[0];
    const float* b = v[1];
    for (int64_t j = 0; j < n; ++j) {
      const float x = a[j * s[0]], z = b[j * s[1]];
      bool r;
      switch (cmp) {
        case Cmp::Eq: r = x == z; break;
        case Cmp::Ne: r = x != z; break;
        case Cmp::Lt: r = x < z; break;
        case Cmp::Le: r = x <= z; break;
        case Cmp::Gt: r = x > z; break;
        default: r = x >= z; break;
      }
      y[j] = r ? 1.f : 0.f;
    }
  }
};

class Where : public Elementwise {
 public:
  void apply(const float* const* v, int64_t n, const int64_t* s, float* y) override {
    for (int64_t j = 0; j < n; ++j) y[j] = v[0][j * s[0]] != 0.f ? v[1][j * s[1]] : v[2][j * s[2]];
  }
};

// Fills `k.ops` from the node: operand names in `roles`, each a graph input (in order),
// a stored tensor (params[role]) or a scalar (attrs[role + "_scalar"]).
void build_operands(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                    const std::vector<const char*>& roles, Elementwise& k, ExtValue& out) {
  size_t next = 0;
  size_t rank = 0;
  for (const char* role : roles) {
    Operand o;
    const std::string sk = std::string(role) + "_scalar";
    if (n.attrs.count(sk)) {
      o.scalar = static_cast<float>(attr_num(n, sk.c_str(), 0));
    } else if (n.params.count(role)) {
      o.cst = param_f32(m, n, role, {}, true, &o.full);
    } else {
      AIMASS_CHECK(next < in.size(), ValueError, where(n), ": operand '", role, "' is neither an input, a tensor "
                   "nor a scalar");
      AIMASS_CHECK(in[next].dtype == ValueType::Float32, TypeError, where(n), ": operand '", role,
                   "' must be float32 (cast int64 values first)");
      o.input = static_cast<int>(next);
      o.full = in[next].row;
      o.full.insert(o.full.begin(), -1);
      ++next;
      AIMASS_CHECK(rank == 0 || rank == o.full.size(), ValueError, where(n),
                   ": graph operands must have the same rank (the batch dimension stays first)");
      rank = o.full.size();
    }
    k.ops.push_back(std::move(o));
  }
  AIMASS_CHECK(next == in.size() && next >= 1, ValueError, where(n),
               " needs at least one graph input and no more than its operands");
  k.out_full.assign(rank, 1);
  k.out_full[0] = -1;
  for (const Operand& o : k.ops) {
    if (o.input < 0 && !o.cst) continue;
    AIMASS_CHECK(o.full.size() <= rank, ValueError, where(n), ": a constant operand of shape ", shape_str(o.full),
                 " has more dims than the graph operands");
    for (size_t j = 0; j < o.full.size(); ++j) {
      const size_t dst = rank - 1 - j;
      const int64_t d = o.full[o.full.size() - 1 - j];
      if (dst == 0) {
        AIMASS_CHECK(d == -1 || d == 1, ValueError, where(n),
                     ": a constant operand must have size 1 in the batch dimension");
        continue;
      }
      int64_t& od = k.out_full[dst];
      AIMASS_CHECK(od == 1 || d == 1 || od == d, ValueError, where(n), ": operand shapes do not broadcast (",
                   shape_str(o.full), ")");
      if (d != 1) od = d;
    }
  }
  if (rank == 1) {  // [B] only: give the kernel a last dim
    k.out_full.push_back(1);
    for (Operand& o : k.ops)
      if (o.input >= 0) o.full.push_back(1);
  }
  out.row.assign(k.out_full.begin() + 1, k.out_full.end());
  if (rank == 1) out.row.pop_back();
  numel(out.row, n);
}

// ---------------------------------------------------------------- cast / positions
class Cast : public ExtKernel {
 public:
  int64_t n_row = 0;
  bool to_float = true;
  ValueType from = ValueType::Float32;
  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const int64_t n = rows * n_row;
    if (from == ValueType::Int64 && to_float) {
      const int64_t* s = static_cast<const int64_t*>(in[0]);
      float* d = static_cast<float*>(out);
      for (int64_t i = 0; i < n; ++i) d[i] = static_cast<float>(s[i]);
    } else if (from == ValueType::Float32 && !to_float) {
      const float* s = static_cast<const float*>(in[0]);
      int64_t* d = static_cast<int64_t*>(out);
      for (int64_t i = 0; i < n; ++i) {
        const float v = s[i];
        d[i] = std::isfinite(v) && std::fabs(v) < 9.2e18f ? static_cast<int64_t>(v)
                                                          : std::numeric_limits<int64_t>::min();
      }
    } else {
      std::memcpy(out, in[0], n * (to_float ? 4 : 8));
    }
  }
};

class Positions : public ExtKernel {
 public:
  int64_t len = 0, offset = 0;
  void run(int64_t rows, const std::vector<const void*>&, void* out) override {
    int64_t* d = static_cast<int64_t*>(out);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < len; ++i) d[r * len + i] = offset + i;
  }
};

}  // namespace

namespace ext {

std::unique_ptr<ExtKernel> build_tensor_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                           ExtValue& out, WeightCache&) {
  if (n.op == "matmul") return build_matmul(n, in, out);
  if (n.op == "permute") return build_permute(n, in, out);
  if (n.op == "concat") return build_concat(n, in, out);
  if (n.op == "slice") return build_slice(n, in, out);
  if (n.op == "reduce") return build_reduce(n, in, out);
  if (n.op == "compare") {
    auto k = std::make_unique<Compare>();
    const std::string c = attr_str(n, "kind", "");
    if (c == "eq") k->cmp = Cmp::Eq;
    else if (c == "ne") k->cmp = Cmp::Ne;
    else if (c == "lt") k->cmp = Cmp::Lt;
    else if (c == "le") k->cmp = Cmp::Le;
    else if (c == "gt") k->cmp = Cmp::Gt;
    else if (c == "ge") k->cmp = Cmp::Ge;
    else throw ValueError(detail::concat(where(n), ": kind '", c, "' must be eq, ne, lt, le, gt or ge"));
    build_operands(m, n, in, {"a", "b"}, *k, out);
    return k;
  }
  if (n.op == "where") {
    auto k = std::make_unique<Where>();
    build_operands(m, n, in, {"cond", "a", "b"}, *k, out);
    return k;
  }
  if (n.op == "cast") {
    AIMASS_CHECK(in.size() == 1, ValueError, where(n), " takes one input");
    auto k = std::make_unique<Cast>();
    const std::string to = attr_str(n, "to", "float32");
    AIMASS_CHECK(to == "float32" || to == "int64", ValueError, where(n), ": 'to' must be float32 or int64");
    k->to_float = to == "float32";
    k->from = in[0].dtype;
    k->n_row = numel(in[0].row, n);
    out.row = in[0].row;
    out.dtype = k->to_float ? ValueType::Float32 : ValueType::Int64;
    return k;
  }
  if (n.op == "positions") {
    AIMASS_CHECK(in.size() == 1, ValueError, where(n), " takes one input (whose length it counts)");
    auto k = std::make_unique<Positions>();
    const int64_t d = full_dim(n, attr_int(n, "dim", 1), in[0].row.size(), "dim") - 1;
    k->len = in[0].row[d];
    k->offset = attr_int(n, "offset", 0);
    out.row = {k->len};
    out.dtype = ValueType::Int64;
    return k;
  }
  return nullptr;
}

}  // namespace ext
}  // namespace aimass::runtime
