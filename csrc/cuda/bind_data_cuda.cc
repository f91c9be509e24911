// Bindings for the data loader's pinned host memory (aimass._cuda). The loader
// takes the allocator as two function addresses (see aimass/data.h HostAllocator).
#include "aimass/data_cuda.h"
#include "common.h"

namespace aimass_bind {

namespace dc = aimass::data::cuda;

void bind_data_cuda(py::module_& m) {
  m.def("data_pinned_allocator", [] {
    return py::make_tuple(reinterpret_cast<uintptr_t>(&dc::pinned_alloc), reinterpret_cast<uintptr_t>(&dc::pinned_free));
  }, "(alloc, free) function addresses of the cudaHostAlloc-backed batch allocator");
  m.def("data_pinned_bytes_in_use", &dc::pinned_bytes_in_use);
  m.def("data_is_pinned", [](uintptr_t p) { return dc::is_pinned(reinterpret_cast<const void*>(p)); }, nogil());
}

}  // namespace aimass_bind
