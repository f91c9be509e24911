// Shared host buffers (aimass/shared_host.h) and the local peers' buffers mapped here (host_regions.h).
#include "comm/host_regions.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <mutex>

#include "aimass/error.h"
#include "aimass/shared_host.h"

namespace aimass {

namespace {
struct Owned {
  size_t bytes;
  int fd;
  uint64_t ino;
};
std::mutex& registry_mu() {
  static std::mutex mu;
  return mu;
}
std::map<uintptr_t, Owned>& registry() {  // base address -> buffer
  static auto* r = new std::map<uintptr_t, Owned>();  // never destroyed: buffers may outlive static teardown
  return *r;
}
size_t page_bytes() {
  static const size_t p = static_cast<size_t>(sysconf(_SC_PAGESIZE));
  return p;
}
}  // namespace

SharedHostBuffer::SharedHostBuffer(size_t bytes) : n_(bytes) {
  AIMASS_CHECK(bytes > 0, ValueError, "SharedHostBuffer: bytes must be positive");
  mapped_ = (bytes + page_bytes() - 1) / page_bytes() * page_bytes();
  fd_ = static_cast<int>(memfd_create("aimass-shared", MFD_CLOEXEC | MFD_ALLOW_SEALING));
  if (fd_ < 0) throw IOError(std::string("SharedHostBuffer: memfd_create failed: ") + std::strerror(errno));
  struct stat sb;
  // fallocate reserves the pages now (a full memory cgroup fails here, not with SIGBUS later); the seals
  // keep the size: nobody can cut a peer's mapping short
  const bool ok = ftruncate(fd_, static_cast<off_t>(mapped_)) == 0 &&
                  posix_fallocate(fd_, 0, static_cast<off_t>(mapped_)) == 0 &&
                  fcntl(fd_, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL) == 0 && fstat(fd_, &sb) == 0;
  void* p = ok ? mmap(nullptr, mapped_, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd_, 0) : MAP_FAILED;
  if (p == MAP_FAILED) {
    const int e = errno;
    close(fd_);
    throw IOError(std::string("SharedHostBuffer: could not make ") + std::to_string(bytes) +
                " bytes of shared memory: " + std::strerror(e));
  }
  p_ = p;
  std::lock_guard<std::mutex> lk(registry_mu());
  registry()[reinterpret_cast<uintptr_t>(p_)] = Owned{mapped_, fd_, static_cast<uint64_t>(sb.st_ino)};
}

SharedHostBuffer::~SharedHostBuffer() {
  {
    std::lock_guard<std::mutex> lk(registry_mu());
    registry().erase(reinterpret_cast<uintptr_t>(p_));
  }
  munmap(p_, mapped_);
  close(fd_);  // the peers' mappings keep the pages until they unmap
}

bool in_shared_host_buffer(const void* p, size_t bytes) {
  comm::RegionRef ref;
  return comm::find_shared_region(p, bytes, &ref);
}

namespace comm {

bool find_shared_region(const void* p, size_t n, RegionRef* ref) {
  *ref = RegionRef{};
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  std::lock_guard<std::mutex> lk(registry_mu());
  auto& r = registry();
  auto it = r.upper_bound(a);
  if (it == r.begin()) return false;
  --it;
  if (a - it->first > it->second.bytes || n > it->second.bytes - (a - it->first)) return false;
  *ref = RegionRef{it->second.ino, static_cast<uint64_t>(it->second.fd), it->first, it->second.bytes};
  return true;
}

char* PeerRegions::translate(pid_t pid, const RegionRef& ref, uint64_t remote, size_t n) {
  if (ref.ino == 0 || remote < ref.base || remote - ref.base > ref.bytes || n > ref.bytes - (remote - ref.base))
    return nullptr;
  const auto key = std::make_pair(pid, ref.ino);
  auto it = maps_.find(key);
  if (it == maps_.end()) {
    Mapping m;
    char path[64];
    std::snprintf(path, sizeof(path), "/proc/%d/fd/%llu", static_cast<int>(pid),
                  static_cast<unsigned long long>(ref.fd));
    const int fd = open(path, O_RDWR | O_CLOEXEC);
    if (fd >= 0) {
      struct stat sb;
      // the same file (the fd number may have been reused), as large as posted, and its size sealed: a
      // mapping of it can never fault past the end
      const int seals = fcntl(fd, F_GET_SEALS);
      if (fstat(fd, &sb) == 0 && static_cast<uint64_t>(sb.st_ino) == ref.ino &&
          static_cast<uint64_t>(sb.st_size) == ref.bytes && seals >= 0 && (seals & F_SEAL_SHRINK)) {
        void* p = mmap(nullptr, ref.bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
        if (p != MAP_FAILED) {
          m.p = static_cast<char*>(p);
          m.bytes = ref.bytes;
        }
      }
      close(fd);
    }
    // make room: the least recently used mappings go (a peer's freed buffer lives on while mapped here)
    while (!lru_.empty() && (maps_.size() >= kMaxMappings || bytes_ + m.bytes > kMaxBytes)) drop_oldest();
    lru_.push_front(key);
    m.lru = lru_.begin();
    bytes_ += m.bytes;
    it = maps_.emplace(key, m).first;
  } else if (it->second.lru != lru_.begin()) {
    lru_.splice(lru_.begin(), lru_, it->second.lru);
  }
  it->second.used = run_;
  if (!it->second.p || it->second.bytes != ref.bytes) return nullptr;
  return it->second.p + (remote - ref.base);
}

void PeerRegions::drop_oldest() {
  auto old = maps_.find(lru_.back());
  if (old->second.p) munmap(old->second.p, old->second.bytes);
  bytes_ -= old->second.bytes;
  maps_.erase(old);
  lru_.pop_back();
}

void PeerRegions::next_run() {
  ++run_;
  while (!lru_.empty() && maps_.find(lru_.back())->second.used + kIdleRuns < run_) drop_oldest();
}

void PeerRegions::clear() {
  for (auto& kv : maps_)
    if (kv.second.p) munmap(kv.second.p, kv.second.bytes);
  maps_.clear();
  lru_.clear();
  bytes_ = 0;
}

}  // namespace comm
}  // namespace aimass
