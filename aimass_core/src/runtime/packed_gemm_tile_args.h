// The arguments of one register tile of the packed GEMM, defined before the AVX2 / AVX-512
// tile bodies that read them (clang rejects member access into a type only declared there),
// then used by packed_gemm_blocked.h's loop nest.
#pragma once
#include <cstdint>

#include "runtime/packed_gemm.h"

namespace aimass::runtime::packed {
namespace {

// One panel's K block, for every row tile of an M block.
struct TileArgs {
  const float* x;
  int64_t ldx;  // x's row stride (K, or more where linear() padded x: see panels_ex_ld)
  int64_t K, k0, kc;
  const float* w;  // the panel (all of K)
  const float* b;  // the panel's bias or null
  int64_t n0, ncols;
  bool first, last;
  const Epilogue* ep;
  float* y;
  int64_t N;
  // When set: this row tile's x block (rows from the tile's m, k from k0) copied with row stride ldt.
  const float* xt = nullptr;
  int64_t ldt = 0;
};

}  // namespace
}  // namespace aimass::runtime::packed
