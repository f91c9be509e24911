// Small-M linear over weights packed once at plan build (y[M, N] = x[M, K] @ w[N, K]^T
// + bias, optional ReLU fused in the register epilogue).
//
// Why: OpenBLAS sgemm re-packs the whole weight matrix on every call, so at 2..32
// rows (a dynamic batch) it pays the weight traffic of a GEMM for the FLOPs of a
// GEMV and a batch of 16 cost almost 16 batch-1 runs. Here the weights are stored
// once in column panels of kPanel outputs, laid out [panel][k][kPanel] (the last
// panel zero-padded), so the kernel streams each panel contiguously while up to
// 8 (AVX-512) / 6 (AVX2) activation rows accumulate in registers: the panel is
// read once per block of rows, not once per row.
//
// Blocking (GotoBLAS order): N blocks of kNb panels > M blocks (pick_mc) > K blocks of kKc >
// panels > row tiles. A
// panel's K block (kKc x 32 floats = 32 KB) stays in L1 while every row tile of the M block
// reuses it; the x block (mc x kKc) stays in L2 across all panels; partial sums go
// through y, whose M block stays in L2 across the K blocks.
//
// On AVX-512 with more than one row tile the order is row tiles outer instead (x tile in L1,
// the N block's panels streamed from L2; row_tiles_outer below).
//
// Every output is acc = sum_k w[n,k]*x[m,k] accumulated in k order, then the epilogue
// (+ bias, activation, + residual), applied once per output in registers: the
// scalar reference keeps that order (SIMD paths differ only by FMA rounding and
// the vectorized GELU of vec_kernels.h). Raw pointers only: the SIMD translation
// units instantiate no std:: templates.
#pragma once
#include <cstdint>

namespace aimass::runtime::packed {

constexpr int64_t kPanel = 32;  // outputs per panel: two AVX-512 / four AVX2 registers

constexpr int64_t kKc = 256;     // K block (see above)
constexpr int64_t kNb = 8;       // panels per N block (256 outputs)

inline int64_t num_panels(int64_t N) { return (N + kPanel - 1) / kPanel; }

// What runs on each output after its full K sum: v = act(acc + bias) (+ res[m * ldr + n]).
// act: 0 none, 1 ReLU (torch's: NaN stays NaN), 2 GELU (erf), 3 GELU (tanh approximation).
struct Epilogue {
  int act = 0;
  const float* res = nullptr;  // residual added after the activation (y = act(x W^T + b) + res)
  int64_t ldr = 0;             // its row stride
};
enum : int { kEpiNone = 0, kEpiRelu = 1, kEpiGelu = 2, kEpiGeluTanh = 3 };

// wp[num_panels(N) * K * kPanel] <- w[N, K] row-major; bp[num_panels(N) * kPanel] <- bias (or zeros).
void pack(const float* w, int64_t N, int64_t K, float* wp);

// Panels [p0, p1) for all M rows with the epilogue `e`; y is [M, N] row-major.
void panels_ex_scalar(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                      int64_t p1, int64_t N, const Epilogue& e, float* y);
void panels_ex_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                    int64_t p1, int64_t N, const Epilogue& e, float* y);
void panels_ex_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                      int64_t p1, int64_t N, const Epilogue& e, float* y);
using PanelsExFn = void (*)(const float*, int64_t, int64_t, const float*, const float*, int64_t, int64_t, int64_t,
                            const Epilogue&, float*);
PanelsExFn panels_ex_kernel();  // the one of the engine's SIMD level

// The same with x's row stride ldx >= K (panels_ex_* are these at ldx = K). linear() runs them on
// a copy of x padded to ldx = K + kPadX where K % 512 == 0 (see padded_x).
void panels_ex_ld_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                         int64_t p0, int64_t p1, int64_t N, const Epilogue& e, float* y);
void panels_ex_ld_avx2(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                       int64_t p0, int64_t p1, int64_t N, const Epilogue& e, float* y);
void panels_ex_ld_avx512(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                         int64_t p0, int64_t p1, int64_t N, const Epilogue& e, float* y);
using PanelsExLdFn = void (*)(const float*, int64_t, int64_t, int64_t, const float*, const float*, int64_t, int64_t,
                              int64_t, const Epilogue&, float*);
PanelsExLdFn panels_ex_ld_kernel();

// Panels [p0, p1) for all M rows; bias_p is the padded bias (nullable); y is [M, N] row-major.
void panels_scalar(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y);
void panels_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                 int64_t p1, int64_t N, bool relu, float* y);
void panels_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y);

// One row (M = 1) over panels [p0, p1), walked last to first when `reverse`, over the whole K
// at once (a recurrent step at batch 1: one call a step, no partial sums through y).
// y[n] = sum_k w[n,k] x[k] (+ bias[n]) for the panels' columns; y has the padded width.
void gemv_walk_scalar(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                      bool reverse, float* y);
void gemv_walk_avx2(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                    bool reverse, float* y);
void gemv_walk_avx512(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                      bool reverse, float* y);
using GemvWalkFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, int64_t, bool, float*);
GemvWalkFn gemv_walk_kernel();  // the one of the engine's SIMD level

// gemv_walk over W panels [p0, p1), and in the same k loop kWalkRows rows xr (row stride Kv)
// times panels [q0, q1) of a second packed matrix V[Nv, Kv]: out[r * ldo + n] = sum_k v[n,k]
// xr[r,k] (+ bq[n]) for the columns of those panels. One V panel rides along each group of four
// W panels walked (any V panels left over run after the walk). A recurrent step at batch 1 is
// bound by the L3 stream of W while its FMA units idle; the layer's input projection of rows
// still ahead (an FMA-bound GEMM) fills them (ops_rnn.cc: LSTM 2x512 at batch 1, -13% a run on
// AMD EPYC). W's sums are gemv_walk's, bit for bit.
constexpr int kWalkRows = 8;
void gemv_walk_gemm_scalar(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                           bool reverse, float* y, const float* xr, int64_t Kv, const float* vp, const float* bq,
                           int64_t q0, int64_t q1, float* out, int64_t ldo);
void gemv_walk_gemm_avx512(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                           bool reverse, float* y, const float* xr, int64_t Kv, const float* vp, const float* bq,
                           int64_t q0, int64_t q1, float* out, int64_t ldo);
using GemvWalkGemmFn = void (*)(const float*, int64_t, const float*, const float*, int64_t, int64_t, bool, float*,
                                const float*, int64_t, const float*, const float*, int64_t, int64_t, float*, int64_t);
// The AVX-512 kernel, or null below AVX-512 (the caller then runs the walk and the GEMM apart).
GemvWalkGemmFn gemv_walk_gemm_kernel();

// Dispatches on simd_level() and splits the panels (or, where row_split(), the row tiles) over
// the engine's thread pool.
void linear(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t N, bool relu,
            float* y);
void linear(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t N,
            const Epilogue& e, float* y);

// K block of the row-tiles-outer order (packed_gemm_blocked.h): K is cut into equal blocks of
// at most this many (768 -> 2 x 384).
constexpr int64_t kKcRows = 384;

// Whether the AVX-512 kernel runs row tiles outer (x tile in L1, panels streamed from L2)
// rather than panels outer: with more than one row tile. Rows K floats apart with K % 512 == 0
// put >= 6 of 12 rows in one 8-way L1 set (measured slower there in place), so the x tile is
// then copied to a padded buffer first (AIMASS_PACKED_ALIAS_COPY=0: panels outer instead).
// AIMASS_PACKED_ROWS_OUTER=0 keeps panels outer everywhere (the old kernel, for A/B runs).
bool row_tiles_outer(int64_t M, int64_t K, int mr);
bool linear_rows_outer(int64_t M, int64_t K);  // the same for the kernel linear() dispatches to

// Whether linear() copies x once per call to rows K + kPadX floats apart (a thread-local buffer
// of the caller, grown on demand) and runs the kernel on it in place: where it runs row tiles
// outer and K % 512 == 0 (rows K floats apart would share one L1 set). AIMASS_PACKED_PAD_X=0
// leaves x in place (the kernel then copies each tile's x block per N block, as before).
constexpr int64_t kPadX = 16;
bool pads_x(int64_t M, int64_t K);

// Whether linear() on 2+ threads splits rows (whole row tiles over every panel) rather than
// panels: at row tiles outer with >= kRowSplitMinRows rows and K >= kRowSplitMinK. Measured at
// BERT-base batch 8 (1024 rows, K = 768, 2 threads, CPU time per call on a loaded 2-vCPU EPYC VM):
// q+k+v 37.8 -> 36.6 ms, f1 51.2 -> 48.3 ms. AIMASS_PACKED_ROW_SPLIT=0 splits panels (A/B runs).
constexpr int64_t kRowSplitMinRows = 512;
constexpr int64_t kRowSplitMinK = 512;
bool row_split(int64_t M, int64_t K);

// Rows per M block for `ncols` outputs: the block's partial sums (mc x ncols floats) stay
// within ~L2 (a multiple of 24, so 12-row and 6-row tiles divide it).
int64_t pick_mc(int64_t M, int64_t ncols);

}  // namespace aimass::runtime::packed
