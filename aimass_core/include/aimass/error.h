// Typed errors of the engine. The Python bindings map each kind to one Python
// exception (see csrc/bind_core.cc); C++ users catch aimass::Error.
#pragma once
#include <sstream>
#include <stdexcept>
#include <string>

namespace aimass {

class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};
// A bad argument value (shape, range, option). Python: ValueError.
class ValueError : public Error { using Error::Error; };
// A wrong kind of argument (dtype, layout). Python: TypeError.
class TypeError : public Error { using Error::Error; };
// Something did not finish in time. Python: TimeoutError.
class TimeoutError : public Error { using Error::Error; };
// Ranks disagree, a peer died, or MPI/NCCL failed. Python: aimass.DistributedError.
class DistributedError : public Error { using Error::Error; };
// Stored bytes fail their checksum or framing. Python: aimass.CorruptDataError.
class CorruptDataError : public Error { using Error::Error; };
// A bounded queue is full; retry later. Python: aimass.QueueFullError.
class QueueFullError : public Error { using Error::Error; };
// A file could not be read or written. Python: OSError.
class IOError : public Error { using Error::Error; };
// The object was closed or shut down. Python: aimass.ClosedError (a RuntimeError).
class ClosedError : public Error { using Error::Error; };

namespace detail {
template <typename... Args>
std::string concat(Args&&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}
}  // namespace detail

}  // namespace aimass

// AIMASS_CHECK(cond, ValueError, "group_size=", g, " does not divide ", k)
#define AIMASS_CHECK(cond, Kind, ...)                                   \
  do {                                                                  \
    if (!(cond)) throw ::aimass::Kind(::aimass::detail::concat(__VA_ARGS__)); \
  } while (0)
