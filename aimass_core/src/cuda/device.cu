#include <cuda_runtime.h>

#include <mutex>
#include <string>

#include "aimass/cuda_device.h"
#include "aimass/error.h"

namespace aimass::cuda {
namespace {
std::once_flag g_once;
int g_count = 0;
std::string g_error;
void probe() {
  int n = 0;
  cudaError_t rc = cudaGetDeviceCount(&n);
  if (rc != cudaSuccess) {
    g_error = cudaGetErrorString(rc);
    g_count = 0;
    cudaGetLastError();  // clear the sticky error so later calls start clean
  } else {
    g_count = n;
    if (n == 0) g_error = "no CUDA device found";
  }
}
}  // namespace

int device_count() {
  std::call_once(g_once, probe);
  return g_count;
}

std::string last_error() {
  std::call_once(g_once, probe);
  return g_error;
}

void check_last(const char* what) {
  cudaError_t rc = cudaGetLastError();
  if (rc != cudaSuccess) throw Error(std::string(what) + ": " + cudaGetErrorString(rc));
}

}  // namespace aimass::cuda
