// Serve bindings: the native floor server (aimass/serve.h), used by aimass.bench._native_floor.
#include "aimass/serve.h"
#include "common.h"

namespace aimass_bind {

namespace sv = aimass::serve;

void bind_serve(py::module_& m) {
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
