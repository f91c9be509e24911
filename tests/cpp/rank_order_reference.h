// The reference an allreduce's result is checked against bit for bit: reduce_into over the L ranks'
// inputs in rank order (what the claimed-piece paths compute whoever claims a piece).
#pragma once
#include <cstddef>
#include <cstdint>
#include <vector>

#include "aimass/dtype.h"
#include "comm/shm_allreduce.h"

// input(r, i): rank r's element i, for i < n.
template <typename T, class Input>
std::vector<T> rank_order_reference(int L, aimass::DType dtype, aimass::ReduceOp op, bool average, int64_t n,
                                    Input input) {
  std::vector<std::vector<T>> ins(static_cast<size_t>(L), std::vector<T>(static_cast<size_t>(n)));
  std::vector<const char*> srcs(static_cast<size_t>(L));
  for (int r = 0; r < L; ++r) {
    for (int64_t i = 0; i < n; ++i) ins[r][i] = input(r, i);
    srcs[r] = reinterpret_cast<const char*>(ins[r].data());
  }
  std::vector<T> want(static_cast<size_t>(n));
  aimass::comm::reduce_into(dtype, op, srcs.data(), L, reinterpret_cast<char*>(want.data()), static_cast<size_t>(n),
                            average, L);
  return want;
}
