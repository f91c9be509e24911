// Bindings for the fused quantized linear (aimass_core/include/aimass/qlinear.h).
// Python: aimass.compress.linear / PackedLinear (python/aimass/compress/linear.py).
#include "aimass/qlinear.h"

#include "common.h"

namespace aimass_bind {

namespace q = aimass::quant;

namespace {

int64_t numel(const py::array& a) {
  int64_t n = 1;
  for (py::ssize_t i = 0; i < a.ndim(); ++i) n *= a.shape(i);
  return n;
}

void check_weight(int bits, int64_t N, int64_t K, int64_t group_size, const py::array& data, const py::array& scale) {
  AIMASS_CHECK(bits == 8 || bits == 4, ValueError, "bits must be 8 or 4, got ", bits);
  AIMASS_CHECK(N > 0 && K > 0, ValueError, "weight shape must be positive, got [", N, ", ", K, "]");
  AIMASS_CHECK(group_size >= 0 && (group_size == 0 || K % group_size == 0), ValueError, "group_size=", group_size,
               " must be 0 (per-channel) or divide in_features K=", K);
  if (bits == 8) {
    require_dtype<int8_t>(data, "data", "int8 (symmetric 8-bit)");
    AIMASS_CHECK(numel(data) == N * K, ValueError, "data has ", numel(data), " elements, expected N*K = ", N * K);
  } else {
    require_dtype<uint8_t>(data, "data", "uint8 (packed 4-bit)");
    AIMASS_CHECK(numel(data) == (N * K + 1) / 2, ValueError, "packed 4-bit data has ", numel(data),
                 " bytes, expected ceil(N*K/2) = ", (N * K + 1) / 2);
  }
  require_contiguous(data, "data");
  const int64_t ng = group_size == 0 ? 1 : K / group_size;
  require_dtype<float>(scale, "scale", "float32");
  require_contiguous(scale, "scale");
  AIMASS_CHECK(numel(scale) == N * ng, ValueError, "scale has ", numel(scale), " elements, expected ", N * ng,
               group_size == 0 ? " (one per output channel)" : " (N * K / group_size)");
}

}  // namespace

void bind_qlinear(py::module_& m) {
  py::class_<q::PackedLinear, std::shared_ptr<q::PackedLinear>>(m, "PackedLinear",
      "Prepacked quantized linear weight (build with qlinear_pack; immutable, thread-safe)")
      .def_property_readonly("bits", &q::PackedLinear::bits)
      .def_property_readonly("out_features", &q::PackedLinear::out_features)
      .def_property_readonly("in_features", &q::PackedLinear::in_features)
      .def_property_readonly("group_size", &q::PackedLinear::group_size)
      .def_property_readonly("nbytes", &q::PackedLinear::nbytes);

  m.def("qlinear_pack",
        [](int bits, int64_t N, int64_t K, int64_t group_size, py::array data, py::array scale) {
          check_weight(bits, N, K, group_size, data, scale);
          const void* d = data.data();
          const float* s = static_cast<const float*>(scale.data());
          py::gil_scoped_release nogil_;
          return q::pack_linear(bits, N, K, group_size, d, s);
        },
        py::arg("bits"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("data"), py::arg("scale"));

  m.def("qlinear_linear",
        [](const q::PackedLinear& w, py::array x, py::object bias, const std::string& kernel,
           const std::string& activation_precision) {
          const int64_t N = w.out_features(), K = w.in_features();
          const float* xp = cdata<float>(x, "x", "float32");
          AIMASS_CHECK(x.ndim() == 2, ValueError, "x must be 2-D [M, K], got ", x.ndim(), " dimensions");
          AIMASS_CHECK(x.shape(1) == K, ValueError, "x has ", x.shape(1), " features (last dimension) but the weight "
                       "has in_features=", K);
          const float* bp = nullptr;
          py::array b;
          if (!bias.is_none()) {
            b = py::reinterpret_borrow<py::array>(bias);
            bp = cdata<float>(b, "bias", "float32");
            AIMASS_CHECK(numel(b) == N && b.ndim() == 1, ValueError, "bias must have shape [", N, "], got ",
                         numel(b), " elements in ", b.ndim(), " dimensions");
          }
          const q::LinearKernel kind = q::parse_linear_kernel(kernel.c_str());
          const q::ActivationPrecision act = q::parse_activation_precision(activation_precision.c_str());
          const int64_t M = x.shape(0);
          auto y = empty<float>({M, N});
          float* yp = y.mutable_data();
          {
            py::gil_scoped_release nogil_;
            q::linear(w, xp, M, bp, yp, kind, act);
          }
          return y;
        },
        py::arg("w"), py::arg("x"), py::arg("bias") = py::none(), py::arg("kernel") = "auto",
        py::arg("activation_precision") = "int16");

  m.def("qlinear_plan",
        [](const q::PackedLinear& w, int64_t M, const std::string& kernel, const std::string& activation_precision) {
          const q::LinearPlan plan = q::plan_linear(w, M, q::parse_linear_kernel(kernel.c_str()),
                                                    q::parse_activation_precision(activation_precision.c_str()));
          return py::make_tuple(std::string(q::linear_kernel_name(plan.kernel)), std::string(plan.activations));
        },
        py::arg("w"), py::arg("M"), py::arg("kernel") = "auto", py::arg("activation_precision") = "int16");

  m.def("qlinear_choose_kernel", [](const q::PackedLinear& w, int64_t M) {
    return std::string(q::linear_kernel_name(q::choose_linear_kernel(w, M)));
  }, py::arg("w"), py::arg("M"));

  m.def("qlinear_dequantize",
        [](int bits, int64_t N, int64_t K, int64_t group_size, py::array data, py::array scale) {
          check_weight(bits, N, K, group_size, data, scale);
          auto out = empty<float>({N, K});
          const void* d = data.data();
          const float* s = static_cast<const float*>(scale.data());
          float* o = out.mutable_data();
          py::gil_scoped_release nogil_;
          q::dequantize_linear_weight(bits, N, K, group_size, d, s, o);
          return out;
        },
        py::arg("bits"), py::arg("N"), py::arg("K"), py::arg("group_size"), py::arg("data"), py::arg("scale"));
}

}  // namespace aimass_bind
