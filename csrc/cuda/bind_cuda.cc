// Bindings for aimass._cuda: device queries (kernels are bound beside them).
#include "aimass/cuda_device.h"
#include "common.h"

namespace aimass_bind {

void bind_cuda(py::module_& m) {
  m.doc() = "aimass CUDA kernels; use aimass.cuda";
  m.def("device_count", &aimass::cuda::device_count);
  m.def("last_error", &aimass::cuda::last_error);
}

}  // namespace aimass_bind
