#include "runtime/qlinear_bridge.h"

#include "aimass/error.h"

namespace aimass::runtime {

std::shared_ptr<QLinearWeights> pack_qlinear(const Model& m, const Node& n, int64_t K) {
  throw ValueError(detail::concat(m.path(), ": node '", n.name,
                                  "' is a quantized linear, but this build has no quantized linear kernels"));
}

void run_qlinear(const QLinearWeights&, const float*, int64_t, const float*, float*) {
  throw Error("run_qlinear: quantized kernels are not built");
}

}  // namespace aimass::runtime
