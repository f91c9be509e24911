// Serve bindings: the numeric-body reader of the JSON hot routes, and the native floor server
// (aimass/serve.h), used by aimass.bench._native_floor.
#include <cmath>
#include <limits>

#include "aimass/serve.h"
#include "common.h"

namespace aimass_bind {

namespace sv = aimass::serve;

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
    for (double v : values)  // out of float range: numpy makes it inf with a warning; leave that to it
      if (std::fabs(v) > static_cast<double>(std::numeric_limits<float>::max())) return py::none();
    py::array_t<float> out(std::vector<py::ssize_t>(shape.begin(), shape.end()));
    float* dst = out.mutable_data();
    for (size_t i = 0; i < values.size(); ++i) dst[i] = static_cast<float>(values[i]);
    return std::move(out);
  }, py::arg("body"), py::arg("key"));
  py::class_<sv::FloorServer>(m, "NativeFloorServer")
      .def(py::init([](const std::string& path, const std::string& host, int port, const std::string& model_name,
                       int64_t max_batch_size, int64_t max_queue_delay_us, int64_t max_body_bytes,
                       int64_t max_header_bytes) {
             sv::FloorOptions o;
             o.host = host;
             o.port = port;
             o.model_name = model_name;
             o.max_batch_size = max_batch_size;
             o.max_queue_delay_us = max_queue_delay_us;
             AIMASS_CHECK(max_header_bytes >= 64 && max_header_bytes <= (int64_t{1} << 30), ValueError,
                          "NativeFloorServer: max_header_bytes must be in [64, 2^30]");
             o.limits.max_body_bytes = max_body_bytes;
             o.limits.max_header_bytes = static_cast<size_t>(max_header_bytes);
             return new sv::FloorServer(path, o);
           }),
           py::arg("path"), py::arg("host") = "127.0.0.1", py::arg("port") = 0, py::arg("model_name") = "model",
           py::arg("max_batch_size") = 32, py::arg("max_queue_delay_us") = 500,
           py::arg("max_body_bytes") = int64_t{64} << 20, py::arg("max_header_bytes") = 16384, nogil())
      .def_property_readonly("port", &sv::FloorServer::port)
      .def_property_readonly("requests", &sv::FloorServer::requests)
      // blocks until stop(); the GIL is released, so another Python thread calls stop()
      .def("serve", &sv::FloorServer::serve, nogil())
      .def("stop", &sv::FloorServer::stop);
}

}  // namespace aimass_bind
