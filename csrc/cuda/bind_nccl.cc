// Bindings for the NCCL backend (aimass.dist routes CUDA tensors here through
// python/aimass/_dist_nccl.py). Device pointers and streams cross as integers.
#include "aimass/nccl.h"
#include "common.h"

namespace aimass_bind {

namespace nc = aimass::nccl;

void bind_nccl(py::module_& m) {
  m.def("nccl_compiled", &nc::compiled);
  m.def("nccl_load", &nc::load, py::arg("library"), nogil());
  m.def("nccl_loaded", &nc::loaded);
  m.def("nccl_version", &nc::version);
  m.def("nccl_unique_id", [] {
    auto id = nc::unique_id();
    return py::bytes(reinterpret_cast<const char*>(id.data()), id.size());
  });
  py::class_<nc::Comm>(m, "NcclComm")
      .def(py::init([](py::bytes id, int nranks, int rank, int device) {
             std::string s = id;
             std::vector<uint8_t> v(s.begin(), s.end());
             py::gil_scoped_release release;  // ncclCommInitRank blocks until every rank joined
             return std::make_unique<nc::Comm>(v, nranks, rank, device);
           }),
           py::arg("unique_id"), py::arg("nranks"), py::arg("rank"), py::arg("device"))
      .def_property_readonly("rank", &nc::Comm::rank)
      .def_property_readonly("size", &nc::Comm::size)
      .def_property_readonly("device", &nc::Comm::device)
      .def_property_readonly("closed", &nc::Comm::closed)
      .def("allreduce",
           [](nc::Comm& c, uintptr_t send, uintptr_t recv, size_t count, const std::string& dtype,
              const std::string& op, uintptr_t stream) {
             c.allreduce(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), count, dtype, op, stream);
           },
           py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"), py::arg("op"), py::arg("stream"),
           nogil())
      .def("broadcast",
           [](nc::Comm& c, uintptr_t send, uintptr_t recv, size_t count, const std::string& dtype, int root,
              uintptr_t stream) {
             c.broadcast(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), count, dtype, root,
                         stream);
           },
           py::arg("send"), py::arg("recv"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("stream"),
           nogil())
      .def("allgather",
           [](nc::Comm& c, uintptr_t send, uintptr_t recv, const std::vector<size_t>& counts,
              const std::string& dtype, uintptr_t stream) {
             c.allgather(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), counts, dtype, stream);
           },
           py::arg("send"), py::arg("recv"), py::arg("counts"), py::arg("dtype"), py::arg("stream"), nogil())
      .def("reduce_scatter",
           [](nc::Comm& c, uintptr_t send, uintptr_t recv, const std::vector<size_t>& counts,
              const std::string& dtype, const std::string& op, uintptr_t stream) {
             c.reduce_scatter(reinterpret_cast<const void*>(send), reinterpret_cast<void*>(recv), counts, dtype, op,
                              stream);
           },
           py::arg("send"), py::arg("recv"), py::arg("counts"), py::arg("dtype"), py::arg("op"), py::arg("stream"),
           nogil())
      .def("wait", &nc::Comm::wait, py::arg("stream"), py::arg("timeout"), nogil())
      .def("query", &nc::Comm::query, py::arg("stream"), nogil())
      .def("abort", &nc::Comm::abort, nogil());
}

}  // namespace aimass_bind
