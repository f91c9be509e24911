// The registry of this process's shared host buffers (aimass/shared_host.h) and the cache of the
// local peers' buffers mapped here (internal to the comm area; used by shm_cma.cc).
#pragma once
#include <sys/types.h>

#include <cstddef>
#include <cstdint>
#include <list>
#include <map>
#include <utility>

namespace aimass {
namespace comm {

// What a peer needs to map one of this process's shared buffers: the memfd's inode (0: the memory is
// not in a shared buffer), the descriptor to open through /proc/<pid>/fd, and where the buffer starts
// and how many bytes it maps here (the owner's address of a byte minus base is its offset in the file).
struct RegionRef {
  uint64_t ino = 0;
  uint64_t fd = 0;
  uint64_t base = 0;
  uint64_t bytes = 0;
};
constexpr size_t kRegionRefWords = 4;

// The shared buffer of this process that holds [p, p + n), if any (else ref->ino = 0).
bool find_shared_region(const void* p, size_t n, RegionRef* ref);

// The local peers' shared buffers, mapped into this process on first use and kept (the mapping stays
// valid whatever the owner does: the size is sealed, and the pages live while a mapping does). A mapping
// keeps a buffer its owner freed alive, so mappings unused for kIdleRuns runs (next_run()) are dropped, and
// at most kMaxMappings mappings / kMaxBytes bytes are kept, the least recently used going first. Not
// thread-safe: one per ShmAllreduce, used by the thread that runs its collectives.
class PeerRegions {
 public:
  PeerRegions() = default;
  ~PeerRegions() { clear(); }
  PeerRegions(const PeerRegions&) = delete;
  PeerRegions& operator=(const PeerRegions&) = delete;

  // This process's address of the peer's [remote, remote + n) inside the peer's buffer `ref` (process
  // `pid`); nullptr when the range is not inside it or the buffer cannot be mapped here (the caller then
  // copies through the kernel). A failed open is remembered: it is not tried again.
  char* translate(pid_t pid, const RegionRef& ref, uint64_t remote, size_t n);
  // Counts a run that may translate; unmaps what the last kIdleRuns runs did not use.
  void next_run();
  void clear();
  size_t mappings() const { return maps_.size(); }

  static constexpr size_t kMaxMappings = 256;
  static constexpr size_t kMaxBytes = size_t(16) << 30;
  static constexpr uint64_t kIdleRuns = 256;

 private:
  struct Mapping {
    char* p = nullptr;  // nullptr: could not be mapped
    size_t bytes = 0;
    std::list<std::pair<pid_t, uint64_t>>::iterator lru;
    uint64_t used = 0;  // run_ when last translated
  };
  void drop_oldest();
  std::map<std::pair<pid_t, uint64_t>, Mapping> maps_;  // (pid, inode)
  std::list<std::pair<pid_t, uint64_t>> lru_;           // front: most recently used
  size_t bytes_ = 0;
  uint64_t run_ = 0;
};

}  // namespace comm
}  // namespace aimass
