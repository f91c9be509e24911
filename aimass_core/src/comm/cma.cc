// Cross-memory attach reads (see cma.h).
#include "comm/cma.h"

#include <algorithm>
#include <cerrno>
#include <cstring>

#include "aimass/error.h"

namespace aimass {
namespace comm {

namespace {
constexpr size_t kMaxIov = 512;  // below IOV_MAX (1024)
}  // namespace

bool cma_probe(pid_t pid, uint64_t addr, uint64_t expected) {
  uint64_t got = 0;
  iovec l{&got, sizeof(got)};
  iovec r{reinterpret_cast<void*>(addr), sizeof(got)};
  const ssize_t n = process_vm_readv(pid, &l, 1, &r, 1, 0);
  return n == static_cast<ssize_t>(sizeof(got)) && got == expected;
}

bool cma_probe_write(pid_t pid, uint64_t addr, uint64_t value) {
  uint64_t v = value;
  iovec l{&v, sizeof(v)};
  iovec r{reinterpret_cast<void*>(addr), sizeof(v)};
  return process_vm_writev(pid, &l, 1, &r, 1, 0) == static_cast<ssize_t>(sizeof(v));
}

namespace {
void transfer(bool write, pid_t pid, iovec* local, iovec* remote, size_t n, const char* what, const char* peer,
              int j) {
  size_t i = 0;
  while (i < n) {
    const size_t k = std::min(kMaxIov, n - i);
    const ssize_t got = write ? process_vm_writev(pid, local + i, k, remote + i, k, 0)
                              : process_vm_readv(pid, local + i, k, remote + i, k, 0);
    if (got < 0) {
      if (errno == EINTR) continue;
      const int err = errno;
      throw DistributedError(detail::concat("aimass.dist: ", what, write ? ": writing " : ": reading ", peer, " ", j,
                                            "'s memory failed (",
                                            std::strerror(err), "): ",
                                            err == ESRCH ? "that rank has died"
                                            : write ? "the peer process is gone or not writable"
                                                    : "the peer process is gone or not readable"));
    }
    AIMASS_CHECK(got > 0, DistributedError, "aimass.dist: ", what, ": ", peer, " ", j,
                 " returned no data (internal error)");
    size_t g = static_cast<size_t>(got);
    while (g > 0 && i < n) {  // a partial read continues where it stopped
      if (g >= local[i].iov_len) {
        g -= local[i].iov_len;
        ++i;
      } else {
        local[i].iov_base = static_cast<char*>(local[i].iov_base) + g;
        local[i].iov_len -= g;
        remote[i].iov_base = static_cast<char*>(remote[i].iov_base) + g;
        remote[i].iov_len -= g;
        g = 0;
      }
    }
  }
}
}  // namespace

void cma_read(pid_t pid, iovec* local, iovec* remote, size_t n, const char* what, const char* peer, int j) {
  transfer(false, pid, local, remote, n, what, peer, j);
}

void cma_write(pid_t pid, iovec* local, iovec* remote, size_t n, const char* what, const char* peer, int j) {
  transfer(true, pid, local, remote, n, what, peer, j);
}

}  // namespace comm
}  // namespace aimass
