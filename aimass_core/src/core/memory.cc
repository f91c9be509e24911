#include "aimass/memory.h"

#include <cstdlib>
#include <cstring>
#include <vector>

#include "aimass/error.h"
#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace aimass {

namespace {
constexpr size_t kHugePage = size_t{2} << 20;
}

AlignedBuffer::AlignedBuffer(size_t bytes) : n_(bytes) {
  if (bytes == 0) return;
  // Not rounded up to whole huge pages: the tail past the last 2 MiB boundary gets 4 KiB
  // pages, so a 2.1 MiB weight does not cost 4 MiB.
  const bool huge = bytes >= kHugePage;
  void* p = nullptr;
  AIMASS_CHECK(posix_memalign(&p, huge ? kHugePage : 64, bytes) == 0, Error, "cannot allocate ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, bytes, MADV_HUGEPAGE);  // advice only: 4 KiB pages still work
#endif
  std::memset(p, 0, bytes);
  p_ = p;
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

char* grow_huge(AlignedBuffer& b, size_t need) {
  if (b.size() < need) b = AlignedBuffer((need + kHugePage - 1) / kHugePage * kHugePage);
  return static_cast<char*>(b.data());
}

AlignedBuffer& AlignedBuffer::operator=(AlignedBuffer&& o) noexcept {
  if (this != &o) {
    std::free(p_);
    p_ = o.p_;
    n_ = o.n_;
    o.p_ = nullptr;
    o.n_ = 0;
  }
  return *this;
}

float* thread_scratch(int slot, size_t floats) {
  thread_local std::vector<float> buf[4];
  if (buf[slot].size() < floats + 16) buf[slot].resize(floats + 16);
  return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(buf[slot].data()) + 63) & ~uintptr_t{63});
}

}  // namespace aimass
