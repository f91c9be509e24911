// Named POSIX shared-memory segments for the intra-node paths (shm_allreduce, ll_shm): the
// creator makes and maps one, the peers open it by the name it sends them, and the creator
// unlinks the name once every rank has mapped it (the protocol around these is the caller's).
#pragma once
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <cstdint>
#include <cstdio>

namespace aimass {
namespace comm {

// Creates `bytes` of zeroed shared memory under a fresh name "/<prefix>-<pid>-<n>-<clock>" written
// to name[0..name_len); MAP_FAILED (and no name left behind) when /dev/shm cannot hold it.
inline void* create_shm_segment(const char* prefix, size_t bytes, char* name, size_t name_len) {
  static uint64_t counter = 0;  // set-up runs on one thread at a time (collective init)
  std::snprintf(name, name_len, "/%s-%d-%llu-%llx", prefix, static_cast<int>(getpid()),
                static_cast<unsigned long long>(counter++),
                static_cast<unsigned long long>(std::chrono::steady_clock::now().time_since_epoch().count()));
  void* p = MAP_FAILED;
  const int fd = shm_open(name, O_CREAT | O_EXCL | O_RDWR, 0600);
  if (fd >= 0) {
    // fallocate reserves the pages now: a full /dev/shm fails here, not with SIGBUS later
    if (ftruncate(fd, static_cast<off_t>(bytes)) == 0 && posix_fallocate(fd, 0, static_cast<off_t>(bytes)) == 0)
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
    if (p == MAP_FAILED) shm_unlink(name);
  }
  return p;
}

// Maps the segment another rank created, when it exists and has exactly `bytes`; else MAP_FAILED.
inline void* open_shm_segment(const char* name, size_t bytes) {
  void* p = MAP_FAILED;
  const int fd = shm_open(name, O_RDWR, 0600);
  if (fd >= 0) {
    struct stat sb;
    if (fstat(fd, &sb) == 0 && static_cast<size_t>(sb.st_size) == bytes)
      p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
    close(fd);
  }
  return p;
}

}  // namespace comm
}  // namespace aimass
