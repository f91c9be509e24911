// CUDA device queries, callable without a GPU or a driver (they report zero
// devices and the reason). Only built when nvcc is present.
#pragma once
#include <string>

namespace aimass::cuda {

// Number of usable devices; 0 when no driver or GPU is present.
int device_count();
// Why device_count() is 0 (the CUDA runtime's message), or "" when devices exist.
std::string last_error();
// Throws aimass::Error with `what` and the CUDA message if the last CUDA call failed.
void check_last(const char* what);

}  // namespace aimass::cuda
