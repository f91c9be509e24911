// Aligned buffers for large read-mostly arrays (packed weights).
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass {

// bytes of zeroed memory aligned to 64. Buffers of 2 MiB or more are aligned to 2 MiB and
// advised as transparent huge pages (Linux, THP "madvise" mode): a batch-1 GEMV streams
// its whole weight once per call, and with 4 KiB pages a 16 MiB weight crosses 4096 pages,
// more than the L2 TLB holds (measured 16 MiB read from L3, 1 thread: 0.23 ms with 4 KiB
// pages, 0.20 ms with huge pages). Throws aimass::Error when the memory is not there.
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t bytes);
  ~AlignedBuffer();
  AlignedBuffer(AlignedBuffer&& o) noexcept : p_(o.p_), n_(o.n_) { o.p_ = nullptr; o.n_ = 0; }
  AlignedBuffer& operator=(AlignedBuffer&& o) noexcept;
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  void* data() const { return p_; }
  size_t size() const { return n_; }

 private:
  void* p_ = nullptr;
  size_t n_ = 0;
};

// b grown to at least `need` bytes in whole 2 MiB pages (huge pages throughout; never shrunk, and what it
// held is not kept when it grows); returns its data.
char* grow_huge(AlignedBuffer& b, size_t need);

// This thread's 64-byte-aligned scratch of `floats` floats in slot 0..3, grown on first use
// and reused (no allocation or page faults per call). A slot is valid until this thread asks
// for the same slot again: kernels use it within one call and never nest.
float* thread_scratch(int slot, size_t floats);

}  // namespace aimass
