// Convolution as a GEMM over weights packed once at plan build (ResNet-style convs).
//
// Layout: activations stay NCHW (torch's layout, so every other op and the model's
// inputs/outputs are unchanged). A conv is y[O, cols] = W[O, Kc] x B[Kc, cols] with
// Kc = C/G * KH * KW taps (c, kh, kw) and cols = the output pixels (n, oh, ow) of the
// WHOLE batch, so small late-layer images (7x7 = 49 pixels) fill the 32-column panels
// across samples instead of padding each sample.
//
// Blocking (docs/runtime.md "Convolution kernel"):
// - A (weights): packed at load into row blocks of kMR = 8 output channels, laid out
//   K-slice by K-slice, [slice][O/kMR][kc][kMR] (the last block zero-padded), BatchNorm
//   already folded in by export: one slice's pass over the row blocks is one sequential stream.
// - B (activations): packed per call, one panel of kNR = 32 output pixels at a time,
//   [kc][kNR] for a K-slice of kc <= kKCPacked taps (an implicit im2col that reads the input
//   straight from NCHW, zero for out-of-image taps and past the last pixel): 16 KiB at
//   kc = 128, so a group of two panels sits in L1 while every weight row block streams over it
//   (an in-place 1x1 panel too: kc <= kKC = 128).
// - Micro-kernel: kMR x kNR accumulators in registers (AVX-512: 16 zmm; AVX2: four
//   4x16 sub-tiles), k-loop over the slice; the epilogue of the first K-slice adds the
//   fused residual (`conv + x` of a ResNet block; res may be y: residual_in_place_ok), that
//   of the last the bias and ReLU, in registers, storing straight into NCHW rows (masked at the panel's tail; a panel that crosses
//   into the next sample goes through a small gather/scatter tile).
// - Threads: work items are (group of panels) x (range of weight row blocks); the row
//   range is split only when there are too few panels to keep every thread busy.
//
// - AVX-512 tile widths: a panel's tail of <= 8 columns runs 8 ymm accumulators, one of 9..16 a half
//   tile (8 zmm), one of 17..20 columns the half tile plus one ymm accumulator (8 rows in lanes) per
//   extra column (AIMASS_CONV_TAIL=0: the half and full tiles only), so a 7x7 plane at batch 1
//   (49 = 32 + 17 pixels) and a 14x14 plane's 49 Winograd tiles cost about 1.5 tiles instead of 2.
// Each output is sum_k a[m,k] b[k,j] in k order, then + bias, + residual, then ReLU; the
// scalar tile is the reference (the SIMD tiles differ by FMA rounding only). Raw
// pointers only in the SIMD translation units.
#pragma once
#include <cstddef>
#include <cstdint>

#include "aimass/cpu_features.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "runtime/ops.h"

namespace aimass::runtime::conv {

constexpr int64_t kMR = 8;    // output channels per weight row block
constexpr int64_t kNR = 32;   // output pixels per activation panel
// Taps per K-slice of a 1x1 panel (read in place, or packed at 14x14). At 256 a group of two
// in-place panels (64 KiB; at 56x56 their rows, 12544 bytes apart, map to half of L1's sets) left L1
// and was read back from L2 by every weight row block; at 128 the group stays. ResNet-50 batch 1,
// same-run model A/B mins on a lightly loaded machine, 256 -> 128: 2 threads 30.25 -> 29.83,
// 31.34 -> 30.79, 30.58 -> 30.16, 31.48 -> 31.58 ms, 1 thread 54.70 -> 53.39, 51.77 -> 51.09 ms
// (0-2%, the edge of the noise); batch 8 within noise (2 threads 219.7 -> 221.6, 210.6 -> 208.7
// ms). The 256 -> 128 at 56x56 (two slices now: no long groups) went 0.80 -> 0.65 ms at 2 threads.
constexpr int64_t kKC = 128;
// taps per K-slice of a packed (im2col) panel: a group of two (2 x 16 KiB) and the weight block
// (4 KiB) stay in a 32-48 KiB L1 (at 256 taps the group was 64 KiB; the 7x7/2 stem at batch 8 ran
// 18.0-19.0 -> 16.9-17.7 ms CPU at 128, the 3x3/2 at 56x56 7.5-8.1 -> 7.1-7.6 ms)
constexpr int64_t kKCPacked = 128;
constexpr int64_t kGroupPanels = 2;  // panels packed together: each weight block serves both from L1
// Panels per work item. A conv with one K-slice and output planes of at least kLongPlane pixels,
// unless it is a 1x1 with fewer than half as many output channels as taps (long_group_ok), takes
// long groups: as many panels as fill kGroupBytes of L2 at kc taps (a packed
// panel is kc x kNR floats in the thread's scratch; an in-place pointwise one lies in the input),
// at most kMaxGroupPanels, while every thread still gets two groups. Each weight row block
// (8 x kc floats) then stays in L1 over all the group's panels and writes its 8 output rows as runs
// of up to 32 x 32 pixels, where two panels wrote 256-byte pieces scattered over every output
// plane: at batch 8 the 56x56 1x1 convs wrote their outputs at half of onnxruntime's rate (ResNet-50
// batch 8, a loaded machine, per-step min CPU of 6 runs: the 64 -> 256 downsample 11.8 -> 7.9 ms,
// each 64 -> 256 conv3 + residual 10.8 -> 7.8 ms). Other convs keep kGroupPanels: with several
// K-slices a long group's outputs are read back by every slice, small planes gain nothing (the
// 14x14 and 7x7 layers and the stride-2 convs ran 2-10% slower with long groups), and a reducing
// conv writes little (the 256 -> 64 1x1 at 56x56: 7.6-8.1 -> 8.4 ms).
constexpr int64_t kMaxGroupPanels = 32;
constexpr int64_t kGroupBytes = int64_t{512} << 10;
constexpr int64_t kLongPlane = 8 * kNR;
inline bool long_group_ok(const ops::Conv2dShape& s, int64_t Kc, int64_t KS) {
  return Kc == KS && s.OH * s.OW >= kLongPlane && (!ops::is_pointwise(s) || 2 * s.O >= Kc);
}
inline int64_t group_panels(int64_t NPt, int64_t kc, bool long_ok, int64_t threads) {
  int64_t g = kGroupPanels;
  if (long_ok) {
    g = kGroupBytes / ((kc > 0 ? kc : 1) * kNR * static_cast<int64_t>(sizeof(float)));
    const int64_t per_thread = NPt / (2 * (threads < 1 ? 1 : threads));
    g = g < per_thread ? g : per_thread;
    g = g < kMaxGroupPanels ? g : kMaxGroupPanels;
    g = g > kGroupPanels ? g : kGroupPanels;
  }
  return g < NPt ? g : NPt;
}

// C tile: rows m < mvalid at c + m * ldc, columns [0, ncols) (ncols <= kNR).
// acc = (accumulate ? c : 0) + sum_{k < kc} a[k * kMR + m] * b[k * kNR + j];
// then + bias[m] (nullable), + res[m * ldc + j] (nullable), max(0, .) when relu (NaN kept).
// a: kc x kMR floats, 32-byte aligned (a tail tile loads a tap's 8 weights as one ymm); b: kc x kNR floats,
// 64-byte aligned.
// The scalar tiles' epilogue for one row: cr[j] = relu?(acc[j] + bias (+ res[j])), j < ncols
// (bias / res nullable: bias points at the row's bias).
inline void store_row_scalar(const float* acc, int64_t ncols, const float* bias, const float* res, bool relu,
                             float* cr) {
  for (int64_t j = 0; j < ncols; ++j) {
    float v = acc[j];
    if (bias) v += *bias;
    if (res) v += res[j];
    if (relu) v = v < 0.f ? 0.f : v;
    cr[j] = v;
  }
}
void tile_scalar(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
                 bool accumulate, const float* bias, const float* res, bool relu);
void tile_avx2(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
               bool accumulate, const float* bias, const float* res, bool relu);
void tile_avx512(int64_t kc, const float* a, const float* b, float* c, int64_t ldc, int64_t mvalid, int64_t ncols,
                 bool accumulate, const float* bias, const float* res, bool relu);

// The same tile with B read in place at b[k * ldb + j] (unaligned; ldb >= kNR): a stride-1
// unpadded 1x1 conv's full panel inside one sample's plane is the input itself,
// b = x + n*CHW + c0*HW + p0 with ldb = H*W, so it is not copied into a panel first. All kNR
// columns of every row are read (the caller guarantees they exist); ncols limits the stores.
// `stream`: prefetch the rows a few taps ahead (the first weight block to read this panel);
// `prefetch_c`: request the tile's output (and residual) lines before the k-loop.
void tile_ld_scalar(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t mvalid,
                    int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu, bool stream,
                    bool prefetch_c);
void tile_ld_avx512(int64_t kc, const float* a, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t mvalid,
                    int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu, bool stream,
                    bool prefetch_c);

// Implicit im2col of one panel: B[t][j] for t < kc, j < kNR = tap k0 + t (c, kh, kw) of output
// pixel j0 + j (global over the batch; pixel q is sample q / P, oh, ow), 0 for out-of-image
// taps and past the last pixel. The pixels come in runs along one output row of one
// sample (for a 1x1 stride-1 unpadded conv: along the sample's whole plane).
struct PanelRuns {
  struct Run {
    int64_t base;  // offset of the sample's input in x
    int64_t oh, ow, len, j;
  } r[kNR];
  int n = 0, nc = 0;  // runs, valid columns
  bool pointwise = false;
};
void panel_runs(const ops::Conv2dShape& s, int64_t NPix, int64_t j0, PanelRuns& runs);
// The runs of columns [j0, j0 + kNR) of `total` items numbered n-major over samples of `per_sample`
// items in rows of `row_len` (runs break at rows, or only at samples when `whole_plane`); a run's
// base is its sample's input offset n * CHW. panel_runs (pixels) and wino_runs (2x2 tiles) use it.
void grid_runs(int64_t per_sample, int64_t row_len, int64_t CHW, int64_t total, int64_t j0, bool whole_plane,
               PanelRuns& runs);

// Calls fn(run, i0, L) for each chunk of <= 16 columns [i0, i0 + L) of each run.
template <class Fn>
inline void for_chunks(const PanelRuns& runs, Fn&& fn) {
  for (int ri = 0; ri < runs.n; ++ri)
    for (int64_t i0 = 0; i0 < runs.r[ri].len; i0 += 16)
      fn(runs.r[ri], i0, runs.r[ri].len - i0 < 16 ? runs.r[ri].len - i0 : int64_t{16});
}

// Runs work(i0, i1) over items [0, items) in up to 4 chunks per thread of the engine's pool.
template <class Work>
inline void run_items(int64_t items, Work&& work) {
  const int T = num_threads();
  if (T <= 1 || items <= 1) {
    work(int64_t{0}, items);
    return;
  }
  const int nchunks = static_cast<int>(items < 4 * int64_t{T} ? items : 4 * int64_t{T});
  parallel_chunks(nchunks, [&](int c, int nc) { work(items * c / nc, items * (c + 1) / nc); });
}

// Weight-row splits per item when `groups` input panel groups (each packed or transformed by
// the item that runs it) are too few to keep every thread busy; at least `min_split`. Where
// every item packs its group's input itself (`packs`), one split per thread: more would pack
// the same panels again (ResNet-18's 7x7 3x3 convs at batch 1, 2 threads, 4 splits per thread:
// 14.6-14.9 -> 12.4-12.9 ms for the model); panels read in place cost nothing to repeat, and 4
// items per thread balance better.
inline int64_t row_splits(int64_t groups, int64_t MB, int64_t min_split, bool packs) {
  const int64_t T = num_threads(), want = (packs ? 1 : 4) * T;
  if (T <= 1 || groups * min_split >= want) return min_split;
  const int64_t split = (want + groups - 1) / groups;
  return split < min_split ? min_split : split < MB ? split : MB;
}


using TileFn = void (*)(int64_t, const float*, const float*, float*, int64_t, int64_t, int64_t, bool, const float*,
                        const float*, bool);
inline TileFn tile_for(SimdLevel lvl) {
  return lvl >= SimdLevel::AVX512 ? tile_avx512 : lvl >= SimdLevel::AVX2 ? tile_avx2 : tile_scalar;
}
void pack_scalar(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t k0, int64_t kc,
                 float* dst);
void pack_avx512(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t k0, int64_t kc,
                 float* dst);

// Taps per K-slice: Kc split into (almost) equal slices of at most `most` (kKC or kKCPacked).
// A packed Kc up to kKCPackedOne stays one slice: the 7x7 stem's 147 taps in two slices of 74 wrote
// its 3.2 MiB (batch 1) output, read it back and wrote it again; two panels of 147 taps (37 KiB)
// and the weight block (4.6 KiB) still fit a 48 KiB L1.
constexpr int64_t kKCPackedOne = 160;
inline int64_t slice_taps(int64_t Kc, int64_t most = kKC) {
  if (most == kKCPacked && Kc <= kKCPackedOne) return Kc > 0 ? Kc : 1;
  const int64_t n = (Kc + most - 1) / most;
  return n > 0 ? (Kc + n - 1) / n : 1;
}

// ---- Stride-2 convs: phase planes, no im2col (the 7x7/2 stem, the 3x3/2 convs) ----
// The input is split once per call into zero-padded column phases: xp[n][c][ph][r][j] = the input
// at row r - PH, column 2j + ph - PW (0 outside the image), r < IHp = 2(OH - 1) + KH, j < Wh.
// Tap (c, kh, kw) of output pixel (oh, ow) is then xp[n][c][kw & 1][2oh + kh][ow + (kw >> 1)]: for
// 32 pixels along one output row, a contiguous run at a fixed offset per tap, so the tile reads its
// B rows in place through an offset table instead of a packed panel (packing the stem's stride-2
// taps, two loads and a permute per 16 values, took a quarter of its time). A tile's columns past
// the row's last pixel read the next phase row (never stored); the buffer ends with kNR floats of slack.
// Eligible: groups 1, stride 2x2, undilated, not 1x1 (a 1x1/2 reads a quarter of the phases).
// Taken (PackedConv::phase) where it pays: one K-slice (Kc <= kKCPackedOne) and output rows of at
// least kNR pixels. A 3x3/2 at 56x56 -> 28x28 (128 channels, 9 K-slices) ran slower than packing
// (1.72 -> 1.86 ms, batch 1, a loaded machine): its 28-pixel rows fill 7/8 of a tile, where packed
// panels run along the whole plane, and the outputs are read back by every K-slice.
bool phase_ok(const ops::Conv2dShape& s);
bool phase_pays(const ops::Conv2dShape& s);
bool phase_enabled();  // AIMASS_CONV_PHASE (read once) is not 0
// Floats per phase row: OW + (KW - 1) / 2 columns, rounded up to 16.
inline int64_t phase_width(const ops::Conv2dShape& s) { return (s.OW + (s.KW - 1) / 2 + 15) / 16 * 16; }
// One input row (W floats; null: outside the image) into its two phase rows of Wh floats (a multiple of 16).
void phase_row_scalar(const float* src, int64_t W, int64_t PW, int64_t Wh, float* even, float* odd);
void phase_row_avx512(const float* src, int64_t W, int64_t PW, int64_t Wh, float* even, float* odd);
// The 8 x 32 tile of tile_scalar with B row k at b + off[k] (columns [0, kNR) of each row readable).
void tile_off_scalar(int64_t kc, const float* a, const float* b, const int32_t* off, float* c, int64_t ldc,
                     int64_t mvalid, int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu);
void tile_off_avx512(int64_t kc, const float* a, const float* b, const int32_t* off, float* c, int64_t ldc,
                     int64_t mvalid, int64_t ncols, bool accumulate, const float* bias, const float* res, bool relu);

// ---- Winograd F(2x2, 3x3) for stride-1 undilated 3x3 convs (ops_conv_wino.cc) ----
// Output tiles of 2x2 pixels (tile (th, tw) of sample n covers oh = 2th.., ow = 2tw..), the
// tiles of the whole batch numbered n-major like the pixels. Per tile, the 4x4 input patch d
// (rows 2th - PH .., columns 2tw - PW .., zero outside the image) becomes V = B^T d B, the
// weights U = G g G^T (packed once), and for each of the 16 positions xi of the 4x4 transform
// M[xi][o][tile] = sum_c U[xi][o][c] V[xi][c][tile] is a GEMM on the same 8 x 32 tiles as the
// direct conv (panels of 32 tiles); then Y = A^T M A (2x2), + bias, + residual, ReLU. 16
// products per tile instead of 36: 2.25x fewer multiply-adds. The transforms' coefficients are
// 0, +-1 and +-1/2, so the result stays within a few ulps x sqrt(taps) of the direct sum (the
// F(4x4, 3x3) variant, about 10x less accurate by published analyses, is not used). A non-finite input reaches the
// whole 2x2 output tile its patch feeds (the direct conv: only the windows that cover it);
// AIMASS_WINOGRAD=0 turns the path off.
constexpr int64_t kWinoKC = 128;  // channels per K-slice: the 16 V panels (16 x 128 x 32 floats) = 256 KiB
constexpr int64_t kWinoRows = 256;  // output channels per work item: M (16 x 256 x 32 floats) = 512 KiB

// Floats between the transform positions of V (and M, wino_vstride(rows)): one cache line more
// than the panel so the 16 positions a tile writes or reads do not all map to one L1 set
// (a 4 KiB multiple apart they did: the transforms took 47% of a 56x56 layer's time, 33% after).
inline int64_t wino_vstride(int64_t kc) { return kc * kNR + 16; }

// Runs of one panel of tiles along one tile row of one sample (PanelRuns with oh/ow = th/tw).
void wino_runs(const ops::Conv2dShape& s, int64_t NT, int64_t j0, PanelRuns& runs);
// V[xi][t][j] (xi < 16, t < kc, j < kNR; at V + xi * wino_vstride(kc) + t * kNR + j) for
// channels [c0, c0 + kc) of the panel's tiles, 0 past the last tile.
void wino_in_scalar(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t c0, int64_t kc,
                    float* V);
void wino_in_avx512(const float* x, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t c0, int64_t kc,
                    float* V);
// Output rows [o0, o0 + mo) of the panel from M[xi][m][j] at M + xi * mxs + m * kNR + j (m < mo):
// y = relu?(A^T M A + bias[o] (+ res)), NCHW, clipped at OH/OW.
void wino_out_scalar(const float* M, int64_t mxs, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t o0,
                     int64_t mo, const float* bias, const float* res, bool relu, float* y);
void wino_out_avx512(const float* M, int64_t mxs, const ops::Conv2dShape& s, const PanelRuns& runs, int64_t o0,
                     int64_t mo, const float* bias, const float* res, bool relu, float* y);

// Whether a conv of this shape may take the Winograd path at all, and (per call) whether it
// should at batch N: fewer tile-panel products than the direct conv's pixel panels, counting
// the transforms (a 7x7 plane at batch 1 fills half a 32-tile panel: direct).
bool wino_enabled();  // AIMASS_WINOGRAD (read once) is not 0
bool wino_eligible(const ops::Conv2dShape& s);
bool wino_pays(const ops::Conv2dShape& s, int64_t N);

// ---- 1x1 convs on small planes: output channels in the vector lanes (ops_conv_cl.cc) ----
// A pixel panel puts 32 output pixels in the lanes: a 7x7 plane at batch 1 (49 pixels) fills
// 49 of 64 columns, a 14x14 one (196) 196 of 208, and each K-slice's partial sums go through the
// output. The CL tile turns the product around: R <= kCLPix pixels of one sample (one broadcast
// each) times kCLRows = 32 output channels (two zmm, read from four of the direct path's 8-row
// weight blocks), 2R accumulators summed over ALL taps in registers, so every lane is used
// whatever the plane size, and the output is written once, transposed in the epilogue (+ bias,
// + residual, ReLU, in that order). Pixels of a sample are split into tiles of (almost) equal
// size. The weights are packed a second time for it, [O / 32][Kc][32] (one aligned stream; the
// direct blocks, read as 4 x 8 floats and joined, cost 8% of the layer). AVX-512 (AVX2 keeps the
// panel path; the scalar tile is the reference); AIMASS_CONV_CL=0 turns it off.
constexpr int64_t kCLRows = 32;  // output channels per CL tile: 4 weight row blocks
constexpr int64_t kCLPix = 12;   // pixels per CL tile at most: 24 zmm accumulators
bool cl_enabled();  // AIMASS_CONV_CL (read once) is not 0
// A pointwise conv with at least kCLRows output channels, at batch N, where the pixel panels
// waste lanes (see cl_pays in ops_conv_cl.cc).
bool cl_pays(const ops::Conv2dShape& s, int64_t N);
// y rows [co0, co0 + ov) (ov <= kCLRows) of pixels [p0, p0 + R) of one sample (R <= kCLPix):
// xb = x + n * C * H * W + p0 (pixel j of tap k at xb[k * HW + j]), yb = y + n * O * P + co0 * P + p0
// (row m at yb[m * P]), resb likewise or null; wb = the block's weights, tap k's 32 channels at
// wb + k * kCLRows (64-byte aligned); bias (nullable) the block's first channel's.
void tile_cl_scalar(const float* wb, int64_t Kc, const float* bias, const float* xb, int64_t HW, int64_t R, float* yb,
                    int64_t P, int64_t ov, const float* resb, bool relu);
void tile_cl_avx512(const float* wb, int64_t Kc, const float* bias, const float* xb, int64_t HW, int64_t R, float* yb,
                    int64_t P, int64_t ov, const float* resb, bool relu);

struct PackedConv;

// ---- Strided 1x1 convs (ResNet's downsample 1x1/2) run as pointwise convs ----
// The taps a 1x1/s conv reads are every s-th column of every s-th row: copied once per call into
// a [N][C][OH][OW] buffer (the caller's thread_scratch slot 2), the conv is the pointwise conv of
// pointwise_view(s) on it: in-place panels or the CL tile instead of packing strided panels per
// K-slice (and again per weight-row split). Same taps, same weight packing (KS as a pointwise
// conv's). AIMASS_CONV_DECIMATE=0 turns it off.
bool decimate_ok(const ops::Conv2dShape& s);  // groups 1, 1x1, unpadded, a stride > 1
bool decimate_enabled();                      // AIMASS_CONV_DECIMATE (read once) is not 0
ops::Conv2dShape pointwise_view(const ops::Conv2dShape& s);  // C x OH x OW in, stride 1
// dst[j] = src[j * SW], j < OW
void decimate_row_scalar(const float* src, int64_t SW, int64_t OW, float* dst);
void decimate_row_avx512(const float* src, int64_t SW, int64_t OW, float* dst);
void decimate(const float* x, const ops::Conv2dShape& s, int64_t N, float* xd);
// run_cl on shape s (pc.s or its pointwise view)
void cl_shape(const PackedConv& pc, const ops::Conv2dShape& s, const float* x, int64_t N, const float* res, bool relu,
              float* y);

// The weights of one conv (groups == 1) packed for the tiles; built once per model and
// shared by every plan of an executor (WeightCache). `wino`: kAuto packs U when the shape is
// eligible (and AIMASS_WINOGRAD is not 0) and the direct weights only when some batch size
// runs direct (wino_pays(s, 1) false); kNoWino only the direct weights; kBoth every layout the
// shape can run: U where wino_eligible, the direct weights, the CL weights for pointwise (tests).
struct PackedConv {
  enum Wino { kAuto, kNoWino, kBoth };
  ops::Conv2dShape s{};
  int64_t Kc = 0, MB = 0, KS = 0;  // taps, weight row blocks, taps per K-slice
  AlignedBuffer wbuf, bbuf, ubuf;
  float* w = nullptr;  // per K-slice [k0, k0 + kc): [MB][kc][kMR] at w + k0 * MB * kMR; null: Winograd only
  float* b = nullptr;  // [MB * kMR] zero-padded bias, null without one
  // Winograd: per xi, per K-slice [c0, c0 + kc) of UKS channels: [MB][kc][kMR] at
  // u + xi * MB * kMR * C + c0 * MB * kMR; null when not packed
  float* u = nullptr;
  int64_t UKS = 0;
  bool phase = false;  // phase_pays(s) and phase_enabled(): run_direct takes run_phase where it has the tile
  // CL tile weights [O / kCLRows][Kc][kCLRows] (channels past O zero), packed where cl_pays at batch 1
  // (or kBoth); null otherwise. A second copy beside w: other batch sizes may run the pixel panels.
  AlignedBuffer clbuf;
  float* wcl = nullptr;
  PackedConv(const float* weight, const float* bias, const ops::Conv2dShape& s, Wino wino = kAuto);
  PackedConv(const PackedConv&) = delete;
  PackedConv& operator=(const PackedConv&) = delete;

 private:
  void pack_winograd(const float* weight);  // ops_conv_wino.cc
  void pack_cl(const float* weight);         // ops_conv_cl.cc
};

// y[N, O, OH, OW] = relu?(conv(x[N, C, H, W]) + bias (+ res[N, O, OH, OW])), NCHW.
// With several K-slices the direct path adds the residual at the first slice (the sum's order is
// then res + slices + bias: FMA-level differences only).
void run(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y);
// Whether run() may be given res == y (the executor then writes a residual conv's output over its
// residual, where nothing reads the residual later: a ResNet block's shortcut, saving the output's
// line reads, 10% of a batch-8 56x56 1x1): every path reads each residual value before any write
// to that output position (direct: at the first K-slice; Winograd and CL: in the one epilogue;
// the phase path adds it at its last K-slice, so only with one slice).
bool residual_in_place_ok(const PackedConv& pc);
// The phase-plane path of an eligible conv (run_direct takes it on AVX-512 and the scalar level
// when PackedConv::phase is set; tests call it directly).
void run_phase(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y);
// The two paths run() picks from (tests compare them).
void run_direct(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y);
void run_winograd(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y);
// The CL path of a pointwise conv with wcl packed (run_direct takes it on AVX-512 when cl_pays;
// tests call it directly, at the scalar level too).
void run_cl(const PackedConv& pc, const float* x, int64_t N, const float* res, bool relu, float* y);

}  // namespace aimass::runtime::conv
