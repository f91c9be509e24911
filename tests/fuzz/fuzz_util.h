// Helpers shared by the fuzz targets (tests/fuzz/fuzz_*.cc); no target-specific code.
#pragma once
#include <sys/mman.h>
#include <unistd.h>

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>

// A target's own invariant (what the code under test accepted must be right):
// prints the failed condition and traps, which the fuzzer reports as a crash.
#define FUZZ_CHECK(cond)                                                                \
  do {                                                                                  \
    if (!(cond)) {                                                                      \
      std::fprintf(stderr, "fuzz target: invariant failed: %s (%s:%d)\n", #cond, __FILE__, \
                   __LINE__);                                                           \
      __builtin_trap();                                                                 \
    }                                                                                   \
  } while (0)

namespace aimass_fuzz {

// An in-memory file holding `data`, for code that opens a path (the shard reader
// memory-maps it): /proc/self/fd/N of a memfd, closed by the destructor.
class MemFile {
 public:
  MemFile(const void* data, size_t size) {
    fd_ = ::memfd_create("aimass-fuzz", 0);
    if (fd_ < 0) {
      std::perror("memfd_create");
      std::abort();
    }
    const char* p = static_cast<const char*>(data);
    size_t left = size;
    while (left > 0) {
      ssize_t w = ::write(fd_, p, left);
      if (w <= 0) std::abort();
      p += w;
      left -= static_cast<size_t>(w);
    }
    path_ = "/proc/self/fd/" + std::to_string(fd_);
  }
  ~MemFile() { ::close(fd_); }
  MemFile(const MemFile&) = delete;
  MemFile& operator=(const MemFile&) = delete;
  const std::string& path() const { return path_; }

 private:
  int fd_ = -1;
  std::string path_;
};

// A small deterministic generator for custom mutators (seeded by libFuzzer).
struct Rng {
  uint64_t s;
  explicit Rng(unsigned seed) : s(seed * 0x9E3779B97F4A7C15ull + 1) {}
  uint64_t next() {
    s ^= s << 13;
    s ^= s >> 7;
    s ^= s << 17;
    return s;
  }
  uint64_t below(uint64_t n) { return n ? next() % n : 0; }
};

// Values that break size arithmetic: around 0, 2^31, 2^32, 2^53, 2^63, 2^64.
inline uint64_t boundary_value(Rng& r, uint64_t near) {
  static const uint64_t kEdges[] = {0, 1, 7, 8, 15, 16, 17, 0x7fffffffull, 0x80000000ull, 0xffffffffull,
                                    0x100000000ull, 1ull << 53, (1ull << 62) - 1, 1ull << 62, (1ull << 63) - 1,
                                    1ull << 63, ~0ull - 16, ~0ull - 8, ~0ull - 1, ~0ull};
  switch (r.below(4)) {
    case 0: return kEdges[r.below(sizeof kEdges / sizeof kEdges[0])];
    case 1: return near + r.below(33) - 16;
    case 2: return near ^ (1ull << r.below(64));
    default: return r.next();
  }
}

}  // namespace aimass_fuzz
