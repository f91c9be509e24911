#include "runtime/qlinear_bridge.h"

#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/qlinear.h"
#include "runtime/ext_ops.h"
#include "runtime/vec_kernels.h"

namespace aimass::runtime {

std::shared_ptr<QLinearWeights> pack_qlinear(const Model& m, const Node& n, int64_t K) {
  const std::string where = "node '" + n.name + "' (quantized linear)";
  auto q = std::make_shared<QLinearWeights>();
  // attrs are JSON doubles: exact integers only (no UB cast of NaN / inf / 2^63)
  auto int_attr = [&](const char* key, int64_t def) -> int64_t {
    auto it = n.attrs.find(key);
    if (it == n.attrs.end()) return def;
    AIMASS_CHECK(it->second.size() == 1, ValueError, where, ": attribute '", key, "' must be one number");
    return checked::to_int64<ValueError>(it->second[0], where + ": attribute '" + key + "'");
  };
  const int64_t bits = int_attr("bits", 0);
  AIMASS_CHECK(bits == 8 || bits == 4, ValueError, where, ": bits=", bits, " must be 8 or 4");
  q->bits = static_cast<int>(bits);
  q->group_size = int_attr("group_size", 0);
  AIMASS_CHECK(q->group_size >= 0 && q->group_size <= K, ValueError, where, ": group_size=", q->group_size,
               " must be in [0, ", K, "] (0 = per output channel)");
  AIMASS_CHECK(n.params.count("weight") && n.params.count("weight_scale"), ValueError, where,
               " needs 'weight' and 'weight_scale' tensors");
  const StoredTensor& w = m.tensor(n.params.at("weight"));
  const StoredTensor& s = m.tensor(n.params.at("weight_scale"));
  AIMASS_CHECK(!w.shape.empty(), ValueError, where, ": weight has no shape");
  q->N = w.shape[0];
  q->K = K;
  AIMASS_CHECK(w.dtype == (q->bits == 8 ? "I8" : "U8"), TypeError, where, ": weight dtype ", w.dtype,
               " does not match bits=", q->bits, " (int8 -> I8, int4 packed -> U8)");
  const int64_t elems = checked::mul<CorruptDataError>(q->N, K, where + ": weight elements");
  const int64_t want_bytes = q->bits == 8 ? elems : elems / 2 + (elems & 1);
  AIMASS_CHECK(w.nbytes == want_bytes, ValueError, where, ": weight holds ", w.nbytes, " bytes, [", q->N, ", ", K,
               "] at ", q->bits, " bits needs ", want_bytes);
  const int64_t want_scales = q->group_size > 0 ? q->N * (K / q->group_size) : q->N;
  AIMASS_CHECK(s.dtype == "F32" && s.numel() == want_scales, ValueError, where, ": weight_scale must be float32 with ",
               want_scales, " values");
  auto packed = quant::pack_linear(q->bits, q->N, K, q->group_size, w.data, static_cast<const float*>(s.data));
  q->packed = std::static_pointer_cast<void>(packed);
  return q;
}

void run_qlinear(const QLinearWeights& q, const float* x, int64_t M, const float* bias, float* y) {
  quant::linear(*static_cast<const quant::PackedLinear*>(q.packed.get()), x, M, bias, y);
}

void run_qlinear(const QLinearWeights& q, const float* x, int64_t M, const float* bias, float* y, ops::Act act,
                 const float* res) {
  const auto& w = *static_cast<const quant::PackedLinear*>(q.packed.get());
  if (act == ops::Act::None && !res) {
    quant::linear(w, x, M, bias, y);
    return;
  }
  const int64_t N = w.out_features();
  if (act != ops::Act::None && act != ops::Act::Relu && act != ops::Act::Gelu && act != ops::Act::GeluTanh) {
    quant::linear(w, x, M, bias, y);
    ops::activation(y, M * N, act, y);
    if (res) ext::residual_act(y, res, M * N, 0);
    return;
  }
  const vec::Kernels& vk = vec::kernels();
  // Row pieces of one block of columns (yy: a chunk of rows of y): act, then + res (the
  // executor fuses one or the other).
  const quant::LinearEpilogue epi = [&](float* yy, int64_t rows, int64_t ldy, int64_t n0, int64_t n1) {
    for (int64_t m = 0; m < rows; ++m) {
      float* r = yy + m * ldy + n0;
      const int64_t n = n1 - n0;
      if (act == ops::Act::Gelu) vk.gelu(r, n, r);
      else if (act == ops::Act::GeluTanh) vk.gelu_tanh(r, n, r);
      else if (act == ops::Act::Relu)
        for (int64_t j = 0; j < n; ++j) r[j] = r[j] < 0.f ? 0.f : r[j];  // torch's relu (ops.cc)
      if (res) {
        const float* rr = res + (r - y);  // same row and column of the residual
        for (int64_t j = 0; j < n; ++j) r[j] += rr[j];
      }
    }
  };
  quant::linear(w, x, M, bias, y, epi);
}

}  // namespace aimass::runtime
