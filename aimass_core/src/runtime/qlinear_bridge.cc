#include "runtime/qlinear_bridge.h"

#include "aimass/error.h"
#include "aimass/qlinear.h"

namespace aimass::runtime {

std::shared_ptr<QLinearWeights> pack_qlinear(const Model& m, const Node& n, int64_t K) {
  const std::string where = "node '" + n.name + "' (quantized linear)";
  auto q = std::make_shared<QLinearWeights>();
  q->bits = static_cast<int>(n.attrs.at("bits").at(0));
  auto g = n.attrs.find("group_size");
  q->group_size = g == n.attrs.end() ? 0 : static_cast<int64_t>(g->second.at(0));
  AIMASS_CHECK(q->bits == 8 || q->bits == 4, ValueError, where, ": bits=", q->bits, " must be 8 or 4");
  AIMASS_CHECK(n.params.count("weight") && n.params.count("weight_scale"), ValueError, where,
               " needs 'weight' and 'weight_scale' tensors");
  const StoredTensor& w = m.tensor(n.params.at("weight"));
  const StoredTensor& s = m.tensor(n.params.at("weight_scale"));
  AIMASS_CHECK(!w.shape.empty(), ValueError, where, ": weight has no shape");
  q->N = w.shape[0];
  q->K = K;
  AIMASS_CHECK(w.dtype == (q->bits == 8 ? "I8" : "U8"), TypeError, where, ": weight dtype ", w.dtype,
               " does not match bits=", q->bits, " (int8 -> I8, int4 packed -> U8)");
  const int64_t want_bytes = q->bits == 8 ? q->N * K : (q->N * K + 1) / 2;
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

}  // namespace aimass::runtime
