// Core bindings: exception types, CPU features, thread settings, host buffers.
#include "aimass/blas.h"
#include "aimass/cpu_features.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "common.h"

namespace aimass_bind {

void bind_core(py::module_& m) {
  m.doc() = "aimass engine (C++), bindings only; import aimass instead";

  static py::exception<aimass::DistributedError> distributed(m, "DistributedError", PyExc_RuntimeError);
  static py::exception<aimass::CorruptDataError> corrupt(m, "CorruptDataError", PyExc_ValueError);
  static py::exception<aimass::QueueFullError> queue_full(m, "QueueFullError", PyExc_RuntimeError);
  static py::exception<aimass::ClosedError> closed(m, "ClosedError", PyExc_RuntimeError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const aimass::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    } catch (const aimass::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what());
    } catch (const aimass::TimeoutError& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const aimass::IOError& e) {
      PyErr_SetString(PyExc_OSError, e.what());
    } catch (const aimass::DistributedError& e) {
      py::set_error(distributed, e.what());
    } catch (const aimass::CorruptDataError& e) {
      py::set_error(corrupt, e.what());
    } catch (const aimass::QueueFullError& e) {
      py::set_error(queue_full, e.what());
    } catch (const aimass::ClosedError& e) {
      py::set_error(closed, e.what());
    } catch (const aimass::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what());
    }
  });

  m.def("cpu_features", [] {
    const auto& f = aimass::cpu_features();
    py::dict d;
    d["sse4.2"] = f.sse42;
    d["avx2"] = f.avx2;
    d["fma"] = f.fma;
    d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f;
    d["avx512bw"] = f.avx512bw;
    d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq;
    d["avx512vnni"] = f.avx512vnni;
    d["avx512bf16"] = f.avx512bf16;
    d["simd"] = aimass::simd_level_name(aimass::simd_level());
    return d;
  });
  m.def("simd_level", [] { return std::string(aimass::simd_level_name(aimass::simd_level())); });
  m.def("set_simd_level", [](const std::string& name) {
    return std::string(aimass::simd_level_name(aimass::set_simd_level(aimass::parse_simd_level(name))));
  }, py::arg("level"));
  m.def("num_threads", &aimass::num_threads);
  // The engine pool only: OpenBLAS stays single-threaded on its caller (blas.cc's policy; its
  // spinning workers made small sgemm calls take 40-60 ms on a busy 2-core machine).
  m.def("set_num_threads", [](int n) { aimass::set_num_threads(n); }, py::arg("n"));
  // the GIL stays held: a few atomics, and a futex wake only when a worker is parked
  m.def("wake_workers", [](int poll_us) { aimass::wake_workers(poll_us); }, py::arg("poll_us") = 0,
        "Hint: parked engine threads poll for work for max(AIMASS_SPIN_US, poll_us) from now.");
  // A/B switch for benches and tests (aimass/parallel.h RunScope); not part of the public Python API
  m.def("set_run_spin_us", [](int us) { aimass::set_run_spin_us(us); }, py::arg("us"),
        "How long idle engine threads poll for the next job while a runtime run is in progress (0: off).");
  m.def("run_spin_us", &aimass::run_spin_us);
  // A/B switch for benches (aimass/parallel.h set_wake_steering); not part of the public Python API
  m.def("set_wake_steering", [](bool on) { aimass::set_wake_steering(on); }, py::arg("on"),
        "Whether a parked engine thread's wake-up is steered off the caller's CPU (AIMASS_WAKE_STEER).");
  m.def("wake_steering", &aimass::wake_steering);
  // Zeroed host memory that the kernel may back with 2 MiB pages (aimass/memory.h), as bytes through
  // the buffer protocol: torch.frombuffer / np.frombuffer wrap it without a copy and keep it alive.
  py::class_<aimass::AlignedBuffer>(m, "HostBuffer", py::buffer_protocol())
      .def(py::init([](int64_t nbytes) {
             if (nbytes <= 0) throw py::value_error("HostBuffer: nbytes must be positive, got " + std::to_string(nbytes));
             return std::make_unique<aimass::AlignedBuffer>(static_cast<size_t>(nbytes));
           }),
           py::arg("nbytes"))
      .def("__len__", &aimass::AlignedBuffer::size)
      .def_buffer([](aimass::AlignedBuffer& b) {
        return py::buffer_info(b.data(), 1, py::format_descriptor<uint8_t>::format(), 1,
                               {static_cast<py::ssize_t>(b.size())}, {py::ssize_t{1}});
      });
}

}  // namespace aimass_bind
