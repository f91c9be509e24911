// Bindings for the communicator (aimass.dist).
#include "aimass/comm.h"
#include "common.h"

namespace aimass_bind {

void bind_dist(py::module_& m) {
  py::class_<aimass::Communicator, std::shared_ptr<aimass::Communicator>>(m, "Communicator")
      .def(py::init([](uintptr_t handle) {
             return std::make_shared<aimass::Communicator>(aimass::comm_from_handle(handle));
           }),
           py::arg("mpi_handle"), nogil())
      .def_property_readonly("rank", &aimass::Communicator::rank)
      .def_property_readonly("size", &aimass::Communicator::size)
      .def_property_readonly("local_rank", &aimass::Communicator::local_rank)
      .def_property_readonly("local_size", &aimass::Communicator::local_size)
      .def_property_readonly("cross_rank", &aimass::Communicator::cross_rank)
      .def_property_readonly("cross_size", &aimass::Communicator::cross_size)
      .def("free", &aimass::Communicator::free, nogil());
}

}  // namespace aimass_bind
