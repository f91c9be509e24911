// Checked size arithmetic for anything whose value came from a file, the
// network or a caller: shapes, row counts, offsets, batch sizes. One place, so
// the shard reader, the loader, the model loader and the executor all reject a
// product that wraps around 2^64 the same way instead of allocating or indexing
// with the wrapped value.
//
//   size_t bytes = checked::mul<CorruptDataError>(rows, row_bytes, "tensor 'w'");
//   size_t n = checked::product<CorruptDataError>(shape, "tensor 'w' shape");
//   int64_t v = checked::to_int64<CorruptDataError>(json_double, "dim 2 of 'w'");
#pragma once
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "aimass/error.h"

namespace aimass {
namespace checked {

// a * b, or throw Kind("<what>: a x b overflows ...").
template <typename Kind = ValueError, typename T>
inline T mul(T a, T b, const std::string& what) {
  static_assert(std::is_integral<T>::value, "checked::mul is for integers");
  T r;
  if (__builtin_mul_overflow(a, b, &r))
    throw Kind(detail::concat(what, ": ", a, " x ", b, " overflows a ",
                              sizeof(T) * 8, "-bit size"));
  return r;
}

// a + b, or throw Kind.
template <typename Kind = ValueError, typename T>
inline T add(T a, T b, const std::string& what) {
  static_assert(std::is_integral<T>::value, "checked::add is for integers");
  T r;
  if (__builtin_add_overflow(a, b, &r))
    throw Kind(detail::concat(what, ": ", a, " + ", b, " overflows a ",
                              sizeof(T) * 8, "-bit size"));
  return r;
}

// Product of every dim as size_t; each dim must be >= 0. Works on any
// container of integers (std::vector<int64_t>, std::array, ...).
template <typename Kind = ValueError, typename Dims>
inline size_t product(const Dims& dims, const std::string& what) {
  size_t n = 1;
  size_t i = 0;
  for (auto d : dims) {
    if (d < 0)
      throw Kind(detail::concat(what, ": dim ", i, " is negative (", d, ")"));
    size_t r;
    if (__builtin_mul_overflow(n, static_cast<size_t>(d), &r))
      throw Kind(detail::concat(what, ": the product of the dims overflows at dim ", i,
                                " (", d, ")"));
    n = r;
    ++i;
  }
  return n;
}

// A JSON number (double) to int64 without undefined behaviour: rejects NaN,
// +-inf, fractions and values outside [-2^63, 2^63).
template <typename Kind = ValueError>
inline int64_t to_int64(double v, const std::string& what) {
  // 2^63 exactly is representable as a double; every double below it fits.
  constexpr double kLimit = 9223372036854775808.0;
  if (!std::isfinite(v) || v < -kLimit || v >= kLimit)
    throw Kind(detail::concat(what, ": ", v, " is not an integer in the int64 range"));
  if (std::trunc(v) != v)
    throw Kind(detail::concat(what, ": ", v, " is not an integer"));
  return static_cast<int64_t>(v);
}

// Narrow an integer to T, or throw Kind (e.g. int64 -> int32 for a kernel).
template <typename T, typename Kind = ValueError, typename U>
inline T narrow(U v, const std::string& what) {
  static_assert(std::is_integral<T>::value && std::is_integral<U>::value, "integers only");
  T r = static_cast<T>(v);
  if (static_cast<U>(r) != v || ((r < T{}) != (v < U{})))
    throw Kind(detail::concat(what, ": ", v, " does not fit in a ", sizeof(T) * 8,
                              "-bit ", std::is_signed<T>::value ? "signed" : "unsigned",
                              " integer"));
  return r;
}

// True when [off, off + len) lies inside [0, limit) without wrapping.
inline bool range_fits(uint64_t off, uint64_t len, uint64_t limit) {
  return off <= limit && len <= limit - off;
}

}  // namespace checked
}  // namespace aimass
