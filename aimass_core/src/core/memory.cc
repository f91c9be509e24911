#include "aimass/memory.h"

#include <cstdlib>
#include <cstring>

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
  const bool huge = bytes >= kHugePage;
  const size_t align = huge ? kHugePage : 64;
  const size_t rounded = (bytes + align - 1) / align * align;
  void* p = nullptr;
  AIMASS_CHECK(posix_memalign(&p, align, rounded) == 0, Error, "cannot allocate ", bytes, " bytes");
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (huge) madvise(p, rounded, MADV_HUGEPAGE);  // advice only: 4 KiB pages still work
#endif
  std::memset(p, 0, rounded);
  p_ = p;
}

AlignedBuffer::~AlignedBuffer() { std::free(p_); }

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

}  // namespace aimass
