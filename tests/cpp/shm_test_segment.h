// Shared memory for the thread-as-rank tests of the shared-memory collectives: 4096-byte
// aligned, zero-filled, sized for L local ranks and the given slot.
#pragma once
#include <cstdlib>
#include <cstring>

#include "comm/shm_allreduce.h"

struct ShmTestSegment {
  ShmTestSegment(int L, size_t chunk) : bytes(aimass::comm::ShmAllreduce::segment_bytes(L, chunk)) {
    mem = static_cast<char*>(std::aligned_alloc(4096, (bytes + 4095) / 4096 * 4096));
    std::memset(mem, 0, bytes);
  }
  ~ShmTestSegment() { std::free(mem); }
  ShmTestSegment(const ShmTestSegment&) = delete;
  ShmTestSegment& operator=(const ShmTestSegment&) = delete;
  size_t bytes;
  char* mem;
};
