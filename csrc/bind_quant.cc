// Bindings for quantization (aimass.compress). Python validates and shapes;
// these convert arrays, release the GIL and call the engine.
#include "aimass/quant.h"
#include "common.h"

namespace aimass_bind {
namespace {

aimass::quant::QuantSpec make_spec(int bits, const std::string& scheme, const std::string& granularity,
                                   int64_t outer, int64_t channels, int64_t inner, int64_t group_size) {
  aimass::quant::QuantSpec s;
  s.bits = bits;
  if (scheme == "symmetric") s.scheme = aimass::quant::Scheme::Symmetric;
  else if (scheme == "asymmetric") s.scheme = aimass::quant::Scheme::Asymmetric;
  else throw aimass::ValueError("scheme must be 'symmetric' or 'asymmetric', got '" + scheme + "'");
  if (granularity == "tensor") s.granularity = aimass::quant::Granularity::Tensor;
  else if (granularity == "channel") s.granularity = aimass::quant::Granularity::Channel;
  else if (granularity == "group") s.granularity = aimass::quant::Granularity::Group;
  else throw aimass::ValueError("granularity must be 'tensor', 'channel' or 'group', got '" + granularity + "'");
  s.outer = outer;
  s.channels = channels;
  s.inner = inner;
  s.group_size = group_size;
  aimass::quant::validate(s);
  return s;
}

}  // namespace

void bind_quant(py::module_& m) {
  m.def(
      "quant_quantize",
      [](const py::array& x, const std::string& dtype_name, int bits, const std::string& scheme,
         const std::string& granularity, int64_t outer, int64_t channels, int64_t inner, int64_t group_size) {
        const auto s = make_spec(bits, scheme, granularity, outer, channels, inner, group_size);
        // dtype_name says how to read the bits: float32 (numpy f4), float16 (f2), bfloat16 (uint16 view)
        const aimass::DType dt = aimass::parse_dtype(dtype_name);
        const void* xp = nullptr;
        if (dt == aimass::DType::F32) xp = cdata<float>(x, "w", "float32");
        else if (dt == aimass::DType::BF16) xp = cdata<uint16_t>(x, "w", "bfloat16 (as a uint16 view)");
        else if (dt == aimass::DType::F16) {
          require_contiguous(x, "w");
          AIMASS_CHECK(x.dtype().kind() == 'f' && x.itemsize() == 2, TypeError, "w must have dtype float16");
          xp = x.data();
        } else {
          throw aimass::TypeError("w must be float32, float16 or bfloat16, got " + dtype_name);
        }
        AIMASS_CHECK(static_cast<int64_t>(x.size()) == aimass::quant::numel(s), ValueError,
                     "w has ", x.size(), " elements but the layout describes ", aimass::quant::numel(s));
        const bool asym = s.scheme == aimass::quant::Scheme::Asymmetric;
        auto scale = empty<float>({aimass::quant::num_blocks(s)});
        auto zp = empty<int32_t>({asym ? aimass::quant::num_blocks(s) : 0});
        py::array data;
        if (bits == 8 && !asym) data = empty<int8_t>({aimass::quant::data_bytes(s)});
        else data = empty<uint8_t>({aimass::quant::data_bytes(s)});
        float* sp = scale.mutable_data();
        int32_t* zpp = asym ? zp.mutable_data() : nullptr;
        void* dp = data.mutable_data();
        {
          py::gil_scoped_release release;
          aimass::quant::quantize_auto(s, xp, dt, sp, zpp, dp);
        }
        return py::make_tuple(data, scale, asym ? py::object(zp) : py::object(py::none()));
      },
      py::arg("w"), py::arg("dtype"), py::arg("bits"), py::arg("scheme"), py::arg("granularity"), py::arg("outer"),
      py::arg("channels"), py::arg("inner"), py::arg("group_size"),
      "Quantize contiguous fp32/fp16/bf16 w viewed as [outer, channels, inner]; returns (flat data, scale, zero_point|None).");

  m.def(
      "quant_dequantize",
      [](const py::array& data, const py::array& scale, const py::object& zero_point, int bits,
         const std::string& scheme, const std::string& granularity, int64_t outer, int64_t channels, int64_t inner,
         int64_t group_size) {
        const auto s = make_spec(bits, scheme, granularity, outer, channels, inner, group_size);
        const bool asym = s.scheme == aimass::quant::Scheme::Asymmetric;
        require_contiguous(data, "data");
        AIMASS_CHECK(data.itemsize() == 1, TypeError, "data must be int8 or uint8");
        AIMASS_CHECK(static_cast<int64_t>(data.size()) == aimass::quant::data_bytes(s), ValueError, "data has ",
                     data.size(), " bytes, expected ", aimass::quant::data_bytes(s));
        const float* sp = cdata<float>(scale, "scale", "float32");
        AIMASS_CHECK(static_cast<int64_t>(scale.size()) == aimass::quant::num_blocks(s), ValueError, "scale has ",
                     scale.size(), " entries, expected ", aimass::quant::num_blocks(s));
        const int32_t* zpp = nullptr;
        py::array zp_arr;
        if (asym) {
          AIMASS_CHECK(!zero_point.is_none(), ValueError, "asymmetric data needs zero_point");
          zp_arr = py::reinterpret_borrow<py::array>(zero_point);
          zpp = cdata<int32_t>(zp_arr, "zero_point", "int32");
          AIMASS_CHECK(static_cast<int64_t>(zp_arr.size()) == aimass::quant::num_blocks(s), ValueError,
                       "zero_point has ", zp_arr.size(), " entries, expected ", aimass::quant::num_blocks(s));
        }
        auto out = empty<float>({aimass::quant::numel(s)});
        float* op = out.mutable_data();
        const void* dp = data.data();
        {
          py::gil_scoped_release release;
          aimass::quant::dequantize(s, dp, sp, zpp, op);
        }
        return out;
      },
      py::arg("data"), py::arg("scale"), py::arg("zero_point"), py::arg("bits"), py::arg("scheme"),
      py::arg("granularity"), py::arg("outer"), py::arg("channels"), py::arg("inner"), py::arg("group_size"),
      "Dequantize to a flat fp32 array of the layout's numel.");
}

}  // namespace aimass_bind
