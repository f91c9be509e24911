// Bindings for the CUDA quantized linear: device pointers cross as integers
// (torch .data_ptr(), cupy .data.ptr, __cuda_array_interface__['data'][0]) plus
// shapes; python/aimass/compress/_linear_cuda.py checks dtypes/shapes/devices.
#include "aimass/qlinear_cuda.h"
#include "common.h"

namespace aimass_bind {

namespace qc = aimass::quant::cuda;

void bind_qlinear_cuda(py::module_& m) {
  m.def("qlinear_quantize_int8",
        [](uintptr_t w, int64_t N, int64_t K, uintptr_t q, uintptr_t scale, uintptr_t stream) {
          qc::quantize_int8_rows(reinterpret_cast<const float*>(w), N, K, reinterpret_cast<int8_t*>(q),
                                 reinterpret_cast<float*>(scale), stream);
        },
        py::arg("w"), py::arg("N"), py::arg("K"), py::arg("q"), py::arg("scale"), py::arg("stream") = 0, nogil());
  m.def("qlinear_dequantize_int8",
        [](uintptr_t q, uintptr_t scale, int64_t N, int64_t K, uintptr_t out, uintptr_t stream) {
          qc::dequantize_int8_rows(reinterpret_cast<const int8_t*>(q), reinterpret_cast<const float*>(scale), N, K,
                                   reinterpret_cast<float*>(out), stream);
        },
        py::arg("q"), py::arg("scale"), py::arg("N"), py::arg("K"), py::arg("out"), py::arg("stream") = 0, nogil());
  m.def("qlinear_linear_int8",
        [](uintptr_t q, uintptr_t scale, int64_t N, int64_t K, uintptr_t x, int64_t M, uintptr_t bias, uintptr_t y,
           uintptr_t stream) {
          qc::linear_int8(reinterpret_cast<const int8_t*>(q), reinterpret_cast<const float*>(scale), N, K,
                          reinterpret_cast<const float*>(x), M, reinterpret_cast<const float*>(bias),
                          reinterpret_cast<float*>(y), stream);
        },
        py::arg("q"), py::arg("scale"), py::arg("N"), py::arg("K"), py::arg("x"), py::arg("M"), py::arg("bias"),
        py::arg("y"), py::arg("stream") = 0, nogil());
}

}  // namespace aimass_bind
