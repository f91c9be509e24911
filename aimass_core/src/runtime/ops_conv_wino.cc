// Winograd F(2x2, 3x3) for stride-1 3x3 convs (ops_conv.h): the weight transform, the scalar
// reference transforms, and the driver that runs the 16 GEMMs on the direct conv's tiles.
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "runtime/ops_conv.h"
#include "env_switch.h"

namespace aimass::runtime::conv {

bool wino_enabled() {
  static const bool on = env_switch_on("AIMASS_WINOGRAD");
  return on;
}

namespace {
bool wino_fine_split() {  // AIMASS_WINO_SPLIT=0 (read once): one row split per thread (A/B runs)
  static const bool on = env_switch_on("AIMASS_WINO_SPLIT");
  return on;
}
}  // namespace

bool wino_eligible(const ops::Conv2dShape& s) {
  // tiny convs: the transforms would cost more than the products they save
  return s.G == 1 && s.KH == 3 && s.KW == 3 && s.SH == 1 && s.SW == 1 && s.DH == 1 && s.DW == 1 && s.C >= 16 &&
         s.O >= 16;
}

namespace {
// Cost of `cols` columns in half panels: a panel's tail of <= 16 columns runs the half-width tile.
inline int64_t half_panels(int64_t cols) {
  const int64_t rem = cols % kNR;
  return 2 * (cols / kNR) + (rem == 0 ? 0 : rem <= kNR / 2 ? 1 : 2);
}
}  // namespace

bool wino_pays(const ops::Conv2dShape& s, int64_t N) {
  const int64_t NT = N * ((s.OH + 1) / 2) * ((s.OW + 1) / 2), NPix = N * s.OH * s.OW;
  // products per panel: 16 (one per transform position) vs 9 taps; the transforms cost about a
  // fifth more. A 7x7 plane at batch 1 is 16 tiles, one half-width panel, against 49 pixels in a
  // full and a 17-column panel direct.
  const int64_t wino = 16 * half_panels(NT) * 6, direct = 9 * half_panels(NPix) * 5;
  return wino < direct;
}

void PackedConv::pack_winograd(const float* weight) {
  const int64_t C = s.C, ns = (C + kWinoKC - 1) / kWinoKC;
  UKS = (C + ns - 1) / ns;
  ubuf = AlignedBuffer(static_cast<size_t>(16 * MB * kMR * C) * sizeof(float));  // zeroed: padded rows
  u = static_cast<float*>(ubuf.data());
  static const double G[4][3] = {{1, 0, 0}, {0.5, 0.5, 0.5}, {0.5, -0.5, 0.5}, {0, 0, 1}};
  for (int64_t o = 0; o < s.O; ++o)
    for (int64_t c = 0; c < C; ++c) {
      const float* g = weight + (o * C + c) * 9;
      double t[4][3];  // G g
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 3; ++k) t[i][k] = G[i][0] * g[k] + G[i][1] * g[3 + k] + G[i][2] * g[6 + k];
      const int64_t c0 = c / UKS * UKS, kc = std::min(UKS, C - c0);
      float* dst = u + c0 * MB * kMR + (o / kMR) * kc * kMR + (c - c0) * kMR + o % kMR;
      for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
          dst[(4 * i + j) * MB * kMR * C] =
              static_cast<float>(t[i][0] * G[j][0] + t[i][1] * G[j][1] + t[i][2] * G[j][2]);
    }
}

void wino_runs(const ops::Conv2dShape& s, int64_t NT, int64_t j0, PanelRuns& runs) {
  const int64_t TW = (s.OW + 1) / 2;
  runs.pointwise = false;
  grid_runs(((s.OH + 1) / 2) * TW, TW, s.C * s.H * s.W, NT, j0, false, runs);
}

void wino_in_scalar(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t c0, int64_t kc,
                    float* V) {
  const int64_t HW = s.H * s.W;
  for (int64_t t = 0; t < kc; ++t) {
    for (int xi = 0; xi < 16; ++xi)
      for (int64_t j = runs.nc; j < kNR; ++j) V[xi * wino_vstride(kc) + t * kNR + j] = 0.f;
    for (int ri = 0; ri < runs.n; ++ri) {
      const PanelRuns::Run& r = runs.r[ri];
      const float* plane = x + r.base + (c0 + t) * HW;
      for (int64_t i = 0; i < r.len; ++i) {
        const int64_t ih0 = 2 * r.oh - s.PH, iw0 = 2 * (r.ow + i) - s.PW;
        float d[4][4];
        for (int a = 0; a < 4; ++a)
          for (int b = 0; b < 4; ++b) {
            const int64_t ih = ih0 + a, iw = iw0 + b;
            d[a][b] = ih >= 0 && ih < s.H && iw >= 0 && iw < s.W ? plane[ih * s.W + iw] : 0.f;
          }
        float e[4][4];  // B^T d
        for (int b = 0; b < 4; ++b) {
          e[0][b] = d[0][b] - d[2][b];
          e[1][b] = d[1][b] + d[2][b];
          e[2][b] = d[2][b] - d[1][b];
          e[3][b] = d[1][b] - d[3][b];
        }
        float* vj = V + t * kNR + r.j + i;
        const int64_t xs = wino_vstride(kc);  // between transform positions
        for (int a = 0; a < 4; ++a) {  // (B^T d) B
          vj[(4 * a + 0) * xs] = e[a][0] - e[a][2];
          vj[(4 * a + 1) * xs] = e[a][1] + e[a][2];
          vj[(4 * a + 2) * xs] = e[a][2] - e[a][1];
          vj[(4 * a + 3) * xs] = e[a][1] - e[a][3];
        }
      }
    }
  }
}

void wino_out_scalar(const float* M, int64_t mxs, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t o0,
                     int64_t mo, const float* bias, const float* res, bool relu, float* y) {
  const int64_t P = s.OH * s.OW, CHW = s.C * s.H * s.W;
  for (int64_t m = 0; m < mo; ++m) {
    const int64_t o = o0 + m;
    for (int ri = 0; ri < runs.n; ++ri) {
      const PanelRuns::Run& r = runs.r[ri];
      const int64_t plane = (r.base / CHW) * s.O * P + o * P;
      for (int64_t i = 0; i < r.len; ++i) {
        float v[16];
        for (int xi = 0; xi < 16; ++xi) v[xi] = M[xi * mxs + m * kNR + r.j + i];
        float q[2][4];  // A^T m
        for (int b = 0; b < 4; ++b) {
          q[0][b] = v[b] + v[4 + b] + v[8 + b];
          q[1][b] = v[4 + b] - v[8 + b] - v[12 + b];
        }
        for (int a = 0; a < 2; ++a) {
          const int64_t oh = 2 * r.oh + a;
          if (oh >= s.OH) break;
          const float yy[2] = {q[a][0] + q[a][1] + q[a][2], q[a][1] - q[a][2] - q[a][3]};
          for (int b = 0; b < 2; ++b) {
            const int64_t ow = 2 * (r.ow + i) + b;
            if (ow >= s.OW) break;
            const int64_t off = plane + oh * s.OW + ow;
            float val = yy[b];
            if (bias) val += bias[o];
            if (res) val += res[off];
            if (relu) val = val < 0.f ? 0.f : val;
            y[off] = val;
          }
        }
      }
    }
  }
}

namespace {

using InFn = void (*)(const float*, const ops::Conv2dShape&, const PanelRuns&, int64_t, int64_t, float*);
using OutFn = void (*)(const float*, int64_t, const ops::Conv2dShape&, const PanelRuns&, int64_t, int64_t,
                       const float*, const float*, bool, float*);

}  // namespace

void run_winograd(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y) {
  AIMASS_CHECK(pc.u, ValueError, "conv::run_winograd: the conv's Winograd weights were not packed");
  const ops::Conv2dShape& s = pc.s;
  const SimdLevel lvl = simd_level();
  const TileFn tile = tile_for(lvl);
  const InFn win = lvl >= SimdLevel::AVX512 ? wino_in_avx512 : wino_in_scalar;
  const OutFn wout = lvl >= SimdLevel::AVX512 ? wino_out_avx512 : wino_out_scalar;
  const int64_t C = s.C, MB = pc.MB, UKS = pc.UKS;
  const int64_t NT = N * ((s.OH + 1) / 2) * ((s.OW + 1) / 2), NPt = (NT + kNR - 1) / kNR;
  // items: (tile panel) x (range of weight row blocks); the rows are split so M stays within
  // kWinoRows rows, and further when there are too few panels to keep every thread busy (every
  // item transforms its panel's input itself: one split per thread). A full panel and a partial
  // tail are unequal work: a 14x14 plane at batch 1 is a 32-tile and a 17-tile panel (~1 and ~0.5
  // tiles per product), which two items gave two threads as 1 and 0.5; such panels get two items
  // per thread (each thread ~0.75, plus one more input transform).
  const int64_t maxb = kWinoRows / kMR;
  int64_t msplit = row_splits(NPt, MB, (MB + maxb - 1) / maxb, true);
  const int64_t T = num_threads();
  if (wino_fine_split() && T > 1 && NPt > 1 && NT % kNR != 0 && NPt * msplit < 2 * T)
    msplit = std::min(MB, (2 * T + NPt - 1) / NPt);
  const int64_t items = NPt * msplit, rows_max = ((MB + msplit - 1) / msplit) * kMR;
  const int64_t xs = MB * kMR * C;  // between the transform positions of u

  auto work = [&](int64_t i0, int64_t i1) {
    float* V = thread_scratch(2, static_cast<size_t>(16 * wino_vstride(UKS)));  // the 16 V panels
    float* Mb = thread_scratch(3, static_cast<size_t>(16 * wino_vstride(rows_max)));  // M
    PanelRuns runs;
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t p = it / msplit, mi = it % msplit;
      const int64_t mb0 = MB * mi / msplit, mb1 = MB * (mi + 1) / msplit, mxs = wino_vstride((mb1 - mb0) * kMR);
      wino_runs(s, NT, p * kNR, runs);
      for (int64_t c0 = 0; c0 < C; c0 += UKS) {
        const int64_t kc = std::min(UKS, C - c0);
        win(x, s, runs, c0, kc, V);
        for (int xi = 0; xi < 16; ++xi)
          for (int64_t mb = mb0; mb < mb1; ++mb)
            // runs.nc columns: a panel of <= 16 tiles takes the half-width tile (M's other columns
            // are never read)
            tile(kc, pc.u + xi * xs + (c0 * MB + mb * kc) * kMR, V + xi * wino_vstride(kc),
                 Mb + xi * mxs + (mb - mb0) * kMR * kNR, kNR, kMR, runs.nc, c0 > 0, nullptr, nullptr, false);
      }
      wout(Mb, mxs, s, runs, mb0 * kMR, std::min(mb1 * kMR, s.O) - mb0 * kMR, pc.b, res, relu, y);
    }
  };
  run_items(items, work);
}

}  // namespace aimass::runtime::conv
