// Plan building and execution. The plan is built once per model: values get
// per-row shapes (the batch dimension is the only dynamic one, so shapes for
// any batch size follow by multiplication), activations are fused into the
// GEMM/conv before them, and every value gets a slot in one arena sized for
// `capacity` rows. execute() only indexes into that arena.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <ctime>
#include <limits>
#include <cstring>
#include <map>
#include <numeric>
#include <set>

#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include "runtime/ext_ops.h"
#include "runtime/ops.h"
#include "runtime/ops_conv.h"
#include "runtime/qlinear_bridge.h"
#include "env_switch.h"

namespace aimass::runtime {

namespace {

enum class Kind { Linear, QLinear, Conv2d, MaxPool, AvgPool, AdaptiveAvgPool, Alias, Activation, Softmax,
                  LogSoftmax, LayerNorm, Embedding, Binary, ChannelAffine, Ext };

struct ValueInfo {
  ValueType dtype = ValueType::Float32;
  std::vector<int64_t> row;  // shape without the batch dimension
  int slot = -1;
  int64_t row_numel() const { return std::accumulate(row.begin(), row.end(), int64_t{1}, std::multiplies<>()); }
  int64_t row_bytes() const { return row_numel() * (dtype == ValueType::Int64 ? 8 : 4); }
};

struct Step {
  Kind kind;
  std::string where;
  int in0 = -1, in1 = -1, out = -1;
  const float* w = nullptr;
  const float* b = nullptr;
  const float* b2 = nullptr;
  ops::Act act = ops::Act::None;
  int64_t K = 0, N = 0, D = 0, V = 0, inner = 0, axis = 0;  // meaning depends on kind
  double eps = 0;
  ops::Conv2dShape conv{};
  ops::Pool2dShape pool{};
  ops::BinOp binop = ops::BinOp::Add;
  float a_scalar = 0, b_scalar = 0;
  bool a_is_scalar = false, b_is_scalar = false;
  const float* a_const = nullptr;
  const float* b_const = nullptr;
  std::vector<int64_t> out_shape, a_strides, b_strides;  // full shapes; [0] patched to rows
  bool a_batched = false, b_batched = false;
  std::shared_ptr<QLinearWeights> q;
  std::shared_ptr<ops::PackedLinear> packed;  // fp32 Linear weights in the small-M kernel's layout
  std::shared_ptr<ExtKernel> ext;  // extension ops (runtime/ext_ops.h)
  std::shared_ptr<conv::PackedConv> pconv;  // Conv2d (groups 1): weights packed for runtime/ops_conv.h
  int res = -1;  // Conv2d: residual value added before the activation (fused `conv + x`); Linear: added
                 // after it (fused `x + linear(..)`)
  std::vector<int> ext_in;
};

const char* kSupportedOps =
    "linear, conv2d, max_pool2d, avg_pool2d, adaptive_avg_pool2d, reshape, identity, activation, softmax, "
    "log_softmax, layer_norm, embedding, add, sub, mul, div, channel_affine, matmul, permute, concat, slice, "
    "reduce, where, compare, cast, positions, sdpa, lstm, gru";

// An integer attribute from the graph JSON (a double there): an exact integer in
// [-kMaxDim, kMaxDim], else ValueError naming the node (never a UB double -> int64 cast).
int64_t attr_value(const Node& n, const char* key, double d) {
  const std::string what = detail::concat("node '", n.name, "' (", n.op, "): attribute '", key, "'");
  const int64_t v = checked::to_int64<ValueError>(d, what);
  AIMASS_CHECK(v >= -kMaxDim && v <= kMaxDim, ValueError, what, " is ", v, "; it must be in [-", kMaxDim, ", ",
               kMaxDim, "]");
  return v;
}

int64_t attr_int(const Node& n, const char* key, int64_t def, bool required = false) {
  auto it = n.attrs.find(key);
  if (it == n.attrs.end()) {
    AIMASS_CHECK(!required, ValueError, "node '", n.name, "' (", n.op, ") lacks attribute '", key, "'");
    return def;
  }
  AIMASS_CHECK(it->second.size() == 1, ValueError, "node '", n.name, "': attribute '", key, "' must be one number");
  return attr_value(n, key, it->second[0]);
}

// A float attribute that must be one number (eps, a scalar operand).
double attr_float(const Node& n, const char* key, double def) {
  auto it = n.attrs.find(key);
  if (it == n.attrs.end()) return def;
  AIMASS_CHECK(it->second.size() == 1, ValueError, "node '", n.name, "': attribute '", key, "' must be one number");
  return it->second[0];
}

std::vector<int64_t> attr_ints(const Node& n, const char* key, size_t len) {
  auto it = n.attrs.find(key);
  AIMASS_CHECK(it != n.attrs.end(), ValueError, "node '", n.name, "' (", n.op, ") lacks attribute '", key, "'");
  AIMASS_CHECK(it->second.size() <= kMaxRank, ValueError, "node '", n.name, "': attribute '", key, "' has ",
               it->second.size(), " values; at most ", kMaxRank);
  std::vector<int64_t> out;
  for (double d : it->second) out.push_back(attr_value(n, key, d));
  if (len && out.size() == 1) out.assign(len, out[0]);
  AIMASS_CHECK(!len || out.size() == len, ValueError, "node '", n.name, "': attribute '", key, "' must have ", len,
               " values");
  return out;
}

const float* f32_param(const Model& m, const Node& n, const char* role, const std::vector<int64_t>& shape,
                       bool required) {
  auto it = n.params.find(role);
  if (it == n.params.end()) {
    AIMASS_CHECK(!required, ValueError, "node '", n.name, "' (", n.op, ") lacks its '", role, "' tensor");
    return nullptr;
  }
  const StoredTensor& t = m.tensor(it->second);
  AIMASS_CHECK(t.dtype == "F32", TypeError, "node '", n.name, "': tensor '", it->second, "' (", role,
               ") has dtype ", t.dtype, "; expected F32 (or F16/BF16)");
  if (!shape.empty()) {
    AIMASS_CHECK(t.shape == shape, ValueError, "node '", n.name, "': tensor '", it->second, "' (", role,
                 ") has the wrong shape for its input");
  }
  return static_cast<const float*>(t.data);
}

std::string shape_str(const std::vector<int64_t>& s) {
  std::string o = "[";
  for (size_t i = 0; i < s.size(); ++i) o += (i ? ", " : "") + std::to_string(s[i]);
  return o + "]";
}

// Output size of a conv/pool window along one dim, torch's formula, overflow-checked:
// (in + 2 pad - dil (k - 1) - 1) / stride + 1; ValueError when the window does not fit.
int64_t window_out(int64_t in, int64_t pad, int64_t dil, int64_t k, int64_t stride, const std::string& where) {
  AIMASS_CHECK(k >= 1 && stride >= 1 && dil >= 1 && pad >= 0, ValueError, where,
               ": kernel/stride/dilation must be >= 1 and padding >= 0 (kernel ", k, ", stride ", stride,
               ", dilation ", dil, ", padding ", pad, ")");
  const int64_t span = checked::add<ValueError>(checked::mul<ValueError>(dil, k - 1, where + ": dilation x kernel"),
                                                int64_t{1}, where);
  const int64_t padded = checked::add<ValueError>(in, checked::mul<ValueError>(pad, int64_t{2}, where), where);
  AIMASS_CHECK(span <= padded, ValueError, where, ": window of ", span, " is larger than the padded input ", padded);
  return (padded - span) / stride + 1;
}

}  // namespace

struct PlanImpl {
  std::vector<ValueInfo> values;
  std::map<std::string, int> index;
  std::vector<Step> steps;
  std::vector<int> input_values, output_values;
  std::vector<int64_t> slot_row_bytes;  // padded to 64 bytes
  std::vector<int64_t> slot_prefix;     // bytes per row before the slot
  int64_t total_row_bytes = 0;
  int64_t capacity = 0;
  int64_t max_memory = 0;  // ExecutorOptions::max_memory_bytes (0: no cap)
  void* arena = nullptr;
  std::vector<float> col;  // im2col scratch, one sample
  std::vector<const void*> ext_ptrs;
  // Row chains (build_row_chains): chain_end[i] is the last step of the planned chain that holds
  // step i (-1: none); chain_tok[i] the rows of its [T, F] operands per batch row.
  std::vector<int> chain_end;
  std::vector<int64_t> chain_tok;
  // AIMASS_PROFILE_STEPS=1: wall ns and calls per step, printed to stderr when the plan goes.
  bool profile = false;
  std::vector<int> prof_chain_last;  // the last step of a row chain timed as step i (-1: none)
  // wall (sum, fastest call), calling thread's CPU (sum, fastest call), calls
  std::vector<int64_t> prof_ns, prof_wall_min_ns, prof_cpu_ns, prof_min_ns, prof_calls;
  ~PlanImpl();

  uint8_t* ptr(int v) const {
    return static_cast<uint8_t*>(arena) + slot_prefix[values[v].slot] * capacity;
  }
  float* fptr(int v) const { return reinterpret_cast<float*>(ptr(v)); }
};

namespace {
int64_t thread_cpu_ns() {
  timespec ts{};
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<int64_t>(ts.tv_sec) * 1000000000 + ts.tv_nsec;
}

const char* kind_name(Kind k) {
  static const char* names[] = {"linear", "qlinear", "conv2d", "max_pool", "avg_pool", "adaptive_pool", "alias",
                                "activation", "softmax", "log_softmax", "layer_norm", "embedding", "binary",
                                "channel_affine", "ext"};
  return names[static_cast<int>(k)];
}
}  // namespace

PlanImpl::~PlanImpl() {
  if (profile && !prof_calls.empty()) {
    int64_t total = 0, total_cpu = 0;
    for (auto v : prof_ns) total += v;
    for (auto v : prof_cpu_ns) total_cpu += v;
    std::fprintf(stderr, "aimass step profile (%zu steps, %.3f ms wall, %.3f ms CPU of the calling thread):\n",
                 steps.size(), total * 1e-6, total_cpu * 1e-6);
    for (size_t i = 0; i < steps.size(); ++i) {
      if (!prof_calls[i]) continue;
      const Step& s = steps[i];
      std::string shape;
      for (auto d : values[s.out].row) shape += (shape.empty() ? "" : "x") + std::to_string(d);
      std::fprintf(stderr,
                   "  %3zu %-14s %-44s out %-12s calls %6lld  wall %9.3f ms %5.1f%%  cpu %9.3f ms %5.1f%%  "
                   "min %8.3f ms  wall min %8.3f ms%s\n",
                   i, kind_name(s.kind), s.where.c_str(), shape.c_str(), static_cast<long long>(prof_calls[i]),
                   prof_ns[i] * 1e-6, total ? 100.0 * prof_ns[i] / total : 0.0, prof_cpu_ns[i] * 1e-6,
                   total_cpu ? 100.0 * prof_cpu_ns[i] / total_cpu : 0.0, prof_min_ns[i] * 1e-6,
                   prof_wall_min_ns[i] * 1e-6,
                   prof_chain_last[i] >= 0 ? detail::concat("  (row chain to step ", prof_chain_last[i], ")").c_str()
                                           : "");
    }
  }
  std::free(arena);
}

namespace {

int new_value(PlanImpl& p, const std::string& name, ValueType dt, std::vector<int64_t> row, int alias_of = -1) {
  // Every value's row: at most kMaxRank dims, each in [1, kMaxDim], bytes fit in int64
  // (so row_numel()/row_bytes() and the arena layout below never overflow).
  AIMASS_CHECK(row.size() + 1 <= kMaxRank, ValueError, "value '", name, "' has ", row.size() + 1,
               " dims; at most ", kMaxRank, " are supported");
  for (size_t i = 0; i < row.size(); ++i)
    AIMASS_CHECK(row[i] >= 1 && row[i] <= kMaxDim, ValueError, "value '", name, "' would have shape [batch, ",
                 shape_str(row).substr(1), ": dim ", i + 1, " must be in [1, ", kMaxDim, "]");
  const size_t bytes = checked::mul<ValueError>(checked::product<ValueError>(row, "value '" + name + "'"),
                                                size_t{dt == ValueType::Int64 ? 8u : 4u}, "value '" + name + "' bytes");
  AIMASS_CHECK(bytes <= (size_t{1} << 62), ValueError, "value '", name, "' needs ", bytes,
               " bytes per row; too large");
  ValueInfo vi;
  vi.dtype = dt;
  vi.row = std::move(row);
  if (alias_of >= 0) {
    vi.slot = p.values[alias_of].slot;
  } else {
    vi.slot = static_cast<int>(p.slot_row_bytes.size());
    p.slot_row_bytes.push_back(static_cast<int64_t>((bytes + 63) / 64 * 64));
  }
  p.values.push_back(std::move(vi));
  int id = static_cast<int>(p.values.size()) - 1;
  p.index[name] = id;
  return id;
}

void assign_memory(PlanImpl& p);

// Row chains. At batch 1 a transformer layer is a string of small steps (BERT mini: the out
// projection + residual, LayerNorm, FFN up + GELU, FFN down + residual, LayerNorm, the next
// layer's q/k/v: 0.1-0.45 ms each at 2 threads), and each split its work over the pool on its own:
// a fork and a join per step, and each step's threads read rows the other thread wrote (a panel
// split writes every row's columns from both). Every one of these steps computes output row t from
// row t of its inputs only, so a chain of them runs as one pool job instead: each chunk takes a
// range of rows through all of the chain's steps, its rows staying in its core's cache, with no
// join in between. Only packed fp32 Linear layers (their epilogue in registers) and LayerNorm
// join a chain; attention, which mixes rows, ends it.
//
// Rows of the [T, F] operands per batch row of a step that works row by row; 0 for any other step.
int64_t row_local_tokens(const PlanImpl& p, const Step& s) {
  if (s.kind == Kind::Linear) {
    if (!s.packed || ops::packed_epilogue(s.act) < 0 || s.K <= 0) return 0;
    const int64_t n = p.values[s.in0].row_numel();
    if (n % s.K != 0) return 0;
    const int64_t tok = n / s.K;
    if (p.values[s.out].row_numel() != tok * s.N) return 0;
    if (s.res >= 0 && p.values[s.res].row_numel() != tok * s.N) return 0;
    return tok;
  }
  if (s.kind == Kind::LayerNorm) {
    const int64_t n = p.values[s.in0].row_numel();
    return s.D > 0 && n % s.D == 0 ? n / s.D : 0;
  }
  return 0;
}

// Every chunk of a chain streams all of the chain's weights: chains stop at this many bytes of
// packed weights, so that they stay in L3 for both cores (BERT mini's layer: 3 MiB; BERT-base's
// are 27 MiB a layer and keep the panel split, which reads each weight once).
constexpr int64_t kChainMaxWeightBytes = int64_t{8} << 20;

// Marks the planned chains in chain_end / chain_tok (sized by build, no chain anywhere).
void build_row_chains(PlanImpl& p) {
  const int n = static_cast<int>(p.steps.size());
  for (int i = 0; i < n;) {
    const int64_t tok = row_local_tokens(p, p.steps[i]);
    if (tok == 0) {
      ++i;
      continue;
    }
    int j = i;
    int64_t w = p.steps[i].packed ? p.steps[i].packed->bytes() : 0;
    while (j + 1 < n && row_local_tokens(p, p.steps[j + 1]) == tok) {
      const int64_t wn = p.steps[j + 1].packed ? p.steps[j + 1].packed->bytes() : 0;
      if (w + wn > kChainMaxWeightBytes) break;
      w += wn;
      ++j;
    }
    if (j > i)
      for (int k = i; k <= j; ++k) {
        p.chain_end[k] = j;
        p.chain_tok[k] = tok;
      }
    i = j + 1;
  }
}

// A buffer the plan is about to hold: ValueError when it passes max_memory_bytes.
void check_memory(const PlanImpl& p, int64_t bytes, const std::string& what) {
  AIMASS_CHECK(p.max_memory <= 0 || bytes <= p.max_memory, ValueError, what, " needs ", bytes,
               " bytes, more than max_memory_bytes=", p.max_memory);
}

// Per-row shape of a signature entry with its dynamic dims (-1 after the batch) set to `seq`.
std::vector<int64_t> seq_row(const TensorSpec& t, int64_t seq) {
  std::vector<int64_t> row(t.shape.begin() + 1, t.shape.end());
  for (auto& d : row)
    if (d < 0) d = seq;
  return row;
}

// A reshape target may hold one -1 (inferred from the input row, as in torch.view).
void infer_reshape(std::vector<int64_t>& shape, const std::vector<int64_t>& in_row, const std::string& where) {
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < shape.size(); ++i) {
    if (shape[i] == -1) {
      AIMASS_CHECK(infer < 0, ValueError, where, ": shape ", shape_str(shape), " has more than one -1");
      infer = static_cast<int>(i);
    } else {
      AIMASS_CHECK(shape[i] > 0, ValueError, where, ": shape ", shape_str(shape), " must be positive per-row dims");
      known = checked::mul<ValueError>(known, shape[i], where + " shape");
    }
  }
  if (infer < 0) return;
  const auto total = static_cast<int64_t>(checked::product<ValueError>(in_row, where + " input row"));
  AIMASS_CHECK(known > 0 && total % known == 0, ValueError, where, ": cannot reshape row ", shape_str(in_row),
               " to ", shape_str(shape));
  shape[infer] = total / known;
}

void build(PlanImpl& p, const Model& m, int64_t seq, WeightCache& cache) {
  for (const auto& in : m.inputs()) {
    std::vector<int64_t> row = seq_row(in, seq);
    p.input_values.push_back(new_value(p, in.name, in.dtype, row));
  }
  // Uses of each value, to know when an activation may be fused into its producer.
  std::map<std::string, int> uses;
  for (const auto& n : m.nodes())
    for (const auto& i : n.inputs) uses[i]++;
  for (const auto& o : m.outputs()) uses[o.name] += 1000;

  const auto& nodes = m.nodes();
  for (size_t ni = 0; ni < nodes.size(); ++ni) {
    const Node& n = nodes[ni];
    Step s;
    s.where = "node '" + n.name + "' (" + n.op + ")";
    auto input = [&](size_t i) {
      AIMASS_CHECK(i < n.inputs.size(), ValueError, s.where, " needs input ", i);
      return p.index.at(n.inputs[i]);
    };
    auto need_inputs = [&](size_t k) {
      AIMASS_CHECK(n.inputs.size() == k, ValueError, s.where, " takes ", k, " input(s), got ", n.inputs.size());
    };
    auto f32_in = [&](int v) {
      AIMASS_CHECK(p.values[v].dtype == ValueType::Float32, TypeError, s.where, " needs a float32 input");
      return v;
    };
    const std::string& out_name = n.outputs[0];
    std::vector<int64_t> out_row;
    int alias = -1;
    ValueType out_dt = ValueType::Float32;

    if (n.op == "linear") {
      need_inputs(1);
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      AIMASS_CHECK(!row.empty(), ValueError, s.where, ": input needs a feature dimension");
      s.K = row.back();
      auto wit = n.params.find("weight");
      AIMASS_CHECK(wit != n.params.end(), ValueError, s.where, " lacks its 'weight' tensor");
      const StoredTensor& wt = m.tensor(wit->second);
      AIMASS_CHECK(!wt.shape.empty(), ValueError, s.where, ": weight must be 2-D");
      s.N = wt.shape[0];
      if (n.attrs.count("bits")) {
        s.kind = Kind::QLinear;
        auto& slot = cache.items["qlinear:" + n.name];
        if (!slot) slot = pack_qlinear(m, n, s.K);
        s.q = std::static_pointer_cast<QLinearWeights>(slot);
        s.N = s.q->N;
      } else {
        s.kind = Kind::Linear;
        s.w = f32_param(m, n, "weight", {s.N, s.K}, true);
        AIMASS_CHECK(wt.shape.size() == 2 && wt.shape[1] == s.K, ValueError, s.where, ": weight ",
                     shape_str(wt.shape), " does not match input features ", s.K);
      }
      s.b = f32_param(m, n, "bias", {s.N}, false);
      if (s.kind == Kind::Linear && packed_max_rows() > 0)
      {
        auto& slot = cache.items["packed:" + n.name];
        if (!slot) slot = std::make_shared<ops::PackedLinear>(s.w, s.b, s.N, s.K);
        s.packed = std::static_pointer_cast<ops::PackedLinear>(slot);
      }
      out_row = row;
      out_row.back() = s.N;
      s.act = ops::parse_act(n.str_attrs.count("activation") ? n.str_attrs.at("activation") : "none");
    } else if (n.op == "conv2d") {
      need_inputs(1);
      s.kind = Kind::Conv2d;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      AIMASS_CHECK(row.size() == 3, ValueError, s.where, ": input must be [N, C, H, W], got row shape ",
                   shape_str(row));
      auto wit = n.params.find("weight");
      AIMASS_CHECK(wit != n.params.end(), ValueError, s.where, " lacks its 'weight' tensor");
      const auto& ws = m.tensor(wit->second).shape;
      AIMASS_CHECK(ws.size() == 4, ValueError, s.where, ": weight must be 4-D");
      auto& c = s.conv;
      c.C = row[0]; c.H = row[1]; c.W = row[2];
      c.O = ws[0]; c.KH = ws[2]; c.KW = ws[3];
      auto st = attr_ints(n, "stride", 2), pd = attr_ints(n, "padding", 2), dl = attr_ints(n, "dilation", 2);
      c.SH = st[0]; c.SW = st[1]; c.PH = pd[0]; c.PW = pd[1]; c.DH = dl[0]; c.DW = dl[1];
      c.G = attr_int(n, "groups", 1);
      AIMASS_CHECK(c.G >= 1 && c.O >= 1 && c.C % c.G == 0 && c.O % c.G == 0 && ws[1] == c.C / c.G, ValueError,
                   s.where, ": weight ", shape_str(ws), " and groups=", c.G, " do not fit ", c.C, " input channels");
      c.OH = window_out(c.H, c.PH, c.DH, c.KH, c.SH, s.where + " (height)");
      c.OW = window_out(c.W, c.PW, c.DW, c.KW, c.SW, s.where + " (width)");
      s.w = f32_param(m, n, "weight", ws, true);
      s.b = f32_param(m, n, "bias", {c.O}, false);
      s.act = ops::parse_act(n.str_attrs.count("activation") ? n.str_attrs.at("activation") : "none");
      {
        // im2col scratch (ops::conv2d_col_floats; the grouped path), overflow-checked and within
        // the memory cap; the checks also bound the packed kernel's pixel and tap counts
        const int64_t P = checked::mul<ValueError>(c.OH, c.OW, s.where + ": output pixels");
        const int64_t Kc = checked::mul<ValueError>(c.C / c.G, checked::mul<ValueError>(c.KH, c.KW, s.where),
                                                    s.where + ": taps");
        const int64_t cells = checked::mul<ValueError>(checked::add<ValueError>(P, int64_t{32}, s.where), Kc,
                                                       s.where + ": im2col scratch");
        check_memory(p, checked::mul<ValueError>(cells, int64_t{4}, s.where), s.where + ": im2col scratch");
        if (c.G == 1) {
          auto& slot = cache.items["conv:" + n.name];
          if (!slot) slot = std::make_shared<conv::PackedConv>(s.w, s.b, c);
          s.pconv = std::static_pointer_cast<conv::PackedConv>(slot);
        } else {
          p.col.resize(std::max<size_t>(p.col.size(), static_cast<size_t>(ops::conv2d_col_floats(c))));
        }
      }
      out_row = {c.O, c.OH, c.OW};
    } else if (n.op == "max_pool2d" || n.op == "avg_pool2d") {
      need_inputs(1);
      s.kind = n.op == "max_pool2d" ? Kind::MaxPool : Kind::AvgPool;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      AIMASS_CHECK(row.size() == 3, ValueError, s.where, ": input must be [N, C, H, W]");
      auto& q = s.pool;
      q.C = row[0]; q.H = row[1]; q.W = row[2];
      auto k = attr_ints(n, "kernel_size", 2), st = attr_ints(n, "stride", 2), pd = attr_ints(n, "padding", 2);
      std::vector<int64_t> dl = n.attrs.count("dilation") ? attr_ints(n, "dilation", 2) : std::vector<int64_t>{1, 1};
      q.KH = k[0]; q.KW = k[1]; q.SH = st[0]; q.SW = st[1]; q.PH = pd[0]; q.PW = pd[1]; q.DH = dl[0]; q.DW = dl[1];
      q.count_include_pad = attr_int(n, "count_include_pad", 1) != 0;
      q.OH = window_out(q.H, q.PH, q.DH, q.KH, q.SH, s.where + " (height)");
      q.OW = window_out(q.W, q.PW, q.DW, q.KW, q.SW, s.where + " (width)");
      // torch's rule: padding at most half the (dilated) window, so every window overlaps the image
      AIMASS_CHECK(2 * q.PH <= q.DH * (q.KH - 1) + 1 && 2 * q.PW <= q.DW * (q.KW - 1) + 1, ValueError, s.where,
                   ": padding [", q.PH, ", ", q.PW, "] must be at most half the window [", q.DH * (q.KH - 1) + 1,
                   ", ", q.DW * (q.KW - 1) + 1, "]");
      out_row = {q.C, q.OH, q.OW};
    } else if (n.op == "adaptive_avg_pool2d") {
      need_inputs(1);
      s.kind = Kind::AdaptiveAvgPool;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      AIMASS_CHECK(row.size() == 3, ValueError, s.where, ": input must be [N, C, H, W]");
      auto os = attr_ints(n, "output_size", 2);
      AIMASS_CHECK(os[0] > 0 && os[1] > 0, ValueError, s.where, ": output_size must be positive");
      s.pool.C = row[0]; s.pool.H = row[1]; s.pool.W = row[2]; s.pool.OH = os[0]; s.pool.OW = os[1];
      out_row = {row[0], os[0], os[1]};
    } else if (n.op == "reshape" || n.op == "identity") {
      need_inputs(1);
      s.kind = Kind::Alias;
      s.in0 = input(0);
      out_dt = p.values[s.in0].dtype;
      out_row = n.op == "identity" ? p.values[s.in0].row : attr_ints(n, "shape", 0);
      infer_reshape(out_row, p.values[s.in0].row, s.where);
      for (auto d : out_row)
        AIMASS_CHECK(d > 0, ValueError, s.where, ": shape ", shape_str(out_row), " must be positive per-row dims");
      // overflow-checked: dims whose product wraps around 2^64 to the input's count are rejected
      const size_t numel = checked::product<ValueError>(out_row, s.where + ": shape " + shape_str(out_row));
      AIMASS_CHECK(numel == static_cast<size_t>(p.values[s.in0].row_numel()), ValueError, s.where,
                   ": cannot reshape row ", shape_str(p.values[s.in0].row), " to ", shape_str(out_row));
      alias = s.in0;
    } else if (n.op == "activation") {
      need_inputs(1);
      s.kind = Kind::Activation;
      s.in0 = f32_in(input(0));
      AIMASS_CHECK(n.str_attrs.count("kind"), ValueError, s.where, " lacks attribute 'kind'");
      s.act = ops::parse_act(n.str_attrs.at("kind"));
      out_row = p.values[s.in0].row;
      // Fuse into the producing GEMM/conv when nothing else reads its output.
      if (!p.steps.empty()) {
        Step& prev = p.steps.back();
        if ((prev.kind == Kind::Linear || prev.kind == Kind::QLinear || prev.kind == Kind::Conv2d) &&
            prev.out == s.in0 && prev.act == ops::Act::None && uses[n.inputs[0]] == 1 &&
            !(prev.kind != Kind::Conv2d && prev.res >= 0)) {  // linear + residual: act(..) would precede the add
          prev.act = s.act;
          prev.out = new_value(p, out_name, ValueType::Float32, out_row, s.in0);
          continue;
        }
      }
    } else if (n.op == "softmax" || n.op == "log_softmax") {
      need_inputs(1);
      s.kind = n.op == "softmax" ? Kind::Softmax : Kind::LogSoftmax;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      int64_t dim = attr_int(n, "dim", 0, true);
      AIMASS_CHECK(dim >= 1 && dim <= static_cast<int64_t>(row.size()), ValueError, s.where, ": dim ", dim,
                   " must index a non-batch dimension");
      s.axis = row[dim - 1];
      s.inner = 1;
      for (size_t i = dim; i < row.size(); ++i) s.inner *= row[i];
      out_row = row;
    } else if (n.op == "layer_norm") {
      need_inputs(1);
      s.kind = Kind::LayerNorm;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      auto ns = attr_ints(n, "normalized_shape", 0);
      AIMASS_CHECK(!ns.empty() && ns.size() <= row.size() &&
                       std::equal(ns.begin(), ns.end(), row.end() - ns.size()),
                   ValueError, s.where, ": normalized_shape ", shape_str(ns), " does not end the input row ",
                   shape_str(row));
      s.D = std::accumulate(ns.begin(), ns.end(), int64_t{1}, std::multiplies<>());
      s.eps = attr_float(n, "eps", 1e-5);
      AIMASS_CHECK(std::isfinite(s.eps) && s.eps >= 0, ValueError, s.where, ": eps=", s.eps,
                   " must be a finite number >= 0");
      s.w = f32_param(m, n, "weight", ns, false);
      s.b = f32_param(m, n, "bias", ns, false);
      out_row = row;
    } else if (n.op == "embedding") {
      need_inputs(1);
      s.kind = Kind::Embedding;
      s.in0 = input(0);
      AIMASS_CHECK(p.values[s.in0].dtype == ValueType::Int64, TypeError, s.where, ": indices must be int64");
      auto wit = n.params.find("weight");
      AIMASS_CHECK(wit != n.params.end(), ValueError, s.where, " lacks its 'weight' tensor");
      const auto& ws = m.tensor(wit->second).shape;
      AIMASS_CHECK(ws.size() == 2, ValueError, s.where, ": weight must be [num_embeddings, dim]");
      s.V = ws[0];
      s.D = ws[1];
      s.w = f32_param(m, n, "weight", ws, true);
      out_row = p.values[s.in0].row;
      out_row.push_back(s.D);
    } else if (n.op == "add" || n.op == "sub" || n.op == "mul" || n.op == "div") {
      // conv + residual (ResNet blocks): fused into the conv's epilogue when nothing else reads the conv
      if (n.op == "add" && n.inputs.size() == 2 && n.params.empty() && !n.attrs.count("a_scalar") &&
          !n.attrs.count("b_scalar") && !p.steps.empty()) {
        Step& prev = p.steps.back();
        const int a = input(0), b = input(1);
        const int conv_in = prev.out == a ? a : prev.out == b ? b : -1;
        const int other = conv_in == a ? b : a;
        // (and Linear + residual, the transformer's x + proj(..): into the linear's epilogue)
        if ((prev.kind == Kind::Conv2d || prev.kind == Kind::Linear || prev.kind == Kind::QLinear) && conv_in >= 0 &&
            other != conv_in &&
            prev.act == ops::Act::None &&
            prev.res < 0 && uses[n.inputs[conv_in == a ? 0 : 1]] == 1 &&
            p.values[other].dtype == ValueType::Float32 && p.values[other].row == p.values[conv_in].row) {
          prev.res = other;
          prev.out = new_value(p, out_name, ValueType::Float32, p.values[conv_in].row, conv_in);
          continue;
        }
      }
      s.kind = Kind::Binary;
      s.binop = n.op == "add" ? ops::BinOp::Add : n.op == "sub" ? ops::BinOp::Sub
              : n.op == "mul" ? ops::BinOp::Mul : ops::BinOp::Div;
      // operand a / b: a graph value, a stored tensor (params a/b) or a scalar (attrs a_scalar/b_scalar)
      size_t next_in = 0;
      std::vector<int64_t> a_full, b_full;
      auto operand = [&](const char* which, int& vin, bool& is_scalar, float& scalar, const float*& cst,
                         std::vector<int64_t>& full) {
        std::string sk = std::string(which) + "_scalar";
        if (n.attrs.count(sk)) {
          is_scalar = true;
          scalar = static_cast<float>(attr_float(n, sk.c_str(), 0.0));
          return;
        }
        if (n.params.count(which)) {
          const StoredTensor& t = m.tensor(n.params.at(which));
          AIMASS_CHECK(t.dtype == "F32", TypeError, s.where, ": constant operand must be float");
          for (auto d : t.shape)
            AIMASS_CHECK(d >= 1, ValueError, s.where, ": constant operand '", n.params.at(which), "' has shape ",
                         shape_str(t.shape), "; every dim must be >= 1");
          cst = static_cast<const float*>(t.data);
          full = t.shape;
          return;
        }
        vin = f32_in(input(next_in++));
        full = p.values[vin].row;
        full.insert(full.begin(), -1);  // batch
      };
      operand("a", s.in0, s.a_is_scalar, s.a_scalar, s.a_const, a_full);
      operand("b", s.in1, s.b_is_scalar, s.b_scalar, s.b_const, b_full);
      AIMASS_CHECK(next_in == n.inputs.size() && next_in >= 1, ValueError, s.where,
                   " needs one or two graph inputs that match its constant operands");
      const size_t r = std::max(a_full.size(), b_full.size());
      const size_t vr = s.in0 >= 0 ? a_full.size() : b_full.size();
      AIMASS_CHECK(r == vr && (s.in0 < 0 || s.in1 < 0 || a_full.size() == b_full.size()), ValueError, s.where,
                   ": broadcasting would move the batch dimension; operands ", shape_str(a_full), " and ",
                   shape_str(b_full));
      std::vector<int64_t> out(r, 1);
      auto strides_for = [&](const std::vector<int64_t>& full, bool scalar_op) {
        std::vector<int64_t> st(r, 0);
        if (scalar_op) return st;
        int64_t acc = 1;
        for (size_t k = 0; k < full.size(); ++k) {
          const size_t i = full.size() - 1 - k, o = r - 1 - k;
          const int64_t d = full[i];
          st[o] = (d == 1) ? 0 : acc;
          acc *= (d == -1 ? 0 : d);  // batch stride is patched at run time
        }
        return st;
      };
      for (size_t k = 0; k < r; ++k) {
        const size_t o = r - 1 - k;
        int64_t da = k < a_full.size() ? a_full[a_full.size() - 1 - k] : 1;
        int64_t db = k < b_full.size() ? b_full[b_full.size() - 1 - k] : 1;
        if (o == 0) {
          AIMASS_CHECK((da == -1 || da == 1) && (db == -1 || db == 1), ValueError, s.where,
                       ": a constant operand must have size 1 in the batch dimension");
          out[0] = -1;
          continue;
        }
        AIMASS_CHECK(da == db || da == 1 || db == 1, ValueError, s.where, ": shapes ", shape_str(a_full), " and ",
                     shape_str(b_full), " do not broadcast");
        out[o] = std::max(da, db);
      }
      s.a_strides = strides_for(a_full, s.a_is_scalar);
      s.b_strides = strides_for(b_full, s.b_is_scalar);
      s.a_batched = s.in0 >= 0;
      s.b_batched = s.in1 >= 0;
      s.out_shape = out;
      out_row.assign(out.begin() + 1, out.end());
      // batch strides: a value's batch stride is its row numel
      if (s.a_batched) s.a_strides[0] = p.values[s.in0].row_numel();
      if (s.b_batched) s.b_strides[0] = p.values[s.in1].row_numel();
      if (out_row.empty()) {  // [B] only: give the kernel a last dim
        s.out_shape.push_back(1);
        s.a_strides.push_back(0);
        s.b_strides.push_back(0);
      }
    } else if (n.op == "channel_affine") {
      need_inputs(1);
      s.kind = Kind::ChannelAffine;
      s.in0 = f32_in(input(0));
      const auto& row = p.values[s.in0].row;
      AIMASS_CHECK(!row.empty(), ValueError, s.where, ": input needs a channel dimension");
      s.N = row[0];
      s.inner = p.values[s.in0].row_numel() / row[0];
      s.w = f32_param(m, n, "scale", {row[0]}, true);
      s.b = f32_param(m, n, "shift", {row[0]}, true);
      out_row = row;
    } else if (is_ext_op(n.op)) {
      s.kind = Kind::Ext;
      std::vector<ExtValue> ins;
      for (size_t i = 0; i < n.inputs.size(); ++i) {
        s.ext_in.push_back(input(i));
        ins.push_back({p.values[s.ext_in.back()].dtype, p.values[s.ext_in.back()].row});
      }
      ExtValue ov;
      s.ext = build_ext(m, n, ins, ov, cache);
      out_dt = ov.dtype;
      out_row = ov.row;
    } else {
      throw ValueError(detail::concat(m.path(), ": ", s.where, ": op '", n.op,
                                      "' is not supported by this runtime; supported ops: ", kSupportedOps));
    }
    s.out = new_value(p, out_name, out_dt, out_row, alias);
    p.steps.push_back(std::move(s));
  }
  for (size_t i = 0; i < m.outputs().size(); ++i) {
    const auto& o = m.outputs()[i];
    int v = p.index.at(o.name);
    const ValueInfo& vi = p.values[v];
    std::vector<int64_t> row = seq_row(o, seq);
    AIMASS_CHECK(vi.row == row && vi.dtype == o.dtype, ValueError, m.path(), ": signature output '", o.name,
                 "' declares row shape ", shape_str(row), " but the graph computes ", shape_str(vi.row));
    p.output_values.push_back(v);
  }
  p.chain_end.assign(p.steps.size(), -1);
  p.chain_tok.assign(p.steps.size(), 0);
  // AIMASS_ROW_CHAINS=0 (read when a plan is built): every step runs on its own (A/B runs)
  if (env_switch_on("AIMASS_ROW_CHAINS")) build_row_chains(p);
  assign_memory(p);
}

bool res_in_place_enabled() {
  static const bool on = env_switch_on("AIMASS_RES_IN_PLACE");
  return on;
}

// Liveness-based arena layout: a slot whose last reader ran may be reused by a
// slot defined later (best fit among free blocks). Graph outputs live to the
// end; a step's output never shares memory with its own inputs, because a
// block frees only after the last step that reads it, except a conv's residual (below).
void assign_memory(PlanImpl& p) {
  const int S = static_cast<int>(p.slot_row_bytes.size());
  constexpr int kEnd = std::numeric_limits<int>::max();
  std::vector<int> def(S, kEnd), last(S, -1);
  for (int v : p.input_values) def[p.values[v].slot] = -1;
  for (int i = 0; i < static_cast<int>(p.steps.size()); ++i) {
    const Step& st = p.steps[i];
    for (int in : {st.in0, st.in1})
      if (in >= 0) last[p.values[in].slot] = std::max(last[p.values[in].slot], i);
    for (int in : st.ext_in) last[p.values[in].slot] = std::max(last[p.values[in].slot], i);
    if (st.res >= 0) last[p.values[st.res].slot] = std::max(last[p.values[st.res].slot], i);
    int& d = def[p.values[st.out].slot];
    d = std::min(d, i);
  }
  // Inside a row chain the threads are at different steps at once (each on its own rows): every
  // block that a chain step reads or writes stays busy to the chain's end, so no value written in
  // the chain shares memory with another that the chain reads or writes.
  for (int i = 0; i < static_cast<int>(p.chain_end.size()); ++i) {
    const int e = p.chain_end[i];
    if (e < 0) continue;
    const Step& st = p.steps[i];
    for (int v : {st.in0, st.in1, st.res, st.out})
      if (v >= 0) last[p.values[v].slot] = std::max(last[p.values[v].slot], e);
  }
  for (int v : p.output_values) last[p.values[v].slot] = kEnd;
  std::vector<int> order;
  for (int s = 0; s < S; ++s)
    if (def[s] != kEnd) order.push_back(s);
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return def[a] < def[b]; });
  struct Block { int64_t bytes; int busy_until; };
  std::vector<Block> blocks;
  std::vector<int> block_of(S, -1);
  for (int s : order) {
    const int64_t need = p.slot_row_bytes[s];
    int best = -1;
    // A conv's output may take its residual's block when this conv is the residual's last reader
    // and reads it in place (conv::residual_in_place_ok; not when the residual is also its input):
    // one 4-byte stream per output instead of two (AIMASS_RES_IN_PLACE=0 turns it off).
    if (res_in_place_enabled() && def[s] >= 0 && def[s] < static_cast<int>(p.steps.size())) {
      const Step& st = p.steps[def[s]];
      if (st.kind == Kind::Conv2d && st.pconv && st.res >= 0 && p.values[st.out].slot == s &&
          conv::residual_in_place_ok(*st.pconv)) {
        const int r = p.values[st.res].slot;
        const int b = block_of[r];
        if (r != s && r != p.values[st.in0].slot && last[r] == def[s] && b >= 0 && blocks[b].busy_until == def[s] &&
            blocks[b].bytes >= need)
          best = b;
      }
    }
    for (int b = 0; best < 0 && b < static_cast<int>(blocks.size()); ++b)
      if (blocks[b].busy_until < def[s] && blocks[b].bytes >= need && (best < 0 || blocks[b].bytes < blocks[best].bytes))
        best = b;
    if (best < 0) {
      blocks.push_back({need, -2});
      best = static_cast<int>(blocks.size()) - 1;
    }
    blocks[best].busy_until = std::max(last[s], def[s]);
    block_of[s] = best;
  }
  std::vector<int64_t> block_prefix(blocks.size());
  int64_t acc = 0;
  for (size_t b = 0; b < blocks.size(); ++b) {
    block_prefix[b] = acc;
    acc = checked::add<ValueError>(acc, blocks[b].bytes, "the plan's bytes per batch row");
  }
  p.slot_prefix.assign(S, 0);
  for (int s = 0; s < S; ++s)
    if (block_of[s] >= 0) p.slot_prefix[s] = block_prefix[block_of[s]];
  p.total_row_bytes = acc;
}

}  // namespace

bool has_dynamic_seq(const Model& m) {
  for (const auto* specs : {&m.inputs(), &m.outputs()})
    for (const auto& t : *specs)
      for (size_t i = 1; i < t.shape.size(); ++i)
        if (t.shape[i] < 0) return true;
  return false;
}

struct Executor::Plans {
  std::map<int64_t, std::unique_ptr<PlanImpl>> by_seq;
  std::vector<int64_t> recent;  // most recent last
  WeightCache cache;
  int64_t max_memory = 0;  // ExecutorOptions::max_memory_bytes, given to every plan
};

namespace {
constexpr size_t kMaxPlans = 8;
}

Executor::Executor(std::shared_ptr<const Model> model, ExecutorOptions opts)
    : model_(std::move(model)), plans_(std::make_unique<Plans>()) {
  AIMASS_CHECK(model_, ValueError, "Executor: model is null");
  AIMASS_CHECK(opts.max_batch_size >= 1, ValueError, "Executor: max_batch_size=", opts.max_batch_size,
               " must be >= 1");
  AIMASS_CHECK(opts.max_memory_bytes >= 0, ValueError, "Executor: max_memory_bytes=", opts.max_memory_bytes,
               " must be >= 0 (0 = no cap)");
  plans_->max_memory = opts.max_memory_bytes;
  dynamic_ = has_dynamic_seq(*model_);
  AIMASS_CHECK(!dynamic_ || opts.seq_len >= 1, ValueError, "Executor: seq_len=", opts.seq_len, " must be >= 1");
  reserved_ = opts.max_batch_size;
  set_seq_len(dynamic_ ? opts.seq_len : 0);
}

Executor::~Executor() = default;

void Executor::set_seq_len(int64_t seq) {
  if (!dynamic_) seq = 0;
  AIMASS_CHECK(!dynamic_ || seq >= 1, ValueError, "Executor: sequence length ", seq, " must be >= 1");
  if (plan_ && seq == seq_) return;
  Plans& ps = *plans_;
  auto it = ps.by_seq.find(seq);
  if (it == ps.by_seq.end()) {
    auto p = std::make_unique<PlanImpl>();
    p->max_memory = ps.max_memory;
    const char* prof = std::getenv("AIMASS_PROFILE_STEPS");
    p->profile = prof && *prof && std::string(prof) != "0";
    try {
      build(*p, *model_, seq, ps.cache);
    } catch (const Error& e) {
      if (!dynamic_) throw;
      throw ValueError(detail::concat(e.what(), " (at sequence length ", seq, ")"));
    }
    if (ps.by_seq.size() >= kMaxPlans) {  // drop the least recently used plan
      for (auto r = ps.recent.begin(); r != ps.recent.end(); ++r) {
        auto victim = ps.by_seq.find(*r);
        if (victim != ps.by_seq.end() && victim->second.get() != plan_) {
          ps.by_seq.erase(victim);
          ps.recent.erase(r);
          break;
        }
      }
    }
    it = ps.by_seq.emplace(seq, std::move(p)).first;
  }
  ps.recent.erase(std::remove(ps.recent.begin(), ps.recent.end(), seq), ps.recent.end());
  ps.recent.push_back(seq);
  plan_ = it->second.get();
  seq_ = seq;
  reserve(reserved_);
}

int64_t Executor::input_row_bytes(int i) const {
  AIMASS_CHECK(i >= 0 && i < static_cast<int>(plan_->input_values.size()), ValueError, "input index ", i,
               " out of range");
  return plan_->values[plan_->input_values[i]].row_bytes();
}

int64_t Executor::output_row_bytes(int i) const {
  AIMASS_CHECK(i >= 0 && i < static_cast<int>(plan_->output_values.size()), ValueError, "output index ", i,
               " out of range");
  return plan_->values[plan_->output_values[i]].row_bytes();
}

std::vector<int64_t> Executor::output_row_shape(int i) const {
  AIMASS_CHECK(i >= 0 && i < static_cast<int>(plan_->output_values.size()), ValueError, "output index ", i,
               " out of range");
  return plan_->values[plan_->output_values[i]].row;
}

int64_t Executor::capacity() const { return plan_->capacity; }
int64_t Executor::arena_bytes() const { return plan_->total_row_bytes * plan_->capacity; }
int64_t Executor::num_steps() const { return static_cast<int64_t>(plan_->steps.size()); }

void Executor::reserve(int64_t rows) {
  AIMASS_CHECK(rows >= 1, ValueError, "Executor::reserve: rows=", rows, " must be >= 1");
  reserved_ = std::max(reserved_, rows);
  if (rows <= plan_->capacity) return;
  const int64_t need = checked::mul<ValueError>(plan_->total_row_bytes, rows,
                                                detail::concat("Executor: the arena for ", rows, " rows"));
  check_memory(*plan_, need, detail::concat("Executor: the arena for ", rows, " rows"));
  const size_t bytes = static_cast<size_t>(std::max<int64_t>(need, 64));
  void* mem = nullptr;
  AIMASS_CHECK(posix_memalign(&mem, 64, bytes) == 0, Error, "Executor: cannot allocate an arena of ", bytes,
               " bytes for ", rows, " rows (", plan_->total_row_bytes, " bytes per row); lower max_batch_size or "
               "send smaller requests");
  std::free(plan_->arena);
  plan_->arena = mem;
  plan_->capacity = rows;
}

void* Executor::input_buffer(int i) {
  AIMASS_CHECK(i >= 0 && i < static_cast<int>(plan_->input_values.size()), ValueError, "input index ", i,
               " out of range");
  return plan_->ptr(plan_->input_values[i]);
}

const void* Executor::output_buffer(int i) const {
  AIMASS_CHECK(i >= 0 && i < static_cast<int>(plan_->output_values.size()), ValueError, "output index ", i,
               " out of range");
  return plan_->ptr(plan_->output_values[i]);
}

namespace {

// One step over `rows` batch rows (its kernels split their work over the pool).
void run_step(PlanImpl& p, Step& s, int64_t rows) {
  switch (s.kind) {
    case Kind::Linear: {
      const int64_t R = rows * (p.values[s.in0].row_numel() / s.K);
      ops::linear(p.fptr(s.in0), R, s.K, s.w, s.N, s.b, s.act, p.fptr(s.out), s.packed.get(),
                  s.res >= 0 ? p.fptr(s.res) : nullptr);
      break;
    }
    case Kind::QLinear: {
      const int64_t R = rows * (p.values[s.in0].row_numel() / s.K);
      run_qlinear(*s.q, p.fptr(s.in0), R, s.b, p.fptr(s.out), s.act, s.res >= 0 ? p.fptr(s.res) : nullptr);
      break;
    }
    case Kind::Conv2d:
      if (s.pconv) {
        conv::run(*s.pconv, p.fptr(s.in0), rows, s.res >= 0 ? p.fptr(s.res) : nullptr, s.act == ops::Act::Relu,
                  p.fptr(s.out));
        if (s.act != ops::Act::None && s.act != ops::Act::Relu)
          ops::activation(p.fptr(s.out), rows * p.values[s.out].row_numel(), s.act, p.fptr(s.out));
      } else if (s.res >= 0) {
        ops::conv2d(p.fptr(s.in0), rows, s.conv, s.w, s.b, ops::Act::None, p.col.data(), p.fptr(s.out));
        ext::residual_act(p.fptr(s.out), p.fptr(s.res), rows * p.values[s.out].row_numel(), static_cast<int>(s.act));
        if (s.act != ops::Act::None && s.act != ops::Act::Relu)
          ops::activation(p.fptr(s.out), rows * p.values[s.out].row_numel(), s.act, p.fptr(s.out));
      } else {
        ops::conv2d(p.fptr(s.in0), rows, s.conv, s.w, s.b, s.act, p.col.data(), p.fptr(s.out));
      }
      break;
    case Kind::MaxPool: ops::max_pool2d(p.fptr(s.in0), rows, s.pool, p.fptr(s.out)); break;
    case Kind::AvgPool: ops::avg_pool2d(p.fptr(s.in0), rows, s.pool, p.fptr(s.out)); break;
    case Kind::AdaptiveAvgPool:
      ops::adaptive_avg_pool2d(p.fptr(s.in0), rows, s.pool.C, s.pool.H, s.pool.W, s.pool.OH, s.pool.OW,
                               p.fptr(s.out));
      break;
    case Kind::Alias: break;  // shares its input's slot
    case Kind::Activation:
      ops::activation(p.fptr(s.in0), rows * p.values[s.in0].row_numel(), s.act, p.fptr(s.out));
      break;
    case Kind::Softmax:
    case Kind::LogSoftmax: {
      const int64_t outer = rows * p.values[s.in0].row_numel() / (s.axis * s.inner);
      ops::softmax(p.fptr(s.in0), outer, s.axis, s.inner, s.kind == Kind::LogSoftmax, p.fptr(s.out));
      break;
    }
    case Kind::LayerNorm:
      ops::layer_norm(p.fptr(s.in0), rows * p.values[s.in0].row_numel() / s.D, s.D, s.w, s.b, s.eps,
                      p.fptr(s.out));
      break;
    case Kind::Embedding:
      ops::embedding(reinterpret_cast<const int64_t*>(p.ptr(s.in0)), rows * p.values[s.in0].row_numel(), s.w,
                     s.V, s.D, p.fptr(s.out), s.where.c_str());
      break;
    case Kind::Binary: {
      s.out_shape[0] = rows;
      const float* a = s.a_is_scalar ? &s.a_scalar : s.a_const ? s.a_const : p.fptr(s.in0);
      const float* b = s.b_is_scalar ? &s.b_scalar : s.b_const ? s.b_const : p.fptr(s.in1);
      ops::binary(s.binop, a, s.a_strides, b, s.b_strides, s.out_shape, p.fptr(s.out));
      break;
    }
    case Kind::ChannelAffine:
      ops::channel_affine(p.fptr(s.in0), rows, s.N, s.inner, s.w, s.b, p.fptr(s.out));
      break;
    case Kind::Ext: {
      std::vector<const void*>& in = p.ext_ptrs;
      in.clear();
      for (int v : s.ext_in) in.push_back(p.ptr(v));
      s.ext->run(rows, in, p.ptr(s.out));
      break;
    }
  }
}

// Rows per chunk of a row chain, at least: each chunk streams the chain's weights (a 64-row chunk
// still reuses every weight panel over 5 row tiles).
constexpr int64_t kChainMinRows = 64;

// The steps [first, last] of a row chain over T rows of its operands, as one pool job: each chunk
// takes a range of rows (ops::linear_row_splits: the same bits as one thread) through every step
// in order.
void run_chain(PlanImpl& p, int first, int last, int64_t T, int nchunks) {
  const std::vector<int64_t> b = ops::linear_row_splits(T, nchunks);
  parallel_chunks(nchunks, [&](int c, int) {
    const int64_t r0 = b[c], r1 = b[c + 1];
    if (r1 <= r0) return;
    for (int k = first; k <= last; ++k) {
      const Step& s = p.steps[k];
      if (s.kind == Kind::Linear) {
        ops::linear_rows(p.fptr(s.in0) + r0 * s.K, r1 - r0, s.K, s.N, s.act, p.fptr(s.out) + r0 * s.N, *s.packed,
                         s.res >= 0 ? p.fptr(s.res) + r0 * s.N : nullptr);
      } else {  // LayerNorm (row_local_tokens); nested in a pool job, it runs on this thread
        ops::layer_norm(p.fptr(s.in0) + r0 * s.D, r1 - r0, s.D, s.w, s.b, s.eps, p.fptr(s.out) + r0 * s.D);
      }
    }
  });
}

// The last step of the row chain to run from step `si` at this batch (si itself when none): the
// steps of its planned chain from si on while each can run by rows here (a Linear that takes
// sgemm at this many rows ends it), and only with 2+ chunks of kChainMinRows rows.
int chain_from(const PlanImpl& p, int si, int64_t rows, int nt, int& nchunks, int64_t& T) {
  const int e = p.chain_end[si];
  if (e <= si || nt < 2) return si;
  T = rows * p.chain_tok[si];
  nchunks = static_cast<int>(std::min<int64_t>(T / kChainMinRows, nt));
  if (nchunks < 2) return si;
  int j = si;
  while (j <= e) {
    const Step& s = p.steps[j];
    if (s.kind == Kind::Linear && !ops::linear_rows_ok(T, s.K, s.act, s.packed.get())) break;
    ++j;
  }
  return j - 1 > si ? j - 1 : si;
}

}  // namespace

void Executor::execute(int64_t rows) {
  PlanImpl& p = *plan_;
  AIMASS_CHECK(rows >= 1 && rows <= p.capacity, ValueError, "Executor::execute: rows=", rows, " must be in [1, ",
               p.capacity, "]; call reserve() first");
  if (p.profile && p.prof_ns.size() != p.steps.size()) {
    p.prof_ns.assign(p.steps.size(), 0);
    p.prof_cpu_ns.assign(p.steps.size(), 0);
    p.prof_min_ns.assign(p.steps.size(), std::numeric_limits<int64_t>::max());
    p.prof_wall_min_ns.assign(p.steps.size(), std::numeric_limits<int64_t>::max());
    p.prof_calls.assign(p.steps.size(), 0);
    p.prof_chain_last.assign(p.steps.size(), -1);
  }
  // Parked pool workers take tens of microseconds to wake on a VM: the scope starts them now, so
  // their wake-up overlaps the steps before the first parallel one, and keeps them polling between
  // this run's parallel steps instead of parking in each serial gap (aimass/parallel.h).
  aimass::RunScope run_scope;
  const int nt = num_threads();
  const int nsteps = static_cast<int>(p.steps.size());
  for (int si = 0; si < nsteps; ++si) {
    run_scope.step();
    const auto t0 = p.profile ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    const int64_t c0 = p.profile ? thread_cpu_ns() : 0;
    int nchunks = 1;
    int64_t T = 0;
    const int last = chain_from(p, si, rows, nt, nchunks, T);
    if (last > si) run_chain(p, si, last, T, nchunks);
    else run_step(p, p.steps[si], rows);
    if (p.profile) {  // a chain's time goes to its first step
      const int64_t w = std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - t0).count();
      p.prof_ns[si] += w;
      p.prof_wall_min_ns[si] = std::min(p.prof_wall_min_ns[si], w);
      const int64_t c = thread_cpu_ns() - c0;
      p.prof_cpu_ns[si] += c;
      p.prof_min_ns[si] = std::min(p.prof_min_ns[si], c);
      ++p.prof_calls[si];
      if (last > si) p.prof_chain_last[si] = last;
    }
    si = last;
  }
}

void Executor::run(int64_t rows, const void* const* inputs, void* const* outputs) {
  reserve(rows);
  const Model& m = *model_;
  for (size_t i = 0; i < m.inputs().size(); ++i)
    std::memcpy(input_buffer(static_cast<int>(i)), inputs[i], rows * input_row_bytes(static_cast<int>(i)));
  execute(rows);
  for (size_t i = 0; i < m.outputs().size(); ++i)
    std::memcpy(outputs[i], output_buffer(static_cast<int>(i)), rows * output_row_bytes(static_cast<int>(i)));
}

}  // namespace aimass::runtime
