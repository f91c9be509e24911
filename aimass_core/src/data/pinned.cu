// Pinned batch memory for aimass.data.Loader(pin_memory=True): see aimass/data_cuda.h.
#include <cuda_runtime.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "aimass/data_cuda.h"

namespace aimass::data::cuda {
namespace {
std::atomic<int64_t> g_in_use{0};
std::mutex g_mu;
std::unordered_map<void*, size_t>& sizes() {
  static auto* m = new std::unordered_map<void*, size_t>();  // outlives static destruction order
  return *m;
}
}  // namespace

void* pinned_alloc(size_t bytes) {
  void* p = nullptr;
  if (cudaHostAlloc(&p, bytes, cudaHostAllocPortable) != cudaSuccess) {
    cudaGetLastError();  // not sticky: the next CUDA call starts clean
    return nullptr;
  }
  {
    std::lock_guard<std::mutex> g(g_mu);
    sizes()[p] = bytes;
  }
  g_in_use.fetch_add(static_cast<int64_t>(bytes));
  return p;
}

void pinned_free(void* p) {
  if (!p) return;
  size_t bytes = 0;
  {
    std::lock_guard<std::mutex> g(g_mu);
    auto it = sizes().find(p);
    if (it != sizes().end()) {
      bytes = it->second;
      sizes().erase(it);
    }
  }
  g_in_use.fetch_sub(static_cast<int64_t>(bytes));
  cudaFreeHost(p);
}

int64_t pinned_bytes_in_use() { return g_in_use.load(); }

bool is_pinned(const void* p) {
  cudaPointerAttributes a{};
  if (cudaPointerGetAttributes(&a, p) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return a.type == cudaMemoryTypeHost;
}

}  // namespace aimass::data::cuda
