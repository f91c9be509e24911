// Shared helpers for the bindings: array checks and conversions, GIL release.
// Arrays cross the boundary through the buffer protocol (numpy arrays; the
// Python layer turns torch/DLPack inputs into numpy views first, zero-copy).
#pragma once
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "aimass/error.h"

namespace py = pybind11;

namespace aimass_bind {

using nogil = py::call_guard<py::gil_scoped_release>;

inline std::vector<int64_t> shape_of(const py::array& a) {
  std::vector<int64_t> s(a.ndim());
  for (py::ssize_t i = 0; i < a.ndim(); ++i) s[i] = a.shape(i);
  return s;
}

inline void require_contiguous(const py::array& a, const char* name) {
  AIMASS_CHECK(a.flags() & py::array::c_style, ValueError, name,
               " must be C-contiguous; call .contiguous() (torch) or np.ascontiguousarray() first");
}

// Checks dtype exactly (no silent conversion, which would copy and hide bugs).
template <typename T>
inline void require_dtype(const py::array& a, const char* name, const char* expected) {
  AIMASS_CHECK(py::dtype::of<T>().is(a.dtype()) || py::dtype::of<T>().equal(a.dtype()), TypeError, name,
               " must have dtype ", expected, ", got ", std::string(py::str(a.dtype())));
}

template <typename T>
inline const T* cdata(const py::array& a, const char* name, const char* expected) {
  require_dtype<T>(a, name, expected);
  require_contiguous(a, name);
  return static_cast<const T*>(a.data());
}

template <typename T>
inline T* mdata(py::array& a, const char* name, const char* expected) {
  require_dtype<T>(a, name, expected);
  require_contiguous(a, name);
  AIMASS_CHECK(a.writeable(), ValueError, name, " must be writeable");
  return static_cast<T*>(a.mutable_data());
}

// Hands engine-owned memory to numpy without a copy: the array keeps `owner` alive.
template <typename T, typename Owner>
py::array_t<T> view_of(std::shared_ptr<Owner> owner, T* data, std::vector<int64_t> shape) {
  auto* keep = new std::shared_ptr<Owner>(std::move(owner));
  py::capsule cap(keep, [](void* p) { delete static_cast<std::shared_ptr<Owner>*>(p); });
  std::vector<py::ssize_t> sh(shape.begin(), shape.end());
  return py::array_t<T>(sh, data, cap);
}

// A fresh numpy array whose buffer C++ writes into (numpy owns it).
template <typename T>
py::array_t<T> empty(const std::vector<int64_t>& shape) {
  std::vector<py::ssize_t> sh(shape.begin(), shape.end());
  return py::array_t<T>(sh);
}

}  // namespace aimass_bind
