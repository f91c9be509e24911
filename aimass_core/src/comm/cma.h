// Cross-memory attach (Linux process_vm_readv, what Open MPI's smsc/cma uses): one rank reads
// another's memory directly. Shared by the single-copy shared-memory collectives (shm_cma.cc)
// and the low-latency channel's single-copy broadcast/allgather (ll_shm.cc).
#pragma once
#include <sys/types.h>
#include <sys/uio.h>

#include <cstddef>
#include <cstdint>

namespace aimass {
namespace comm {

// The start-up check: true when process `pid`'s 8-byte word at `addr` reads `expected` (same
// user and no ptrace restriction, so this rank may read that peer's memory).
bool cma_probe(pid_t pid, uint64_t addr, uint64_t expected);

// Copies the paired iovecs (local[i] and remote[i] the same length) from process `pid`,
// continuing after partial reads and EINTR. On failure throws DistributedError
// "aimass.dist: <what>: reading <peer> <j>'s memory failed (...)", saying when the peer died.
void cma_read(pid_t pid, iovec* local, iovec* remote, size_t n, const char* what, const char* peer, int j);
// The same into process `pid`'s memory (process_vm_writev: remote[i] receives local[i]).
void cma_write(pid_t pid, iovec* local, iovec* remote, size_t n, const char* what, const char* peer, int j);
// Whether this rank may write process `pid`'s memory: writes `value` to the 8-byte word at `addr`
// (a word that already holds `value`, so a successful probe changes nothing).
bool cma_probe_write(pid_t pid, uint64_t addr, uint64_t value);

}  // namespace comm
}  // namespace aimass
