// The blocked loop nest of the packed GEMM (packed_gemm.h), shared by the AVX2 and AVX-512
// translation units: each defines its register tile as
//   template <int R> void tile_at(const TileArgs& a, int64_t m);   // rows [m, m + R)
// and then includes this header, compiled for its own ISA (anonymous namespace: the two
// instantiations never meet at link time).
#pragma once
#include <immintrin.h>

#include <cstdint>

#include "runtime/packed_gemm.h"
#include "runtime/packed_gemm_tile_args.h"

namespace aimass::runtime::packed {
namespace {


// The last rows of an M block (rem < MR): the tile of exactly rem rows.
template <int R>
inline void tail_tiles(int64_t rem, const TileArgs& a, int64_t m) {
  if constexpr (R > 0) {
    if (rem == R)
      tile_at<R>(a, m);
    else
      tail_tiles<R - 1>(rem, a, m);
  }
}

// Row tiles outer (see row_tiles_outer in packed_gemm.h), for N blocks of 2+ panels: N blocks of
// kNb panels > M blocks > K blocks of at most kKcRows > row tiles of MR > panels. The tile's x rows (MR x kc) stay in
// L1 across the N block's panels, whose K blocks (kNb x kc x 32 floats) stream from L2: the
// order of MLAS's SGEMM, 3-5 % faster than panels outer at BERT-base's K = 768.
template <int MR>
void blocked_rows_outer(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                        int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  const int64_t nkb = (K + kKcRows - 1) / kKcRows, kcb = (K + nkb - 1) / nkb;  // equal K blocks
  const bool alias = ldx % 512 == 0;
  constexpr int64_t ldt = kKcRows + 16;
  alignas(64) float xbuf[MR * ldt];
  for (int64_t q0 = p0; q0 < p1; q0 += kNb) {
    const int64_t q1 = q0 + kNb < p1 ? q0 + kNb : p1;
    const int64_t mc = pick_mc(M, (q1 - q0) * kPanel);
    for (int64_t mb = 0; mb < M; mb += mc) {
      const int64_t me = mb + mc < M ? mb + mc : M;
      for (int64_t k0 = 0; k0 < K; k0 += kcb) {
        const int64_t kc = K - k0 < kcb ? K - k0 : kcb;
        auto args = [&](int64_t p) {
          const int64_t n0 = p * kPanel;
          return TileArgs{x, ldx, K, k0, kc, wp + p * K * kPanel, bias_p ? bias_p + p * kPanel : nullptr, n0,
                          N - n0 < kPanel ? N - n0 : kPanel, k0 == 0, k0 + kc >= K, &ep, y, N};
        };
        // Rows K floats apart with K % 512 == 0 share one L1 set: the tile's block is copied
        // first to rows kc + 16 floats apart (the copy is read by every panel of the N block).
        auto copy_x = [&](int64_t m, int64_t rows) {
          for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < kc; ++k) xbuf[r * ldt + k] = x[(m + r) * ldx + k0 + k];
        };
        for (int64_t m = mb; m < me; m += MR) {  // full tiles of MR rows, then the last rows' tile
          const int64_t rows = me - m < MR ? me - m : MR;
          if (alias) copy_x(m, rows);
          for (int64_t p = q0; p < q1; ++p) {
            TileArgs a = args(p);
            if (alias) a.xt = xbuf, a.ldt = ldt;
            if (rows == MR)
              tile_at<MR>(a, m);
            else
              tail_tiles<MR - 1>(rows, a, m);
          }
        }
      }
    }
  }
}

// N blocks of kNb panels > M blocks (pick_mc) > K blocks of kKc > panels > row tiles of MR.
template <int MR>
void blocked_panels(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                    int64_t p1, int64_t N, const Epilogue& ep, float* y) {
  const bool rows_outer = row_tiles_outer(M, ldx, MR);
  for (int64_t q0 = p0; q0 < p1; q0 += kNb) {
    const int64_t q1 = q0 + kNb < p1 ? q0 + kNb : p1;
    // A lone panel reuses no x tile: its K block of kKc stays in L1 across the row tiles instead
    // (rows outer with kc = 392 measured 8 % slower on an MLP's 10-output head).
    if (rows_outer && q1 - q0 > 1) {
      blocked_rows_outer<MR>(x, ldx, M, K, wp, bias_p, q0, q1, N, ep, y);
      continue;
    }
    const int64_t mc = pick_mc(M, (q1 - q0) * kPanel);
    for (int64_t mb = 0; mb < M; mb += mc) {
      const int64_t me = mb + mc < M ? mb + mc : M;
      // One row tile per panel (a GEMV-like batch): nothing reuses a K block, so no K blocking.
      const int64_t kcb = me - mb <= MR ? (K > 0 ? K : 1) : kKc;
      for (int64_t k0 = 0; k0 < K || k0 == 0; k0 += kcb) {
        const int64_t kc = K - k0 < kcb ? K - k0 : kcb;
        for (int64_t p = q0; p < q1; ++p) {
          const int64_t n0 = p * kPanel;
          const TileArgs a{x, ldx, K, k0, kc, wp + p * K * kPanel, bias_p ? bias_p + p * kPanel : nullptr, n0,
                           N - n0 < kPanel ? N - n0 : kPanel, k0 == 0, k0 + kc >= K, &ep, y, N};
          // The next panel's weight block (same K block) is pulled into L2 a slice per row
          // tile, so its first tile does not wait on memory.
          const float* nxt = p + 1 < q1 ? wp + (p + 1) * K * kPanel + k0 * kPanel : nullptr;
          const int64_t nxt_lines = nxt ? kc * 2 : 0;
          const int64_t per_tile = (nxt_lines * MR + (me - mb) - 1) / (me - mb);
          int64_t pf = 0, m = mb;
          for (; m + MR <= me; m += MR) {
            for (const int64_t e = pf + per_tile < nxt_lines ? pf + per_tile : nxt_lines; pf < e; ++pf)
              _mm_prefetch(reinterpret_cast<const char*>(nxt + pf * 16), _MM_HINT_T1);
            tile_at<MR>(a, m);
          }
          tail_tiles<MR - 1>(me - m, a, m);
        }
        if (K == 0) break;
      }
    }
  }
}

}  // namespace
}  // namespace aimass::runtime::packed
