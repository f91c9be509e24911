// Convolution driver (ops_conv.h): weight packing, the implicit-im2col panel packing,
// the work split over the engine's pool and the scalar reference tile.
#include "runtime/ops_conv.h"

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"

namespace aimass::runtime::conv {

void tile_ld_scalar(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t mvalid,
                    int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu, bool, bool) {
  for (int64_t m = 0; m < mvalid; ++m) {
    float acc[kNR];
    float* cr = c + m * ldc;
    for (int64_t j = 0; j < kNR; ++j) acc[j] = accumulate && j < ncols ? cr[j] : 0.f;
    for (int64_t k = 0; k < kc; ++k) {
      const float av = a[k * kMR + m];
      const float* bk = b + k * ldb;
      for (int64_t j = 0; j < ncols; ++j) acc[j] += av * bk[j];
    }
    store_row_scalar(acc, ncols, bias ? bias + m : nullptr, res ? res + m * ldc : nullptr, relu, cr);
  }
}

void tile_scalar(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
                 bool accumulate, const float* bias, const float* res, bool relu) {
  tile_ld_scalar(kc, a, b, kNR, c, ldc, mvalid, ncols, accumulate, bias, res, relu, false, false);
}

void grid_runs(int64_t per_sample, int64_t row_len, int64_t CHW, int64_t total, int64_t j0, bool whole_plane,
               PanelRuns& runs) {
  runs.nc = static_cast<int>(std::min(kNR, total - j0));
  runs.n = 0;
  for (int64_t j = 0, q = j0; j < runs.nc;) {
    const int64_t n = q / per_sample, p = q % per_sample;
    PanelRuns::Run r{n * CHW, p / row_len, p % row_len, 0, j};
    r.len = whole_plane ? std::min(runs.nc - j, per_sample - p) : std::min(runs.nc - j, row_len - r.ow);
    runs.r[runs.n++] = r;
    j += r.len;
    q += r.len;
  }
}

void panel_runs(const ops::Conv2dShape& s, int64_t NPix, int64_t j0, PanelRuns& runs) {
  runs.pointwise = ops::is_pointwise(s);
  grid_runs(s.OH * s.OW, s.OW, s.C * s.H * s.W, NPix, j0, runs.pointwise, runs);
}

void pack_scalar(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t k0, int64_t kc,
                 float* dst) {
  const int64_t HW = s.H * s.W;
  // tap (c, kh, kw) of k0, advanced incrementally
  int64_t c = k0 / (s.KH * s.KW), kh = (k0 / s.KW) % s.KH, kw = k0 % s.KW;
  for (int64_t t = 0; t < kc; ++t) {
    float* d = dst + t * kNR;
    for (int ri = 0; ri < runs.n; ++ri) {
      const PanelRuns::Run& r = runs.r[ri];
      const float* plane = x + r.base + c * HW;
      float* dj = d + r.j;
      const int64_t L = r.len;
      if (runs.pointwise) {
        const float* src = plane + r.oh * s.OW + r.ow;
        for (int64_t i = 0; i < L; ++i) dj[i] = src[i];
        continue;
      }
      const int64_t ih = r.oh * s.SH - s.PH + kh * s.DH;
      if (ih < 0 || ih >= s.H) {
        for (int64_t i = 0; i < L; ++i) dj[i] = 0.f;
        continue;
      }
      // iw = (ow + i) * SW + off, in bounds for i in [i0, i1)
      const int64_t first = r.ow * s.SW - s.PW + kw * s.DW;
      int64_t i0 = first >= 0 ? 0 : (-first + s.SW - 1) / s.SW;
      int64_t i1 = first >= s.W ? 0 : (s.W - 1 - first) / s.SW + 1;
      i0 = std::min(i0, L);
      i1 = std::max(i0, std::min(i1, L));
      const float* srow = plane + ih * s.W + first;
      for (int64_t i = 0; i < i0; ++i) dj[i] = 0.f;
      for (int64_t i = i0; i < i1; ++i) dj[i] = srow[i * s.SW];
      for (int64_t i = i1; i < L; ++i) dj[i] = 0.f;
    }
    for (int64_t j = runs.nc; j < kNR; ++j) d[j] = 0.f;
    if (++kw == s.KW) {
      kw = 0;
      if (++kh == s.KH) {
        kh = 0;
        ++c;
      }
    }
  }
}

PackedConv::PackedConv(const float* weight, const float* bias, const ops::Conv2dShape& shape, Wino wino) : s(shape) {
  Kc = s.C / s.G * s.KH * s.KW;
  MB = (s.O + kMR - 1) / kMR;
  // pointwise panels are mostly read in place; a strided 1x1 runs as one on its subsampled input
  KS = slice_taps(Kc, ops::is_pointwise(s) || decimate_ok(s) ? kKC : kKCPacked);
  phase = phase_pays(s) && phase_enabled();
  // kBoth packs U only for shapes Winograd can run (a 1x1 under kBoth gets its direct and CL weights)
  const bool use_u = wino_eligible(s) && (wino == kBoth || (wino == kAuto && wino_enabled()));
  if (use_u) pack_winograd(weight);
  if (bias) {
    bbuf = AlignedBuffer(static_cast<size_t>(MB * kMR) * sizeof(float));
    b = static_cast<float*>(bbuf.data());
    std::memcpy(b, bias, static_cast<size_t>(s.O) * sizeof(float));
  }
  {
    const ops::Conv2dShape sv = decimate_ok(s) ? pointwise_view(s) : s;
    if (wino == kBoth ? ops::is_pointwise(sv) && s.G == 1 : cl_pays(sv, 1)) pack_cl(weight);
  }
  if (use_u && wino == kAuto && wino_pays(s, 1)) return;  // every batch size runs Winograd
  wbuf = AlignedBuffer(static_cast<size_t>(std::max<int64_t>(MB * Kc * kMR, 16)) * sizeof(float));  // zeroed
  w = static_cast<float*>(wbuf.data());
  // weight [O, C, KH, KW]: row o holds its Kc taps in (c, kh, kw) order, as the panels do.
  // Slice-major: every row block of one K-slice is contiguous, so a slice's pass over the
  // row blocks streams one sequential run of memory (a large layer-4 weight read in 8 KiB
  // pieces 147 KiB apart ran at a third of the speed).
  for (int64_t k0 = 0; k0 < Kc; k0 += KS) {
    const int64_t kc = std::min(KS, Kc - k0);
    for (int64_t o = 0; o < s.O; ++o) {
      float* dst = w + k0 * MB * kMR + (o / kMR) * kc * kMR + o % kMR;
      const float* src = weight + o * Kc + k0;
      for (int64_t k = 0; k < kc; ++k) dst[k * kMR] = src[k];
    }
  }
}

namespace {

using PackFn = void (*)(const float*, const ops::Conv2dShape&, const PanelRuns&, int64_t, int64_t, float*);
using TileLdFn = void (*)(int64_t, const float*, const float*, int64_t, float*, int64_t, int64_t, int64_t, bool,
                          const float*, const float*, bool, bool, bool);

}  // namespace

static void direct_shape(const PackedConv& pc, const ops::Conv2dShape& s, const float* x, int64_t N, const float* res,
                         bool relu, float* y);

bool residual_in_place_ok(const PackedConv& pc) { return !pc.phase || pc.KS >= pc.Kc; }

void run(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y) {
  if (pc.u && (!pc.w || wino_pays(pc.s, N)))
    run_winograd(pc, x, N, res, relu, y);
  else
    run_direct(pc, x, N, res, relu, y);
}

void run_direct(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y) {
  AIMASS_CHECK(pc.w, ValueError, "conv::run_direct: the conv's direct weights were not packed");
  if (decimate_ok(pc.s) && decimate_enabled()) {  // a strided 1x1: run as a pointwise conv on the subsampled input
    const ops::Conv2dShape sv = pointwise_view(pc.s);
    float* xd = thread_scratch(2, static_cast<size_t>(N * sv.C * sv.H * sv.W));
    decimate(x, pc.s, N, xd);
    direct_shape(pc, sv, xd, N, res, relu, y);
    return;
  }
  direct_shape(pc, pc.s, x, N, res, relu, y);
}

// run_direct on shape s: pc.s, or the pointwise view of a strided 1x1 (same taps, same packing)
static void direct_shape(const PackedConv& pc, const ops::Conv2dShape& s, const float* x, int64_t N, const float* res,
                         bool relu, float* y) {
  const SimdLevel lvl = simd_level();
  if (pc.phase && (lvl >= SimdLevel::AVX512 || lvl < SimdLevel::AVX2)) {  // AVX2 packs (no offset tile)
    run_phase(pc, x, N, res, relu, y);
    return;
  }
  if (pc.wcl && lvl >= SimdLevel::AVX512 && cl_pays(s, N)) {
    cl_shape(pc, s, x, N, res, relu, y);
    return;
  }
  const TileFn tile = tile_for(lvl);
  const PackFn pack = lvl >= SimdLevel::AVX512 ? pack_avx512 : pack_scalar;
  // in-place pointwise panels: AVX-512 and the scalar reference (AVX2 packs)
  const TileLdFn tile_ld = lvl >= SimdLevel::AVX512 ? tile_ld_avx512 : lvl < SimdLevel::AVX2 ? tile_ld_scalar : nullptr;
  const int64_t HW = s.H * s.W, CHW = s.C * HW;
  const int64_t P = s.OH * s.OW, NPix = N * P, OP = s.O * P;
  const int64_t NPt = (NPix + kNR - 1) / kNR, Kc = pc.Kc, MB = pc.MB;
  // K-slices of (almost) equal size <= kc_max
  const int64_t KS = pc.KS;
  // A plane of H*W floats not a multiple of 16 (64 bytes) puts most in-place rows across two cache
  // lines; from 4 panels per plane up (14x14 at batch 1: 196 = 6 x 32 + 4) the 1x1 packs its panels
  // (aligned copies) instead, and since those copies are cheap, splits the weight rows as an
  // in-place conv would. ResNet-50's 1024 -> 256 at 14x14, batch 1, min of 150 calls on a loaded
  // machine, onnxruntime / aimass: 1 thread 0.85-0.88 -> 0.89-0.92, 2 threads 0.73-0.77 -> 0.75-0.80;
  // 256 -> 1024 0.90-0.93 -> 1.00. A 7x7 plane (two panels) ran slower at 2 threads and stays in place.
  const bool pw_misaligned = ops::is_pointwise(s) && HW % 16 != 0 && HW >= 4 * kNR;
  const bool pw_inplace = tile_ld && ops::is_pointwise(s) && !pw_misaligned;
  const int64_t ncp = group_panels(NPt, KS, long_group_ok(s, Kc, KS), num_threads());
  // a long group's output rows are sequential runs the hardware prefetcher follows: the in-place
  // tile's own output prefetch only adds requests (a batch-8 56x56 256 -> 64 1x1: 12.5 -> 11.7 ms, loaded machine),
  // unless it reads a residual: then its lines are requested too (batch 8, 1 thread, per-step min, loaded:
  // 56x56 64 -> 256 + residual 9.7-9.9 -> 8.1 ms, 28x28 128 -> 512 + residual 8.4-8.8 -> 7.6; onnxruntime 8.0-8.1)
  const bool long_group = ncp > kGroupPanels;
  const int64_t groups = (NPt + ncp - 1) / ncp;
  // every item packs its group's panels, except in-place pointwise ones
  int64_t msplit = row_splits(groups, MB, 1, !pw_inplace && !pw_misaligned);
  // Few groups of unequal work (a partial last panel) split their rows once more, though each item
  // packs its group: a 3x3/2 to 14x14 at batch 1 is 4 groups costing 2, 2, 2 and 0.5 panels, which two
  // threads ran as 4 and 2.5 (2 threads, loaded machine, same-run medians: 1.64/1.59 -> 1.50/1.42 ms).
  if (num_threads() > 1 && s.KH * s.KW > 1 && groups > 1 && groups * msplit < 4 * num_threads() &&
      NPix % kNR != 0)
    msplit = std::min(MB, 2 * msplit);
  const int64_t items = groups * msplit;

  auto work = [&](int64_t i0, int64_t i1) {
    float* bp = thread_scratch(0, static_cast<size_t>(ncp * KS * kNR));
    alignas(64) float rtmp[kMR * kNR];
    PanelRuns runs[kMaxGroupPanels];
    int64_t colofs[kMaxGroupPanels][kNR];  // output offset (sample, pixel) of each column of a crossing panel
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t g = it / msplit, mi = it % msplit;
      const int64_t pan0 = g * ncp, npan = std::min(ncp, NPt - pan0);
      const int64_t mb0 = MB * mi / msplit, mb1 = MB * (mi + 1) / msplit;
      bool crossing[kMaxGroupPanels], inplace[kMaxGroupPanels];
      const float* src[kMaxGroupPanels];  // an in-place panel's first tap: x + n * CHW + p0
      for (int64_t q = 0; q < npan; ++q) {
        const int64_t j0 = (pan0 + q) * kNR, nc = std::min(kNR, NPix - j0);
        panel_runs(s, NPix, j0, runs[q]);
        crossing[q] = j0 % P + nc > P;
        inplace[q] = pw_inplace && runs[q].pointwise && !crossing[q] && nc == kNR;
        src[q] = x + (j0 / P) * CHW + j0 % P;
        for (int64_t j = 0, n = j0 / P, p = j0 % P; crossing[q] && j < nc; ++j) {
          colofs[q][j] = n * OP + p;
          if (++p == P) {
            p = 0;
            ++n;
          }
        }
      }
      // accumulators of the crossing panels, [panel][row block][kMR x kNR], kept over the K-slices
      float* cbuf = thread_scratch(1, static_cast<size_t>(npan * (mb1 - mb0) * kMR * kNR));
      for (int64_t k0 = 0; k0 < Kc; k0 += KS) {
        const int64_t kc = std::min(KS, Kc - k0);
        // the residual joins at the first K-slice (each output read before it is first written, so
        // res may be y itself: residual_in_place_ok), bias and ReLU at the last
        const bool acc = k0 > 0, last = k0 + kc == Kc, first = k0 == 0;
        for (int64_t q = 0; q < npan; ++q)
          if (!inplace[q]) pack(x, s, runs[q], k0, kc, bp + q * kc * kNR);
        for (int64_t mb = mb0; mb < mb1; ++mb) {
          const float* a = pc.w + (k0 * MB + mb * kc) * kMR;
          const int64_t mvalid = std::min(kMR, s.O - mb * kMR);
          const float* bias = last && pc.b ? pc.b + mb * kMR : nullptr;
          for (int64_t q = 0; q < npan; ++q) {
            const int64_t j0 = (pan0 + q) * kNR, nc = std::min(kNR, NPix - j0);
            const float* b = bp + q * kc * kNR;
            if (inplace[q]) {
              const int64_t off = (j0 / P) * OP + mb * kMR * P + j0 % P;
              tile_ld(kc, a, src[q] + k0 * HW, HW, y + off, P, mvalid, nc, acc, bias,
                      first && res ? res + off : nullptr, last && relu, mb == mb0, !long_group || res);
              continue;
            }
            if (!crossing[q]) {
              const int64_t off = (j0 / P) * OP + mb * kMR * P + j0 % P;
              tile(kc, a, b, y + off, P, mvalid, nc, acc, bias, first && res ? res + off : nullptr, last && relu);
              continue;
            }
            // the panel crosses into the next sample(s): accumulate in a contiguous tile,
            // scatter to the samples' rows after the last K-slice
            float* cb = cbuf + (q * (mb1 - mb0) + (mb - mb0)) * kMR * kNR;
            const int64_t row0 = mb * kMR * P;
            if (first && res)
              for (int64_t m = 0; m < mvalid; ++m)
                for (int64_t j = 0; j < nc; ++j) rtmp[m * kNR + j] = res[colofs[q][j] + row0 + m * P];
            tile(kc, a, b, cb, kNR, mvalid, nc, acc, bias, first && res ? rtmp : nullptr, last && relu);
            if (last)
              for (int64_t m = 0; m < mvalid; ++m)
                for (int64_t j = 0; j < nc; ++j) y[colofs[q][j] + row0 + m * P] = cb[m * kNR + j];
          }
        }
      }
    }
  };
  run_items(items, work);
}

}  // namespace aimass::runtime::conv
