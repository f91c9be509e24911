// Runtime bindings: model file, executor, batcher. Arrays are checked here
// (dtype, contiguity, row shape) and passed to C++ as raw pointers; the Python
// objects that own them are kept alive by the Ticket until the request is done.
#include <mutex>

#include "aimass/batcher.h"
#include "aimass/runtime.h"
#include "common.h"

namespace aimass_bind {
namespace rt = aimass::runtime;

namespace {

py::list specs(const std::vector<rt::TensorSpec>& v) {
  py::list out;
  for (const auto& s : v) {
    py::dict d;
    d["name"] = s.name;
    d["dtype"] = rt::value_type_name(s.dtype);
    d["shape"] = py::tuple(py::cast(s.shape));
    out.append(d);
  }
  return out;
}

// Checks `arrays` against the model inputs and returns the common row count; `seq` gets
// the common length of the dynamic (-1) dims after the batch dim (0 when there are none).
int64_t check_arrays(const rt::Model& m, const std::vector<py::array>& arrays, std::vector<const void*>& ptrs,
                     int64_t& seq) {
  seq = 0;
  AIMASS_CHECK(arrays.size() == m.inputs().size(), ValueError, "the model takes ", m.inputs().size(),
               " inputs, got ", arrays.size());
  int64_t rows = -1;
  for (size_t i = 0; i < m.inputs().size(); ++i) {
    const auto& spec = m.inputs()[i];
    const py::array& a = arrays[i];
    const std::string nm = "input '" + spec.name + "'";
    if (spec.dtype == rt::ValueType::Float32) cdata<float>(a, nm.c_str(), "float32");
    else cdata<int64_t>(a, nm.c_str(), "int64");
    auto sh = shape_of(a);
    std::vector<int64_t> want(spec.shape.begin() + 1, spec.shape.end());
    bool ok = sh.size() == spec.shape.size();
    for (size_t k = 0; ok && k < want.size(); ++k) ok = want[k] < 0 ? sh[k + 1] >= 1 : want[k] == sh[k + 1];
    if (!ok) {
      std::string got, exp = "[batch";
      for (size_t k = 0; k < sh.size(); ++k) got += (k ? ", " : "") + std::to_string(sh[k]);
      for (auto d : want) exp += d < 0 ? std::string(", seq") : ", " + std::to_string(d);
      throw aimass::ValueError(nm + " has shape [" + got + "], the model expects " + exp + "]");
    }
    for (size_t k = 0; k < want.size(); ++k) {
      if (want[k] >= 0) continue;
      AIMASS_CHECK(seq == 0 || seq == sh[k + 1], ValueError, nm, " has sequence length ", sh[k + 1],
                   " but an earlier dynamic dim has ", seq, "; every dynamic dim of one request must agree");
      seq = sh[k + 1];
    }
    AIMASS_CHECK(sh[0] >= 1, ValueError, nm, " has no rows");
    AIMASS_CHECK(rows < 0 || rows == sh[0], ValueError, "all inputs need the same batch size; ", nm, " has ", sh[0],
                 " rows, an earlier input ", rows);
    rows = sh[0];
    ptrs.push_back(a.data());
  }
  return rows;
}

int64_t check_inputs(const rt::Model& m, const py::list& arrays, std::vector<const void*>& ptrs, int64_t& seq) {
  std::vector<py::array> v;
  v.reserve(py::len(arrays));
  for (auto a : arrays) v.push_back(a.cast<py::array>());
  return check_arrays(m, v, ptrs, seq);
}

// The arrays of `inputs` (a dict name -> array) when each is already a C-contiguous
// numpy array of the input's dtype with a batch dimension; empty when anything needs
// the Python layer's conversion (torch tensors, other dtypes, a missing batch dim).
std::vector<py::array> plain_inputs(const rt::Model& m, py::handle inputs) {
  std::vector<py::array> out;
  if (!PyDict_CheckExact(inputs.ptr()) || PyDict_Size(inputs.ptr()) != static_cast<Py_ssize_t>(m.inputs().size()))
    return out;
  out.reserve(m.inputs().size());
  for (const auto& spec : m.inputs()) {
    PyObject* item = PyDict_GetItemString(inputs.ptr(), spec.name.c_str());  // borrowed
    if (!item || !py::isinstance<py::array>(item)) return {};
    auto a = py::reinterpret_borrow<py::array>(item);
    const bool dtype_ok = spec.dtype == rt::ValueType::Float32 ? py::dtype::of<float>().equal(a.dtype())
                                                                : py::dtype::of<int64_t>().equal(a.dtype());
    if (!dtype_ok || !(a.flags() & py::array::c_style) || a.ndim() != static_cast<py::ssize_t>(spec.shape.size()))
      return {};
    out.push_back(std::move(a));
  }
  return out;
}

// Output shape for `rows` rows; dynamic dims after the batch are the request's length.
std::vector<int64_t> out_shape(const rt::TensorSpec& o, int64_t rows, int64_t seq) {
  std::vector<int64_t> sh = o.shape;
  sh[0] = rows;
  for (size_t k = 1; k < sh.size(); ++k)
    if (sh[k] < 0) sh[k] = seq;
  return sh;
}

py::list alloc_outputs(const rt::Model& m, int64_t rows, int64_t seq, std::vector<void*>& ptrs) {
  py::list outs;
  for (const auto& o : m.outputs()) {
    std::vector<int64_t> sh = out_shape(o, rows, seq);
    py::array a = o.dtype == rt::ValueType::Float32 ? py::array(empty<float>(sh)) : py::array(empty<int64_t>(sh));
    ptrs.push_back(a.mutable_data());
    outs.append(a);
  }
  return outs;
}

struct PyExecutor {
  std::shared_ptr<rt::Executor> exec;
  std::mutex mu;  // the executor's arena serves one run at a time
};

py::dict hist(const rt::Histogram& h) {
  py::dict d;
  d["bounds"] = h.bounds;
  d["counts"] = h.counts;
  d["count"] = h.count;
  d["sum"] = h.sum;
  return d;
}

struct Ticket {
  std::shared_ptr<rt::Request> req;
  py::list inputs, outputs;  // keep the buffers alive while C++ uses them
  ~Ticket() {
    if (req && !req->done()) {
      py::gil_scoped_release nogil;
      while (!req->wait_for(1000000)) {
      }
    }
  }
};

}  // namespace

void bind_runtime(py::module_& parent) {
  auto m = parent.def_submodule("runtime", "inference runtime engine (use aimass.runtime)");
  m.attr("FORMAT_VERSION") = rt::kFormatVersion;
  // Rows up to which fp32 Linear layers use the packed small-M kernel instead of sgemm
  // (tests and bench/bench_runtime.py compare both; 0 = off). Returns the previous value.
  m.def("set_packed_max_rows", &rt::set_packed_max_rows, py::arg("rows"));
  m.def("packed_max_rows", &rt::packed_max_rows);

  py::class_<rt::Model, std::shared_ptr<rt::Model>>(m, "Model")
      .def_static("load", &rt::Model::load, py::arg("path"), nogil())
      .def_property_readonly("inputs", [](const rt::Model& mm) { return specs(mm.inputs()); })
      .def_property_readonly("outputs", [](const rt::Model& mm) { return specs(mm.outputs()); })
      .def_property_readonly("metadata", [](const rt::Model& mm) { return mm.metadata(); })
      .def_property_readonly("format_version", &rt::Model::format_version)
      .def_property_readonly("path", &rt::Model::path)
      .def_property_readonly("file_bytes", &rt::Model::file_bytes)
      .def_property_readonly("num_nodes", [](const rt::Model& mm) { return mm.nodes().size(); });

  py::class_<PyExecutor, std::shared_ptr<PyExecutor>>(m, "Executor")
      .def(py::init([](std::shared_ptr<rt::Model> model, int64_t max_batch_size) {
             auto e = std::make_shared<PyExecutor>();
             py::gil_scoped_release nogil;
             e->exec = std::make_shared<rt::Executor>(model, rt::ExecutorOptions{max_batch_size});
             return e;
           }),
           py::arg("model"), py::arg("max_batch_size") = 32)
      .def("run", [](PyExecutor& e, const py::list& inputs) {
             const rt::Model& mm = e.exec->model();
             std::vector<const void*> in;
             std::vector<void*> out;
             int64_t seq = 0;
             int64_t rows = check_inputs(mm, inputs, in, seq);
             py::list outs = alloc_outputs(mm, rows, seq, out);
             {
               py::gil_scoped_release nogil;
               std::lock_guard<std::mutex> lk(e.mu);
               e.exec->set_seq_len(seq);
               e.exec->run(rows, in.data(), out.data());
             }
             return outs;
           }, py::arg("inputs"))
      .def_property_readonly("num_steps", [](PyExecutor& e) { return e.exec->num_steps(); })
      .def_property_readonly("arena_bytes", [](PyExecutor& e) { return e.exec->arena_bytes(); })
      .def_property_readonly("capacity", [](PyExecutor& e) { return e.exec->capacity(); });

  py::class_<Ticket, std::shared_ptr<Ticket>>(m, "Ticket")
      .def_property_readonly("id", [](const Ticket& t) { return t.req->id(); })
      .def("done", [](const Ticket& t) { return t.req->done(); })
      .def("wait", [](Ticket& t) {
             {
               py::gil_scoped_release nogil;
               t.req->wait();
             }
             return t.outputs;
           })
      .def("result", [](Ticket& t) {
             t.req->rethrow();
             return t.outputs;
           })
      .def("wait_for", [](Ticket& t, int64_t timeout_us) { return t.req->wait_for(timeout_us); },
           py::arg("timeout_us"), nogil());

  py::class_<rt::Batcher, std::shared_ptr<rt::Batcher>>(m, "Batcher")
      .def(py::init([](std::shared_ptr<rt::Model> model, int64_t max_batch_size, int64_t max_queue_delay_us,
                       int64_t queue_capacity) {
             rt::BatcherOptions o{max_batch_size, max_queue_delay_us, queue_capacity};
             AIMASS_CHECK(max_batch_size >= 1, ValueError, "max_batch_size=", max_batch_size, " must be >= 1");
             py::gil_scoped_release nogil;
             auto exec = std::make_shared<rt::Executor>(model, rt::ExecutorOptions{max_batch_size});
             return std::make_shared<rt::Batcher>(exec, o);
           }),
           py::arg("model"), py::arg("max_batch_size") = 32, py::arg("max_queue_delay_us") = 500,
           py::arg("queue_capacity") = 1024)
      .def("submit", [](rt::Batcher& b, const py::list& inputs, int priority, int64_t timeout_us, bool notify,
                        bool run_inline) {
             auto t = std::make_shared<Ticket>();
             std::vector<const void*> in;
             std::vector<void*> out;
             int64_t seq = 0;
             int64_t rows = check_inputs(b.model(), inputs, in, seq);
             t->inputs = inputs;
             t->outputs = alloc_outputs(b.model(), rows, seq, out);
             if (run_inline) {
               // may run the request right here: never hold the GIL for that
               py::gil_scoped_release nogil;
               t->req = b.submit(std::move(in), std::move(out), rows, priority, timeout_us, notify, run_inline, seq);
             } else {
               // only enqueues (the scheduler thread never takes the GIL): keeping the GIL avoids a hand-off
               // to another Python thread (e.g. the futures dispatcher) and the wait to get it back
               t->req = b.submit(std::move(in), std::move(out), rows, priority, timeout_us, notify, run_inline, seq);
             }
             return t;
           }, py::arg("inputs"), py::arg("priority") = 0, py::arg("timeout_us") = -1, py::arg("notify") = false,
           py::arg("run_inline") = false)
      // The blocking path in one call: check, enqueue (or run inline), wait on the
      // request's own condition variable without the GIL, return the outputs.
      .def("run", [](rt::Batcher& b, const py::list& inputs, int priority, int64_t timeout_us) {
             std::vector<const void*> in;
             std::vector<void*> out;
             int64_t seq = 0;
             const int64_t rows = check_inputs(b.model(), inputs, in, seq);
             py::list outs = alloc_outputs(b.model(), rows, seq, out);
             {
               py::gil_scoped_release nogil;
               b.run(std::move(in), std::move(out), rows, priority, timeout_us, seq);
             }
             return outs;
           }, py::arg("inputs"), py::arg("priority") = 0, py::arg("timeout_us") = -1)
      // Session.run's hot path: a dict of plain numpy arrays in, a dict out (one call, no
      // Python-side conversion); None when the inputs need the Python layer's conversion.
      // inline_only (Session.run_async(inline=True)'s fast path): run it on this thread only if
      // the batcher would run it inline (Batcher::try_run_inline), else None, nothing queued.
      .def("run_plain", [](rt::Batcher& b, py::handle inputs, int priority, int64_t timeout_us,
                           bool inline_only) -> py::object {
             const rt::Model& mm = b.model();
             std::vector<py::array> arrays = plain_inputs(mm, inputs);
             if (arrays.empty()) return py::none();
             std::vector<const void*> in;
             std::vector<void*> out;
             int64_t seq = 0;
             const int64_t rows = check_arrays(mm, arrays, in, seq);
             py::dict result;
             for (const auto& o : mm.outputs()) {
               std::vector<int64_t> sh = out_shape(o, rows, seq);
               py::array a = o.dtype == rt::ValueType::Float32 ? py::array(empty<float>(sh))
                                                               : py::array(empty<int64_t>(sh));
               out.push_back(a.mutable_data());
               result[py::str(o.name)] = std::move(a);
             }
             bool ran = true;
             {
               py::gil_scoped_release nogil;
               if (inline_only)
                 ran = b.try_run_inline(std::move(in), std::move(out), rows, priority, timeout_us, seq);
               else
                 b.run(std::move(in), std::move(out), rows, priority, timeout_us, seq);
             }
             if (!ran) return py::none();
             return std::move(result);
           }, py::arg("inputs"), py::arg("priority") = 0, py::arg("timeout_us") = -1, py::arg("inline_only") = false)
      .def("wait_completed", &rt::Batcher::wait_completed, py::arg("timeout_us"), nogil())
      .def("close", &rt::Batcher::close, nogil())
      .def_property_readonly("closed", &rt::Batcher::closed)
      .def("stats", [](const rt::Batcher& b) {
        rt::BatcherStats s = b.stats();
        py::dict d, req;
        req["submitted"] = s.submitted;
        req["ok"] = s.ok;
        req["timeout"] = s.timeout;
        req["error"] = s.error;
        req["rejected_full"] = s.rejected_full;
        req["rejected_closed"] = s.rejected_closed;
        d["requests"] = req;
        d["batches"] = s.batches;
        d["inline_runs"] = s.inline_runs;
        d["queue_depth"] = s.queue_depth;
        d["queue_us"] = hist(s.queue_us);
        d["compute_us"] = hist(s.compute_us);
        d["batch_rows"] = hist(s.batch_rows);
        d["batch_requests"] = hist(s.batch_requests);
        return d;
      });
}

}  // namespace aimass_bind
