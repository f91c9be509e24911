#include "runtime/packed_gemm.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>

#include "aimass/cpu_features.h"
#include "aimass/parallel.h"
#include "env_switch.h"

namespace aimass::runtime::packed {

void pack(const float* w, int64_t N, int64_t K, float* wp) {
  const int64_t P = num_panels(N);
  std::memset(wp, 0, static_cast<size_t>(P * K * kPanel) * sizeof(float));
  // Blocked transpose: a block of kPanel weight rows is read row by row (sequential).
  for (int64_t p = 0; p < P; ++p) {
    float* dst = wp + p * K * kPanel;
    const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
    for (int64_t j = 0; j < nc; ++j) {
      const float* src = w + (n0 + j) * K;
      for (int64_t k = 0; k < K; ++k) dst[k * kPanel + j] = src[k];
    }
  }
}

namespace {
inline float epi_scalar(float v, int act) {
  switch (act) {
    case kEpiRelu: return v < 0.f ? 0.f : v;  // torch's relu: NaN stays NaN (like the SIMD max(0, v))
    case kEpiGelu: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case kEpiGeluTanh: {
      const float k = 0.7978845608028654f;
      return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
    }
    default: return v;
  }
}
}  // namespace

void panels_ex_ld_scalar(const float* x, int64_t ldx, int64_t M, int64_t K, const float* wp, const float* bias_p,
                         int64_t p0, int64_t p1, int64_t N, const Epilogue& e, float* y) {
  for (int64_t p = p0; p < p1; ++p) {
    const float* w = wp + p * K * kPanel;
    const int64_t n0 = p * kPanel, nc = std::min(kPanel, N - n0);
    for (int64_t m = 0; m < M; ++m) {
      float acc[kPanel] = {};
      const float* xr = x + m * ldx;
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xr[k];
        const float* wk = w + k * kPanel;
        for (int64_t j = 0; j < kPanel; ++j) acc[j] += wk[j] * xv;
      }
      for (int64_t j = 0; j < nc; ++j) {
        float v = epi_scalar(acc[j] + (bias_p ? bias_p[p * kPanel + j] : 0.f), e.act);
        if (e.res) v += e.res[m * e.ldr + n0 + j];
        y[m * N + n0 + j] = v;
      }
    }
  }
}

void panels_ex_scalar(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                      int64_t p1, int64_t N, const Epilogue& e, float* y) {
  panels_ex_ld_scalar(x, K, M, K, wp, bias_p, p0, p1, N, e, y);
}

void panels_scalar(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y) {
  panels_ex_scalar(x, M, K, wp, bias_p, p0, p1, N, Epilogue{relu ? kEpiRelu : kEpiNone}, y);
}
void panels_avx2(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                 int64_t p1, int64_t N, bool relu, float* y) {
  panels_ex_avx2(x, M, K, wp, bias_p, p0, p1, N, Epilogue{relu ? kEpiRelu : kEpiNone}, y);
}
void panels_avx512(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t p0,
                   int64_t p1, int64_t N, bool relu, float* y) {
  panels_ex_avx512(x, M, K, wp, bias_p, p0, p1, N, Epilogue{relu ? kEpiRelu : kEpiNone}, y);
}

namespace {
bool alias_copy_on() {  // AIMASS_PACKED_ALIAS_COPY=0: K % 512 == 0 stays panels outer (A/B runs)
  static const bool on = env_switch_on("AIMASS_PACKED_ALIAS_COPY");
  return on;
}
}  // namespace

bool row_tiles_outer(int64_t M, int64_t K, int mr) {
  static const bool on = env_switch_on("AIMASS_PACKED_ROWS_OUTER");
  return on && mr == 12 && M > mr && K > 0 && (K % 512 != 0 || alias_copy_on());
}

bool linear_rows_outer(int64_t M, int64_t K) {
  return row_tiles_outer(M, K, simd_level() >= SimdLevel::AVX512 ? 12 : 6);
}

bool row_split(int64_t M, int64_t K) {
  static const bool on = env_switch_on("AIMASS_PACKED_ROW_SPLIT");
  return on && M >= kRowSplitMinRows && K >= kRowSplitMinK && linear_rows_outer(M, K);
}

int64_t pick_mc(int64_t M, int64_t ncols) {
  // The y block (mc x ncols partial sums, re-read once per K block) stays within ~512 KB of
  // L2, next to the x block (mc x kKc, as large at ncols = 256).
  constexpr int64_t kL2Floats = (int64_t{512} << 10) / 4;
  int64_t mc = kL2Floats / std::max<int64_t>(ncols, 1) / 24 * 24;
  mc = std::max<int64_t>(mc, 48);
  return mc >= M ? M : mc;
}

void gemv_walk_scalar(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                      bool reverse, float* y) {
  for (int64_t i = p0; i < p1; ++i) {
    const int64_t g = reverse ? p0 + p1 - 1 - i : i;
    const float* w = wp + g * K * kPanel;
    for (int64_t n = 0; n < kPanel; ++n) {
      float acc = 0.f;
      for (int64_t k = 0; k < K; ++k) acc += w[k * kPanel + n] * x[k];
      y[g * kPanel + n] = acc + (bias_p ? bias_p[g * kPanel + n] : 0.f);
    }
  }
}

void gemv_walk_gemm_scalar(const float* x, int64_t K, const float* wp, const float* bias_p, int64_t p0, int64_t p1,
                           bool reverse, float* y, const float* xr, int64_t Kv, const float* vp, const float* bq,
                           int64_t q0, int64_t q1, float* out, int64_t ldo) {
  gemv_walk_scalar(x, K, wp, bias_p, p0, p1, reverse, y);
  for (int64_t q = q0; q < q1; ++q) {
    const float* v = vp + q * Kv * kPanel;
    for (int r = 0; r < kWalkRows; ++r)
      for (int64_t n = 0; n < kPanel; ++n) {
        float acc = 0.f;
        for (int64_t k = 0; k < Kv; ++k) acc += v[k * kPanel + n] * xr[r * Kv + k];
        out[r * ldo + q * kPanel + n] = acc + (bq ? bq[q * kPanel + n] : 0.f);
      }
  }
}

GemvWalkGemmFn gemv_walk_gemm_kernel() {
  return simd_level() >= SimdLevel::AVX512 ? gemv_walk_gemm_avx512 : nullptr;
}

GemvWalkFn gemv_walk_kernel() {
  const SimdLevel lvl = simd_level();
  return lvl >= SimdLevel::AVX512 ? gemv_walk_avx512 : lvl >= SimdLevel::AVX2 ? gemv_walk_avx2 : gemv_walk_scalar;
}

PanelsExFn panels_ex_kernel() {
  const SimdLevel lvl = simd_level();
  return lvl >= SimdLevel::AVX512 ? panels_ex_avx512 : lvl >= SimdLevel::AVX2 ? panels_ex_avx2 : panels_ex_scalar;
}

void linear(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t N, bool relu,
            float* y) {
  linear(x, M, K, wp, bias_p, N, Epilogue{relu ? kEpiRelu : kEpiNone}, y);
}

namespace {
bool pad_x_on() {  // AIMASS_PACKED_PAD_X=0: the kernel copies each tile's x block instead (A/B runs)
  static const bool on = env_switch_on("AIMASS_PACKED_PAD_X");
  return on;
}

// A 64-byte aligned buffer of the calling thread, grown on demand (never shrunk: a plan's
// shapes repeat every run).
float* thread_buffer(int64_t floats) {
  struct Buf {
    float* p = nullptr;
    int64_t n = 0;
    ~Buf() { std::free(p); }
  };
  thread_local Buf b;
  if (b.n < floats) {
    std::free(b.p);
    b.p = nullptr, b.n = 0;  // a failed allocation leaves an empty buffer, not a stale size
    const size_t bytes = (static_cast<size_t>(floats) * sizeof(float) + 63) / 64 * 64;
    b.p = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!b.p) throw std::bad_alloc();
    b.n = floats;
  }
  return b.p;
}

void copy_rows(const float* x, int64_t K, int64_t r0, int64_t r1, float* xp, int64_t ldx) {
  for (int64_t r = r0; r < r1; ++r)
    std::memcpy(xp + r * ldx, x + r * K, static_cast<size_t>(K) * sizeof(float));
}
}  // namespace

bool pads_x(int64_t M, int64_t K) {
  return K % 512 == 0 && pad_x_on() && linear_rows_outer(M, K);
}

PanelsExLdFn panels_ex_ld_kernel() {
  const SimdLevel lvl = simd_level();
  return lvl >= SimdLevel::AVX512 ? panels_ex_ld_avx512
         : lvl >= SimdLevel::AVX2 ? panels_ex_ld_avx2 : panels_ex_ld_scalar;
}

void linear(const float* x, int64_t M, int64_t K, const float* wp, const float* bias_p, int64_t N,
            const Epilogue& ep, float* y) {
  const PanelsExLdFn kernel = panels_ex_ld_kernel();
  const int64_t P = num_panels(N);
  const int64_t nt = num_threads();
  // Rows K floats apart with K % 512 == 0 put a 12-row tile's x in one 8-way L1 set, so the
  // row-tiles-outer kernel copied each tile's x block to a padded buffer once per N block (per
  // chunk: at 2 threads an FFN-down of BERT-base at batch 1 copied all of x 8 times). Here x is
  // copied once per call to rows K + kPadX apart and the kernel reads it in place: BERT-base's
  // K = 3072 at 128 / 1024 rows went from ~101 / 103 to ~107 / 108 GFLOP/s on one AVX-512 core.
  const bool pad = pads_x(M, K);
  const int64_t ldx = pad ? K + kPadX : K;
  float* xp = pad ? thread_buffer(M * ldx) : nullptr;
  const float* xs = pad ? xp : x;
  if (nt > 1 && row_split(M, K)) {
    // Each chunk takes whole 12-row tiles over every panel (sgemm's split): the panel split
    // left every chunk an N block of 8 panels and a lone one (72 / 8 chunks = 9 panels).
    const int64_t tiles = (M + 11) / 12;
    const int nchunks = static_cast<int>(std::min<int64_t>(tiles, 4 * nt));
    parallel_chunks(nchunks, [&](int c, int nc) {
      const int64_t r0 = std::min(M, tiles * c / nc * 12), r1 = std::min(M, tiles * (c + 1) / nc * 12);
      if (r1 <= r0) return;
      if (pad) copy_rows(x, K, r0, r1, xp, ldx);  // each chunk pads its own rows
      Epilogue e = ep;
      if (e.res) e.res += r0 * e.ldr;
      kernel(xs + r0 * ldx, ldx, r1 - r0, K, wp, bias_p, 0, P, N, e, y + r0 * N);
    });
    return;
  }
  // Chunks of >= ~256K multiply-adds amortize a pool wake-up; more chunks than threads
  // let the caller take over the work of a worker that the OS has not scheduled yet.
  const int64_t per_panel = std::max<int64_t>(1, M * K * kPanel);
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 18) / per_panel);
  const int64_t max_chunks = (P + grain - 1) / grain;
  const int nchunks = static_cast<int>(std::min<int64_t>(max_chunks, 4 * static_cast<int64_t>(num_threads())));
  if (nchunks <= 1 || nt <= 1) {
    if (pad) copy_rows(x, K, 0, M, xp, ldx);
    kernel(xs, ldx, M, K, wp, bias_p, 0, P, N, ep, y);
    return;
  }
  auto run_chunk = [&](int c, int nc) {
    const int64_t b = P * c / nc, e = P * (c + 1) / nc;
    if (e > b) kernel(xs, ldx, M, K, wp, bias_p, b, e, N, ep, y);
  };
  if (!pad) {
    parallel_chunks(nchunks, run_chunk);
    return;
  }
  // Every panel chunk reads all rows: the threads first pad a share of the rows each, then take
  // panel chunks, in one pool job (a serial copy held the other thread idle: 1.5 MB, ~5 % of an
  // FFN-down at 2 threads).
  parallel_steps(2, nchunks, [&](int64_t step, int c, int nc) {
    if (step == 0)
      copy_rows(x, K, M * c / nc, M * (c + 1) / nc, xp, ldx);
    else
      run_chunk(c, nc);
  });
}

}  // namespace aimass::runtime::packed
