// Page-locked host memory for the data loader's batch buffers (pin_memory=True).
// Part of the CUDA module; the loader receives these as a HostAllocator
// (aimass/data.h), so the CPU library itself never links CUDA.
#pragma once
#include <cstddef>
#include <cstdint>

namespace aimass::data::cuda {

// cudaHostAlloc(bytes, cudaHostAllocPortable): pinned for every device/context.
// Returns nullptr (and clears the CUDA error) when it fails.
void* pinned_alloc(size_t bytes);
void pinned_free(void* p);
// Bytes currently allocated by pinned_alloc (for tests and leak checks).
int64_t pinned_bytes_in_use();
// Whether `p` lies in page-locked host memory the CUDA runtime knows about.
bool is_pinned(const void* p);

}  // namespace aimass::data::cuda
