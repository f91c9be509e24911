// Serve bindings: the numeric-body reader of the JSON hot routes, and the native floor server
// (aimass/serve.h), used by aimass.bench._native_floor.
#include <cmath>
#include <limits>

#include "aimass/batcher.h"
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
  // float32 values as orjson writes a numpy float32 array (the native front end's number layout)
  m.def("f32_json", [](py::array_t<float, py::array::c_style | py::array::forcecast> a) {
    std::string out = "[";
    const float* p = a.data();
    for (py::ssize_t i = 0; i < a.size(); ++i) {
      if (i) out += ',';
      sv::append_f32_json(out, p[i]);
    }
    out += ']';
    return py::bytes(out);
  });
  m.def("native_frontend_available", &sv::frontend_available);
  // aimass serve --http native: the public socket (aimass.serve.native drives it)
  py::class_<sv::Frontend>(m, "NativeFrontend")
      .def(py::init([](const std::string& host, int port, int upstream_port, int max_connections, double idle_timeout_s,
                       int64_t deadline_us, int64_t max_body_bytes, std::vector<double> bounds) {
             sv::FrontendOptions o;
             o.host = host;
             o.port = port;
             o.upstream_port = upstream_port;
             o.max_connections = max_connections;
             o.idle_timeout_s = idle_timeout_s;
             o.deadline_us = deadline_us;
             o.limits.max_body_bytes = max_body_bytes;
             return new sv::Frontend(o, std::move(bounds));
           }),
           py::arg("host"), py::arg("port"), py::arg("upstream_port"), py::arg("max_connections") = 1024,
           py::arg("idle_timeout_s") = 5.0, py::arg("deadline_us") = -1, py::arg("max_body_bytes") = int64_t{64} << 20,
           py::arg("latency_bounds") = std::vector<double>{})
      .def_property_readonly("port", &sv::Frontend::port)
      .def("serve", &sv::Frontend::serve, nogil())
      .def("stop", &sv::Frontend::stop)
      // models: [(name, default version or -1, [(key, version, Batcher)], {label: version})]
      .def("set_routes", [](sv::Frontend& f, const py::list& models, const std::string& predict_model) {
        auto r = std::make_shared<sv::Routes>();
        r->predict_model = predict_model;
        for (py::handle h : models) {
          auto t = h.cast<py::tuple>();
          sv::RouteModel rm;
          rm.name = t[0].cast<std::string>();
          rm.default_version = t[1].cast<int64_t>();
          for (py::handle vh : t[2].cast<py::list>()) {
            auto vt = vh.cast<py::tuple>();
            auto rv = std::make_shared<sv::RouteVersion>();
            rv->key = vt[0].cast<int64_t>();
            rv->version = vt[1].cast<int64_t>();
            rv->batcher = vt[2].cast<std::shared_ptr<aimass::runtime::Batcher>>();
            rm.versions[rv->version] = rv;
          }
          for (auto kv : t[3].cast<py::dict>()) rm.labels[kv.first.cast<std::string>()] = kv.second.cast<int64_t>();
          r->models[rm.name] = std::move(rm);
        }
        f.set_routes(std::move(r));
      }, py::arg("models"), py::arg("predict_model"))
      .def("version_busy", &sv::Frontend::version_busy)
      // tokens: [(name, sha256 digest bytes, has infer scope, models list or None, rate or 0, burst,
      //          auth.py's scope error, auth.py's model error up to the model name, optionally its 429
      //          message)]
      .def("set_tokens", [](sv::Frontend& f, const py::list& tokens, bool enabled) {
        std::vector<sv::TokenEntry> out;
        for (py::handle h : tokens) {
          auto t = h.cast<py::tuple>();
          sv::TokenEntry e;
          e.name = t[0].cast<std::string>();
          e.digest = t[1].cast<std::string>();
          e.infer = t[2].cast<bool>();
          e.all_models = t[3].is_none();
          if (!e.all_models) e.models = t[3].cast<std::vector<std::string>>();
          e.rate = t[4].cast<double>();
          e.burst = t[5].cast<double>();
          e.scope_error = t[6].cast<std::string>();
          e.model_error_prefix = t[7].cast<std::string>();
          if (t.size() > 8) e.rate_error = t[8].cast<std::string>();
          out.push_back(std::move(e));
        }
        f.set_tokens(std::move(out), enabled);
      }, py::arg("tokens"), py::arg("enabled"))
      .def("take_token", [](sv::Frontend& f, py::bytes d) { return f.take_token(std::string(d)); })
      .def("set_draining", &sv::Frontend::set_draining)
      .def_property_readonly("inflight", &sv::Frontend::inflight)
      .def_property_readonly("native_answers", &sv::Frontend::native_answers)
      .def_property_readonly("forwarded", &sv::Frontend::forwarded)
      // [((model, version, protocol, code), n)]
      .def("counts", [](const sv::Frontend& f) {
        py::list out;
        for (const auto& c : f.counts())
          out.append(py::make_tuple(py::make_tuple(c.model, c.version < 0 ? py::object(py::none())
                                                                         : py::object(py::int_(c.version)),
                                                   c.protocol, c.code), c.n));
        return out;
      })
      // [((model, version), [per-bucket counts..., overflow], sum_s)]
      .def("latency", [](const sv::Frontend& f) {
        py::list out;
        for (const auto& l : f.latency())
          out.append(py::make_tuple(py::make_tuple(l.model, l.version), l.counts, l.sum_s));
        return out;
      })
      .def("take_errors", [](sv::Frontend& f) {
        py::list out;
        for (const auto& e : f.take_errors()) {
          py::dict d;
          d["status"] = e.status;
          d["path"] = e.path;
          d["model"] = e.model;
          d["version"] = e.version < 0 ? py::object(py::none()) : py::object(py::int_(e.version));
          d["error"] = e.message;
          d["type"] = e.type;
          out.append(d);
        }
        return out;
      });
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
