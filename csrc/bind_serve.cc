// Serve bindings: the numeric-body reader of the JSON hot routes, and the native floor server
// (aimass/serve.h), used by aimass.bench._native_floor.
#include <cmath>
#include <limits>

#include "aimass/serve.h"
#include "common.h"

namespace aimass_bind {

namespace sv = aimass::serve;

namespace {
// float32 array of `shape` from doubles; None when a value is out of float range (numpy makes it
// inf with a warning: the general path keeps that behaviour).
py::object float_array(const std::vector<double>& values, const std::vector<int64_t>& shape) {
  for (double v : values)
    if (std::fabs(v) > static_cast<double>(std::numeric_limits<float>::max())) return py::none();
  py::array_t<float> out(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  float* dst = out.mutable_data();
  for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<float>(values[i]);
  return std::move(out);
}

// A str from UTF-8 bytes, or None when they are not valid UTF-8 (orjson then words the error).
py::object utf8(const std::string& s) {
  PyObject* o = PyUnicode_DecodeUTF8(s.data(), static_cast<Py_ssize_t>(s.size()), nullptr);
  if (!o) {
    PyErr_Clear();
    return py::none();
  }
  return py::reinterpret_steal<py::object>(o);
}
}  // namespace

void bind_serve(py::module_& m) {
  // {"<key>": nested numbers} -> a float32 array of the nesting's shape, or None for any other body
  // (aimass.serve.hot then parses it with orjson, which also words the errors).
  m.def("json_number_body", [](py::bytes body, const std::string& key) -> py::object {
    char* data = nullptr;
    Py_ssize_t len = 0;
    if (PyBytes_AsStringAndSize(body.ptr(), &data, &len) != 0) throw py::error_already_set();
    std::vector<double> values;
    std::vector<int64_t> shape;
    bool ok;
    {
      py::gil_scoped_release nogil;  // `body` stays referenced by the caller's frame
      ok = sv::read_number_body(data, static_cast<size_t>(len), key, values, shape);
    }
    if (!ok) return py::none();
    return float_array(values, shape);
  }, py::arg("body"), py::arg("key"));
  // A KServe v2 JSON body of FP32 tensors only ({"inputs": [{name, datatype, shape, data}]}) ->
  // [{"name", "datatype", "shape": [int], "data": float32 array}], or None for any other body.
  m.def("json_v2_inputs", [](py::bytes body) -> py::object {
    char* data = nullptr;
    Py_ssize_t len = 0;
    if (PyBytes_AsStringAndSize(body.ptr(), &data, &len) != 0) throw py::error_already_set();
    std::vector<sv::V2JsonInput> ins;
    bool ok;
    {
      py::gil_scoped_release nogil;
      ok = sv::read_v2_json_inputs(data, static_cast<size_t>(len), ins);
    }
    if (!ok) return py::none();
    py::list out;
    for (const auto& in : ins) {
      py::object name = utf8(in.name), arr = float_array(in.values, in.data_shape);
      if (name.is_none() || arr.is_none()) return py::none();
      py::dict d;
      d["name"] = name;
      d["datatype"] = in.datatype;
      py::list shape;
      for (int64_t v : in.shape) shape.append(py::int_(v));
      d["shape"] = shape;
      d["data"] = arr;
      out.append(d);
    }
    return std::move(out);
  }, py::arg("body"));
  py::class_<sv::FloorServer>(m, "NativeFloorServer")
      .def(py::init([](const std::string& path, const std::string& host, int port, const std::string& model_name,
                       int64_t max_batch_size, int64_t max_queue_delay_us, int64_t max_body_bytes,
                       int64_t max_header_bytes, bool run_inline) {
             sv::FloorOptions o;
             o.host = host;
             o.port = port;
             o.model_name = model_name;
             o.max_batch_size = max_batch_size;
             o.max_queue_delay_us = max_queue_delay_us;
             o.run_inline = run_inline;
             AIMASS_CHECK(max_header_bytes >= 64 && max_header_bytes <= (int64_t{1} << 30), ValueError,
                          "NativeFloorServer: max_header_bytes must be in [64, 2^30]");
             o.limits.max_body_bytes = max_body_bytes;
             o.limits.max_header_bytes = static_cast<size_t>(max_header_bytes);
             return new sv::FloorServer(path, o);
           }),
           py::arg("path"), py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("model_name") = "model",
           py::arg("max_batch_size") = 32, py::arg("max_queue_delay_us") = 500,
           py::arg("max_body_bytes") = int64_t{64} << 20, py::arg("max_header_bytes") = 16384,
           py::arg("run_inline") = true, nogil())
      .def_property_readonly("port", &sv::FloorServer::port)
      .def_property_readonly("requests", &sv::FloorServer::requests)
      .def_property_readonly("inline_runs", &sv::FloorServer::inline_runs)
      // blocks until stop(); the GIL is released, so another Python thread calls stop()
      .def("serve", &sv::FloorServer::serve, nogil())
      .def("stop", &sv::FloorServer::stop);
}

}  // namespace aimass_bind
