#include "runtime/ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "aimass/blas.h"
#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include "runtime/gemv.h"
#include "runtime/ops_pool.h"
#include "runtime/packed_gemm.h"
#include "runtime/vec_kernels.h"

namespace aimass::runtime::ops {

Act parse_act(const std::string& name) {
  if (name.empty() || name == "none") return Act::None;
  if (name == "relu") return Act::Relu;
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "silu") return Act::Silu;
  if (name == "sigmoid") return Act::Sigmoid;
  if (name == "tanh") return Act::Tanh;
  throw ValueError(detail::concat("unknown activation '", name,
                                  "'; supported: none, relu, gelu, gelu_tanh, silu, sigmoid, tanh"));
}

namespace {

// Grain sizes: enough work per chunk that the pool's wake-up cost is amortized.
constexpr int64_t kElemGrain = 16384;
// fp32 Linear layers with at least this many rows and inputs run OpenBLAS sgemm (then the
// epilogue) rather than the packed kernel, unless the packed kernel runs row tiles outer at
// K % 512 != 0 (linear_prefers_sgemm). Measured with the panels-outer kernel: at BERT-base's
// shapes with 1024 rows (batch 8 x 128 tokens, K = 768 / 3072) sgemm's larger blocking measured
// 145-150 GFLOP/s against the packed kernel's 124-137 on one AVX-512 core, the whole encoder 9 %
// faster with the epilogue as a separate pass; at K = 256 (BERT-mini) or 128 rows the packed
// kernel was ahead (10-20 %).
constexpr int64_t kSgemmMinRows = 512;
constexpr int64_t kSgemmMinK = 512;

template <Act A>
inline float apply(float v) {
  // torch's relu: NaN and +inf pass through, -0 stays -0 (v > 0 ? v : 0 would turn NaN into 0).
  // The other activations propagate NaN by their formulas; at +-inf they give what torch's
  // scalar reference gives (docs/numerics.md "NaN and infinities").
  if constexpr (A == Act::Relu) return v < 0.f ? 0.f : v;
  if constexpr (A == Act::Gelu) return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
  if constexpr (A == Act::GeluTanh) {
    const float k = 0.7978845608028654f;
    return 0.5f * v * (1.f + std::tanh(k * (v + 0.044715f * v * v * v)));
  }
  if constexpr (A == Act::Silu) return v / (1.f + std::exp(-v));
  if constexpr (A == Act::Sigmoid) return 1.f / (1.f + std::exp(-v));
  if constexpr (A == Act::Tanh) return std::tanh(v);
  return v;
}

// GELU (erf and tanh) runs through the vectorized table (vec_kernels.h); apply<> above
// stays the scalar definition of the other activations.
constexpr bool is_vec_act(Act A) { return A == Act::Gelu || A == Act::GeluTanh; }
inline void vec_act(Act A, const float* x, int64_t n, float* y) {
  const vec::Kernels& k = vec::kernels();
  (A == Act::Gelu ? k.gelu : k.gelu_tanh)(x, n, y);
}

template <Act A>
void bias_act_rows(float* y, int64_t c0, int64_t c1, int64_t channels, int64_t plane, const float* bias) {
  // rows are (outer, channel) pairs flattened: row r has channel r % channels
  for (int64_t r = c0; r < c1; ++r) {
    float* p = y + r * plane;
    const float b = bias ? bias[r % channels] : 0.f;
    if constexpr (is_vec_act(A)) {
      if (bias)
        for (int64_t i = 0; i < plane; ++i) p[i] += b;
      vec_act(A, p, plane, p);
    } else {
      for (int64_t i = 0; i < plane; ++i) p[i] = apply<A>(p[i] + b);
    }
  }
}

template <Act A>
void act_range(const float* x, float* y, int64_t b, int64_t e) {
  if constexpr (is_vec_act(A)) {
    vec_act(A, x + b, e - b, y + b);
  } else {
    for (int64_t i = b; i < e; ++i) y[i] = apply<A>(x[i]);
  }
}

}  // namespace

void epilogue(float* y, int64_t outer, int64_t channels, int64_t plane, const float* bias, Act act) {
  if (!bias && act == Act::None) return;
  const int64_t rows = outer * channels;
  const int64_t grain = std::max<int64_t>(1, kElemGrain / std::max<int64_t>(plane, 1));
  parallel_for(0, rows, grain, [&](int64_t b, int64_t e) {
    switch (act) {
      case Act::None: bias_act_rows<Act::None>(y, b, e, channels, plane, bias); break;
      case Act::Relu: bias_act_rows<Act::Relu>(y, b, e, channels, plane, bias); break;
      case Act::Gelu: bias_act_rows<Act::Gelu>(y, b, e, channels, plane, bias); break;
      case Act::GeluTanh: bias_act_rows<Act::GeluTanh>(y, b, e, channels, plane, bias); break;
      case Act::Silu: bias_act_rows<Act::Silu>(y, b, e, channels, plane, bias); break;
      case Act::Sigmoid: bias_act_rows<Act::Sigmoid>(y, b, e, channels, plane, bias); break;
      case Act::Tanh: bias_act_rows<Act::Tanh>(y, b, e, channels, plane, bias); break;
    }
  });
}

void activation(const float* x, int64_t n, Act act, float* y) {
  parallel_for(0, n, kElemGrain, [&](int64_t b, int64_t e) {
    switch (act) {
      case Act::None: if (x != y) std::memcpy(y + b, x + b, (e - b) * sizeof(float)); break;
      case Act::Relu: act_range<Act::Relu>(x, y, b, e); break;
      case Act::Gelu: act_range<Act::Gelu>(x, y, b, e); break;
      case Act::GeluTanh: act_range<Act::GeluTanh>(x, y, b, e); break;
      case Act::Silu: act_range<Act::Silu>(x, y, b, e); break;
      case Act::Sigmoid: act_range<Act::Sigmoid>(x, y, b, e); break;
      case Act::Tanh: act_range<Act::Tanh>(x, y, b, e); break;
    }
  });
}

PackedLinear::PackedLinear(const float* weight, const float* bias, int64_t n, int64_t k) : N(n), K(k) {
  const int64_t P = packed::num_panels(N);
  wbuf = AlignedBuffer(static_cast<size_t>(std::max<int64_t>(P * K * packed::kPanel, 16)) * sizeof(float));
  w = static_cast<float*>(wbuf.data());
  packed::pack(weight, N, K, w);
  if (bias) {
    bbuf = AlignedBuffer(static_cast<size_t>(P * packed::kPanel) * sizeof(float));  // zeroed
    b = static_cast<float*>(bbuf.data());
    std::memcpy(b, bias, static_cast<size_t>(N) * sizeof(float));
  }
}
int64_t PackedLinear::bytes() const {
  return packed::num_panels(N) * packed::kPanel * (K + (b ? 1 : 0)) * static_cast<int64_t>(sizeof(float));
}

int packed_epilogue(Act act) {
  return act == Act::None ? packed::kEpiNone : act == Act::Relu ? packed::kEpiRelu
       : act == Act::Gelu ? packed::kEpiGelu : act == Act::GeluTanh ? packed::kEpiGeluTanh : -1;
}

bool linear_rows_ok(int64_t R, int64_t K, Act act, const PackedLinear* packed) {
  return packed && packed_epilogue(act) >= 0 && R <= runtime::packed_max_rows() && !linear_prefers_sgemm(R, K);
}

void linear_rows(const float* x, int64_t R, int64_t K, int64_t N, Act act, float* y, const PackedLinear& packed,
                 const float* res) {
  // One kernel call over every panel: N blocks of 8 panels share each x tile (packed_gemm.h)
  packed::panels_ex_kernel()(x, R, K, packed.w, packed.b, 0, packed::num_panels(N), N,
                             packed::Epilogue{packed_epilogue(act), res, N}, y);
}

namespace {
// Rows of the packed kernel's register tile at this SIMD level (packed_gemm_avx512.cc kMr: 12;
// AVX2: 6; the scalar reference runs row by row).
int64_t packed_tile_rows() {
  const SimdLevel lvl = simd_level();
  return lvl >= SimdLevel::AVX512 ? 12 : lvl >= SimdLevel::AVX2 ? 6 : 1;
}
}  // namespace

std::vector<int64_t> linear_row_splits(int64_t T, int nchunks) {
  std::vector<int64_t> b(static_cast<size_t>(nchunks) + 1, 0);
  b[nchunks] = T;
  const int64_t mr = packed_tile_rows();
  // A tile of 1-3 rows sums k in 2-4 interleaved sets (its FMA latency would bound one chain), a
  // tile of 4+ rows in one, as a whole tile does: a range may end in a tile of 0 or 4+ rows only, and
  // where the whole range ends in a 1-3 row tile (T % mr), the last range starts on a tile
  // boundary so that it ends in that same tile. Then every row is summed as on one thread.
  auto small = [&](int64_t rows) { const int64_t t = rows % mr; return t >= 1 && t <= 3; };
  const bool tail_small = small(T);
  bool ok = true;
  for (int c = 1; c < nchunks && ok; ++c) {
    const int64_t ideal = T * c / nchunks;
    ok = false;
    for (int64_t d = 0; d <= mr && !ok; ++d)
      for (int64_t r : {ideal - d, ideal + d}) {
        if (r <= b[c - 1] || r >= T || small(r - b[c - 1])) continue;
        if (c == nchunks - 1 && (tail_small ? r % mr != 0 : small(T - r))) continue;
        b[c] = r;
        ok = true;
        break;
      }
  }
  if (!ok)  // whole tiles: the one-thread tiling exactly
    for (int c = 1; c < nchunks; ++c) b[c] = std::min(T, (T / mr * c / nchunks) * mr);
  return b;
}

bool linear_prefers_sgemm(int64_t R, int64_t K) {
  // AIMASS_SGEMM_MIN_ROWS overrides the row threshold (A/B runs of packed vs sgemm).
  static const int64_t min_rows = [] {
    const char* e = std::getenv("AIMASS_SGEMM_MIN_ROWS");
    return e ? std::max<int64_t>(0, std::atoll(e)) : kSgemmMinRows;
  }();
  // Where the packed kernel runs row tiles outer on x in place (K = 768) it beat sgemm at 1024
  // rows too on one thread (BERT-base batch 8: q 32.6 vs 34.4 ms, f1 44.0 vs 47.3); at K = 3072
  // (x tile copied, K % 512 == 0) the two were level (48.0 vs 47.1-48.3 ms): sgemm stays. At 2
  // threads with rows split (packed::row_split), CPU time per call on a loaded VM: q+k+v 36.6 vs
  // sgemm 38.1 ms, o 12.3 vs 13.5, f1 48.3 vs 51.8; the whole encoder 1876 vs 1915 ms.
  // Since linear() pads x once per call where K % 512 == 0 (packed::pads_x), K = 3072 runs in
  // place too: 1024 x 768 x 3072 at 47.3 vs sgemm 48.1 ms (one core, loaded VM), its residual
  // in the register epilogue.
  const bool in_place = packed::linear_rows_outer(R, K) && (K % 512 != 0 || packed::pads_x(R, K));
  return R >= min_rows && K >= kSgemmMinK && !in_place;
}

void linear(const float* x, int64_t R, int64_t K, const float* w, int64_t N, const float* bias, Act act, float* y,
            const PackedLinear* packed, const float* res) {
  // Rows [b, e) after their GEMM: y = act(y + bias) + res.
  auto finish_rows = [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      float* p = y + r * N;
      if (is_vec_act(act)) {
        if (bias)
          for (int64_t j = 0; j < N; ++j) p[j] += bias[j];
        vec_act(act, p, N, p);
      } else {
        switch (act) {
          case Act::None:
            if (bias)
              for (int64_t j = 0; j < N; ++j) p[j] += bias[j];
            break;
#define AIMASS_LIN_CASE(A)                                                         \
  case A:                                                                          \
    if (bias) for (int64_t j = 0; j < N; ++j) p[j] = apply<A>(p[j] + bias[j]);     \
    else for (int64_t j = 0; j < N; ++j) p[j] = apply<A>(p[j]);                    \
    break;
          AIMASS_LIN_CASE(Act::Relu)
          AIMASS_LIN_CASE(Act::Gelu)
          AIMASS_LIN_CASE(Act::GeluTanh)
          AIMASS_LIN_CASE(Act::Silu)
          AIMASS_LIN_CASE(Act::Sigmoid)
          AIMASS_LIN_CASE(Act::Tanh)
#undef AIMASS_LIN_CASE
        }
      }
      if (res) {  // y = act(x W^T + b) + res, the packed epilogue's order
        const float* q = res + r * N;
        for (int64_t j = 0; j < N; ++j) p[j] += q[j];
      }
    }
  };
  const bool epilogue = bias || act != Act::None || res;
  if (packed && R <= runtime::packed_max_rows() && !linear_prefers_sgemm(R, K)) {
    // bias, ReLU / GELU and the residual run in the kernel's register epilogue
    const int epi = packed_epilogue(act);
    if (epi >= 0) {
      packed::linear(x, R, K, packed->w, packed->b, N, packed::Epilogue{epi, res, N}, y);
      return;
    }
    packed::linear(x, R, K, packed->w, packed->b, N, false, y);
    bias = nullptr;  // already added; the activation follows below
  } else if (R <= gemv::kGemvMaxRows) {
    gemv::linear_small_m(x, R, K, w, N, y);
  } else {
    // OpenBLAS runs on its caller's thread only: each pool thread takes a range of rows (>= 128:
    // every call packs the weights again) and finishes them while they are still in cache.
    parallel_for(0, R, 128, [&](int64_t b, int64_t e) {
      sgemm(false, true, e - b, N, K, 1.f, x + b * K, K, w, K, 0.f, y + b * N, N);
      if (epilogue) finish_rows(b, e);
    });
    return;
  }
  if (!epilogue) return;
  const int64_t grain = std::max<int64_t>(1, kElemGrain / std::max<int64_t>(N, 1));
  parallel_for(0, R, grain, finish_rows);
}

int64_t conv2d_col_floats(const Conv2dShape& s) {
  const int64_t P = s.OH * s.OW, Kc = s.C / s.G * s.KH * s.KW;
  return std::max(Kc * P, packed::num_panels(P) * Kc * packed::kPanel + 16);  // + 16: room to align to 64 bytes
}

namespace {

// im2col straight into the packed-GEMM layout (packed_gemm.h): col[panel][k][kPanel] holds,
// for the kPanel output pixels of the panel, tap k = (c, kh, kw); out-of-image taps and the
// pixels past the last one are 0. The small packed kernel then computes y[O, P] = w[O, Kc]
// x col on the engine's pool, reading the tiny weight from L1 and the columns once.
void im2col_packed(const float* xg, const Conv2dShape& s, int64_t Cg, float* col) {
  const int64_t P = s.OH * s.OW, Kc = Cg * s.KH * s.KW, NP = packed::num_panels(P);
  const int64_t grain = std::max<int64_t>(1, 8192 / (Kc * packed::kPanel));
  parallel_for(0, NP, grain, [&](int64_t b, int64_t e) {
    for (int64_t pp = b; pp < e; ++pp) {
      float* dst = col + pp * Kc * packed::kPanel;
      const int64_t p0 = pp * packed::kPanel, nc = std::min(packed::kPanel, P - p0);
      const int64_t oh0 = p0 / s.OW, ow0 = p0 % s.OW;
      for (int64_t k = 0; k < Kc; ++k) {
        const int64_t c = k / (s.KH * s.KW), kh = (k / s.KW) % s.KH, kw = k % s.KW;
        const float* src = xg + c * s.H * s.W;
        float* d = dst + k * packed::kPanel;
        // The panel's pixels in runs along output rows: each run reads one input row,
        // in bounds for ow in [lo, hi) (contiguous when the stride is 1), zeros around.
        int64_t oh = oh0, ow = ow0;
        for (int64_t j = 0; j < nc;) {
          const int64_t L = std::min(nc - j, s.OW - ow);
          const int64_t ih = oh * s.SH - s.PH + kh * s.DH, off = kw * s.DW - s.PW;  // iw = ow * SW + off
          float* dj = d + j;
          if (ih < 0 || ih >= s.H) {
            std::memset(dj, 0, static_cast<size_t>(L) * sizeof(float));
          } else {
            // t in [t0, t1): 0 <= (ow + t) * SW + off < W
            const int64_t first = ow * s.SW + off;
            int64_t t0 = first >= 0 ? 0 : (-first + s.SW - 1) / s.SW;
            int64_t t1 = first >= s.W ? 0 : (s.W - 1 - first) / s.SW + 1;
            t0 = std::min(t0, L);
            t1 = std::max(t0, std::min(t1, L));
            const float* srow = src + ih * s.W;
            for (int64_t t = 0; t < t0; ++t) dj[t] = 0.f;
            if (s.SW == 1) {
              std::memcpy(dj + t0, srow + first + t0, static_cast<size_t>(t1 - t0) * sizeof(float));
            } else {
              for (int64_t t = t0; t < t1; ++t) dj[t] = srow[first + t * s.SW];
            }
            for (int64_t t = t1; t < L; ++t) dj[t] = 0.f;
          }
          j += L;
          ow += L;
          if (ow == s.OW) {
            ow = 0;
            ++oh;
          }
        }
        for (int64_t j = nc; j < packed::kPanel; ++j) d[j] = 0.f;
      }
    }
  });
}

}  // namespace

void conv2d(const float* x, int64_t N, const Conv2dShape& s, const float* w, const float* bias, Act act, float* col,
            float* y) {
  const int64_t Cg = s.C / s.G, Og = s.O / s.G;
  const int64_t P = s.OH * s.OW, Kc = Cg * s.KH * s.KW;
  if (simd_level() >= SimdLevel::AVX2) {
    // Packed path (multi-threaded; measured on the cat/dog CNN at batch 32, 2 threads:
    // see bench/bench_runtime.py cnn_table). BLAS runs on one core here (blas.cc).
    // The packed kernels use aligned loads: panels start on 64 bytes.
    auto align64 = [](float* p) {
      return reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t{63});
    };
    auto one_sample = [&](int64_t n, float* cp) {
      const float* xn = x + n * s.C * s.H * s.W;
      float* yn = y + n * s.O * P;
      for (int64_t g = 0; g < s.G; ++g) {
        im2col_packed(xn + g * Cg * s.H * s.W, s, Cg, cp);
        packed::linear(w + g * Og * Kc, Og, Kc, cp, nullptr, P, false, yn + g * Og * P);
      }
    };
    if (N >= 2 && num_threads() > 1) {
      // Whole samples per thread, each with its own column buffer (reused across calls, so
      // no page faults per batch): no pool hand-off per layer step, and the calls inside
      // run inline. Per-sample splitting scaled 1.4x on 2 threads, this ~2x.
      const size_t need = static_cast<size_t>(conv2d_col_floats(s));
      const int nchunks = static_cast<int>(std::min<int64_t>(N, 4 * static_cast<int64_t>(num_threads())));
      parallel_chunks(nchunks, [&](int c, int nc) {
        thread_local std::vector<float> buf;
        if (buf.size() < need) buf.resize(need);
        float* cp = align64(buf.data());
        for (int64_t n = N * c / nc; n < N * (c + 1) / nc; ++n) one_sample(n, cp);
      });
    } else {
      for (int64_t n = 0; n < N; ++n) one_sample(n, align64(col));
    }
    epilogue(y, N, s.O, P, bias, act);
    return;
  }
  const bool direct = is_pointwise(s);
  for (int64_t n = 0; n < N; ++n) {
    const float* xn = x + n * s.C * s.H * s.W;
    float* yn = y + n * s.O * P;
    for (int64_t g = 0; g < s.G; ++g) {
      const float* xg = xn + g * Cg * s.H * s.W;
      const float* B = xg;
      if (!direct) {
        // im2col: row (c, kh, kw), column (oh, ow); out-of-image taps are 0.
        parallel_for(0, Kc, std::max<int64_t>(1, 4096 / std::max<int64_t>(P, 1)), [&](int64_t b, int64_t e) {
          for (int64_t r = b; r < e; ++r) {
            const int64_t c = r / (s.KH * s.KW), kh = (r / s.KW) % s.KH, kw = r % s.KW;
            float* dst = col + r * P;
            const float* src = xg + c * s.H * s.W;
            for (int64_t oh = 0; oh < s.OH; ++oh) {
              const int64_t ih = oh * s.SH - s.PH + kh * s.DH;
              float* d = dst + oh * s.OW;
              if (ih < 0 || ih >= s.H) {
                std::memset(d, 0, s.OW * sizeof(float));
                continue;
              }
              const float* srow = src + ih * s.W;
              for (int64_t ow = 0; ow < s.OW; ++ow) {
                const int64_t iw = ow * s.SW - s.PW + kw * s.DW;
                d[ow] = (iw >= 0 && iw < s.W) ? srow[iw] : 0.f;
              }
            }
          }
        });
        B = col;
      }
      sgemm(false, false, Og, P, Kc, 1.f, w + g * Og * Kc, Kc, B, P, 0.f, yn + g * Og * P, P);
    }
  }
  epilogue(y, N, s.O, P, bias, act);
}

namespace {

// Large pooling windows. The direct loops cost OH*OW*KH*KW, which a model file can make huge with a
// few bytes of attributes (a 2x1026 window sliding by 3 over a 131076-wide row took 34 s under the
// fuzzer). Past kDirectPoolTaps taps both pools run as two 1-D passes (each row's window columns, then
// the window's rows), each pass with van Herk / Gil-Werman blocks: O(image + output) whatever the
// window. Small windows keep the direct loops (and their exact summation order).
constexpr int64_t kDirectPoolTaps = 16;

// KH*KW past kDirectPoolTaps, without forming a product of two attacker-sized factors
inline bool large_pool_window(const Pool2dShape& s) {
  return s.KH > kDirectPoolTaps || s.KW > kDirectPoolTaps || s.KH * s.KW > kDirectPoolTaps;
}

// first valid tap and one past the last for a window starting at i0 with k taps of stride d in [0, n)
inline void pool_taps(int64_t i0, int64_t k, int64_t d, int64_t n, int64_t* t0, int64_t* t1) {
  *t0 = i0 < 0 ? (-i0 + d - 1) / d : 0;
  *t1 = i0 >= n ? 0 : std::min(k, (n - 1 - i0) / d + 1);
}

// A max that keeps a NaN (either side NaN gives NaN, as the direct loop does): v replaces m
// when larger or NaN, and a NaN m is never replaced by a number (both compares are false);
// branch-free, so the loops that use it vectorize.
inline float max_keep_nan(float m, float v) { return ((v > m) | (v != v)) ? v : m; }

// One window of a 1-D pass: taps first, first + d, ..., last (original indices); first < 0: no tap.
struct Window {
  int64_t first, last;
};

// Windows over v[0..n) whose taps have stride d, at most K of them, each window either exactly K taps
// or reaching the first or last tap of its residue class mod d (pool windows clipped by the image are).
// Each residue class is cut into blocks of K taps with a prefix and a suffix reduction per block, so
// a window is the suffix of one block plus the prefix of the next: exact membership (a NaN or inf
// reaches only the windows holding it), no subtraction (no cancellation), two reads a window.
template <class Op>
void window_reduce(const float* v, int64_t n, int64_t d, int64_t K, const std::vector<Window>& win, float empty,
                   Op op, float* pre, float* suf, float* out, int64_t out_stride) {
  for (int64_t r = 0; r < std::min(d, n); ++r) {
    const int64_t cnt = (n - r + d - 1) / d;
    for (int64_t t0 = 0; t0 < cnt; t0 += K) {  // block [t0, t1) of this residue class
      const int64_t t1 = std::min(t0 + K, cnt), i0 = r + t0 * d, i1 = r + (t1 - 1) * d;
      pre[i0] = v[i0];
      for (int64_t i = i0 + d; i <= i1; i += d) pre[i] = op(pre[i - d], v[i]);
      suf[i1] = v[i1];
      for (int64_t i = i1 - d; i >= i0; i -= d) suf[i] = op(v[i], suf[i + d]);
    }
  }
  for (size_t j = 0; j < win.size(); ++j) {
    const Window w = win[j];
    float res = empty;
    if (w.first >= 0) {
      const int64_t r = w.first % d, tf = (w.first - r) / d, tl = (w.last - r) / d;
      if (tf / K != tl / K) {
        res = op(suf[w.first], pre[w.last]);
      } else if (tf % K == 0) {
        res = pre[w.last];
      } else if (tl % K == K - 1 || w.last + d >= n) {
        res = suf[w.first];
      } else {  // not a pool window shape (kept for safety): reduce directly
        res = v[w.first];
        for (int64_t i = w.first + d; i <= w.last; i += d) res = op(res, v[i]);
      }
    }
    out[static_cast<int64_t>(j) * out_stride] = res;
  }
}

// the windows of output positions 0..o along an axis of n taps
std::vector<Window> pool_windows(int64_t o, int64_t n, int64_t k, int64_t stride, int64_t pad, int64_t dil) {
  std::vector<Window> w(static_cast<size_t>(o));
  for (int64_t i = 0; i < o; ++i) {
    const int64_t i0 = i * stride - pad;
    int64_t t0, t1;
    pool_taps(i0, k, dil, n, &t0, &t1);
    w[i] = t1 > t0 ? Window{i0 + t0 * dil, i0 + (t1 - 1) * dil} : Window{-1, -1};
  }
  return w;
}

// Both large-window pools: rows pass into tmp[H][OW], then a column pass into y; `finish` turns a
// column result into the output (the average's division).
template <class Op, class Finish>
void pool2d_two_pass(const float* x, int64_t N, const Pool2dShape& s, int64_t dh, int64_t dw, float empty, Op op,
                     Finish finish, float* y) {
  const std::vector<Window> wcols = pool_windows(s.OW, s.W, s.KW, s.SW, s.PW, dw);
  const std::vector<Window> wrows = pool_windows(s.OH, s.H, s.KH, s.SH, s.PH, dh);
  parallel_for(0, N * s.C, 1, [&](int64_t b, int64_t e) {
    std::vector<float> tmp(static_cast<size_t>(s.H * s.OW));
    std::vector<float> pre(static_cast<size_t>(std::max(s.H, s.W))), suf(pre.size()), col(static_cast<size_t>(s.H)),
        red(static_cast<size_t>(s.OH));
    for (int64_t pc = b; pc < e; ++pc) {
      const float* src = x + pc * s.H * s.W;
      float* dst = y + pc * s.OH * s.OW;
      for (int64_t ih = 0; ih < s.H; ++ih)
        window_reduce(src + ih * s.W, s.W, dw, s.KW, wcols, empty, op, pre.data(), suf.data(), tmp.data() + ih * s.OW, 1);
      for (int64_t ow = 0; ow < s.OW; ++ow) {
        for (int64_t ih = 0; ih < s.H; ++ih) col[ih] = tmp[ih * s.OW + ow];
        window_reduce(col.data(), s.H, dh, s.KH, wrows, empty, op, pre.data(), suf.data(), red.data(), 1);
        for (int64_t oh = 0; oh < s.OH; ++oh) dst[oh * s.OW + ow] = finish(red[oh], oh, ow);
      }
    }
  });
}

void max_pool2d_two_pass(const float* x, int64_t N, const Pool2dShape& s, float* y) {
  pool2d_two_pass(x, N, s, s.DH, s.DW, -std::numeric_limits<float>::infinity(), max_keep_nan,
                  [](float v, int64_t, int64_t) { return v; }, y);
}

void avg_pool2d_two_pass(const float* x, int64_t N, const Pool2dShape& s, float* y) {
  // torch semantics: the window clipped to the padded image counts padding when count_include_pad,
  // else only in-image taps (as the direct loop)
  auto count = [&](int64_t o, int64_t st, int64_t p, int64_t k, int64_t n, bool with_pad) {
    const int64_t a = o * st - p, b = std::min(a + k, n + p);
    return with_pad ? static_cast<float>(b - a)
                    : static_cast<float>(std::max<int64_t>(std::min(b, n) - std::max<int64_t>(a, 0), 0));
  };
  pool2d_two_pass(
      x, N, s, 1, 1, 0.f, [](float a, float b) { return a + b; },
      [&](float v, int64_t oh, int64_t ow) {
        const float cnt = count(oh, s.SH, s.PH, s.KH, s.H, s.count_include_pad) *
                          count(ow, s.SW, s.PW, s.KW, s.W, s.count_include_pad);
        return v / (cnt > 0.f ? cnt : 1.f);
      },
      y);
}

// Undilated small windows (ResNet's 3x3/2 pad 1): per output row, the max over the window's
// in-image input rows (contiguous, vectorized over W) into a row padded with -inf on both
// sides, then the max over each window's KW columns of that row (no bounds checks). Both passes
// of a 3x3/2 window are the SIMD row kernels of ops_pool.h (this file is built for the baseline
// ISA: the stem pool of ResNet-50 at batch 1 ran 0.2 ms behind onnxruntime's).
void max_pool2d_rows(const float* x, int64_t N, const Pool2dShape& s, float* y) {
  const float ninf = -std::numeric_limits<float>::infinity();
  // right padding: the last window may reach past W + PW in ceil mode
  const int64_t padr = std::max<int64_t>(0, (s.OW - 1) * s.SW + s.KW - s.PW - s.W);
  const int64_t tw = s.PW + s.W + padr;
  const pool::RowFns fns = pool::row_fns(simd_level());
  const bool k3s2 = s.KW == 3 && s.SW == 2;
  parallel_for(0, N * s.C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(s.OH * (s.W + s.OW) * s.KH, 1)),
               [&](int64_t b, int64_t e) {
                 std::vector<float> tmp(static_cast<size_t>(tw + pool::kRowSlack), ninf);
                 float* row = tmp.data() + s.PW;  // row[iw] for iw in [-PW, W + padr)
                 for (int64_t pc = b; pc < e; ++pc) {
                   const float* src = x + pc * s.H * s.W;
                   float* dst = y + pc * s.OH * s.OW;
                   for (int64_t oh = 0; oh < s.OH; ++oh) {
                     const int64_t ih0 = oh * s.SH - s.PH;
                     int64_t kh0, kh1;
                     pool_taps(ih0, s.KH, 1, s.H, &kh0, &kh1);
                     if (kh1 <= kh0)
                       for (int64_t iw = 0; iw < s.W; ++iw) row[iw] = ninf;
                     else
                       fns.vmax(src + (ih0 + kh0) * s.W, s.W, kh1 - kh0, s.W, row);
                     float* d = dst + oh * s.OW;
                     const float* t = tmp.data();  // window ow covers t[ow * SW + kw], kw < KW
                     if (k3s2) {
                       fns.hmax3s2(t, s.OW, d);
                     } else {
                       for (int64_t ow = 0; ow < s.OW; ++ow) {
                         float m = t[ow * s.SW];
                         for (int64_t kw = 1; kw < s.KW; ++kw) m = max_keep_nan(m, t[ow * s.SW + kw]);
                         d[ow] = m;
                       }
                     }
                   }
                 }
               });
}

}  // namespace

namespace pool {
void vmax_scalar(const float* rows, int64_t ld, int64_t nrows, int64_t W, float* t) {
  for (int64_t i = 0; i < W; ++i) t[i] = rows[i];
  for (int64_t r = 1; r < nrows; ++r)
    for (int64_t i = 0; i < W; ++i) t[i] = max_keep_nan(t[i], rows[r * ld + i]);
}
void hmax3s2_scalar(const float* t, int64_t OW, float* d) {
  for (int64_t ow = 0; ow < OW; ++ow) d[ow] = max_keep_nan(max_keep_nan(t[2 * ow], t[2 * ow + 1]), t[2 * ow + 2]);
}
}  // namespace pool

void max_pool2d(const float* x, int64_t N, const Pool2dShape& s, float* y) {
  if (s.KH == 2 && s.KW == 2 && s.SH == 2 && s.SW == 2 && s.PH == 0 && s.PW == 0 && s.DH == 1 && s.DW == 1) {
    // The common 2x2/2 pool without padding: every window is inside the image, so a
    // branch-free loop the compiler vectorizes (NaN propagates as in the general path).
    parallel_for(0, N * s.C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(s.OH * s.OW * 4, 1)),
                 [&](int64_t b, int64_t e) {
                   for (int64_t pc = b; pc < e; ++pc) {
                     const float* src = x + pc * s.H * s.W;
                     float* dst = y + pc * s.OH * s.OW;
                     for (int64_t oh = 0; oh < s.OH; ++oh) {
                       const float* r0 = src + 2 * oh * s.W;
                       const float* r1 = r0 + s.W;
                       float* d = dst + oh * s.OW;
                       for (int64_t ow = 0; ow < s.OW; ++ow) {
                         const float a = r0[2 * ow], bb = r0[2 * ow + 1], c = r1[2 * ow], dd = r1[2 * ow + 1];
                         // a max that keeps a NaN: x replaces m when larger or NaN, and a NaN m
                         // is never replaced (both compares are false)
                         float m = a;
                         m = ((bb > m) | (bb != bb)) ? bb : m;
                         m = ((c > m) | (c != c)) ? c : m;
                         m = ((dd > m) | (dd != dd)) ? dd : m;
                         d[ow] = m;
                       }
                     }
                   }
                 });
    return;
  }
  if (large_pool_window(s)) {
    max_pool2d_two_pass(x, N, s, y);
    return;
  }
  if (s.DH == 1 && s.DW == 1) {
    max_pool2d_rows(x, N, s, y);
    return;
  }
  parallel_for(0, N * s.C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(s.OH * s.OW * s.KH * s.KW, 1)),
               [&](int64_t b, int64_t e) {
                 for (int64_t pc = b; pc < e; ++pc) {
                   const float* src = x + pc * s.H * s.W;
                   float* dst = y + pc * s.OH * s.OW;
                   for (int64_t oh = 0; oh < s.OH; ++oh)
                     for (int64_t ow = 0; ow < s.OW; ++ow) {
                       float m = -std::numeric_limits<float>::infinity();
                       bool nan = false;
                       // only the taps inside the image (a huge padded window costs no idle loop)
                       const int64_t ih0 = oh * s.SH - s.PH, iw0 = ow * s.SW - s.PW;
                       int64_t kh0, kh1, kw0, kw1;
                       pool_taps(ih0, s.KH, s.DH, s.H, &kh0, &kh1);
                       pool_taps(iw0, s.KW, s.DW, s.W, &kw0, &kw1);
                       for (int64_t kh = kh0; kh < kh1; ++kh) {
                         const int64_t ih = ih0 + kh * s.DH;
                         for (int64_t kw = kw0; kw < kw1; ++kw) {
                           const int64_t iw = iw0 + kw * s.DW;
                           const float v = src[ih * s.W + iw];
                           if (std::isnan(v)) nan = true;
                           m = v > m ? v : m;
                         }
                       }
                       dst[oh * s.OW + ow] = nan ? std::numeric_limits<float>::quiet_NaN() : m;
                     }
                 }
               });
}


void avg_pool2d(const float* x, int64_t N, const Pool2dShape& s, float* y) {
  if (large_pool_window(s)) {
    avg_pool2d_two_pass(x, N, s, y);
    return;
  }
  parallel_for(0, N * s.C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(s.OH * s.OW * s.KH * s.KW, 1)),
               [&](int64_t b, int64_t e) {
                 for (int64_t pc = b; pc < e; ++pc) {
                   const float* src = x + pc * s.H * s.W;
                   float* dst = y + pc * s.OH * s.OW;
                   for (int64_t oh = 0; oh < s.OH; ++oh)
                     for (int64_t ow = 0; ow < s.OW; ++ow) {
                       // torch semantics: the window clipped to the padded image counts
                       // padding when count_include_pad, else only in-image taps.
                       const int64_t h0 = oh * s.SH - s.PH, w0 = ow * s.SW - s.PW;
                       const int64_t h1 = std::min(h0 + s.KH, s.H + s.PH), w1 = std::min(w0 + s.KW, s.W + s.PW);
                       // counts as float products: a huge padded window cannot overflow int64
                       const float padded = static_cast<float>(h1 - h0) * static_cast<float>(w1 - w0);
                       const int64_t hs = std::max<int64_t>(h0, 0), ws = std::max<int64_t>(w0, 0);
                       const int64_t he = std::min(h1, s.H), we = std::min(w1, s.W);
                       float acc = 0.f;
                       for (int64_t ih = hs; ih < he; ++ih)
                         for (int64_t iw = ws; iw < we; ++iw) acc += src[ih * s.W + iw];
                       const float cnt = s.count_include_pad ? padded
                                                             : static_cast<float>(std::max<int64_t>(he - hs, 0)) *
                                                                   static_cast<float>(std::max<int64_t>(we - ws, 0));
                       dst[oh * s.OW + ow] = acc / (cnt > 0.f ? cnt : 1.f);
                     }
                 }
               });
}

namespace {
// sum of n contiguous floats in 8 interleaved partial sums (lane l adds elements l, l + 8, ...), then
// the tail and the lanes in order: one add chain of n/8 instead of n (the global pool of ResNet-50's
// 2048 x 7 x 7 ran latency-bound, 0.07 ms at batch 1 and 0.5 ms at batch 8 against onnxruntime's 0.01
// and 0.08), and the compiler keeps the 8 lanes in vector registers of the baseline ISA.
inline float sum_contig(const float* v, int64_t n) {
  float a[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) a[l] += v[i + l];
  for (int l = 0; i < n; ++i, ++l) a[l] += v[i];
  return ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
}
}  // namespace

void adaptive_avg_pool2d(const float* x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t OH, int64_t OW,
                         float* y) {
  if (OH == 1 && OW == 1) {  // global pool: the plane is one contiguous run
    parallel_for(0, N * C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(H * W, 1)), [&](int64_t b, int64_t e) {
      for (int64_t pc = b; pc < e; ++pc) y[pc] = sum_contig(x + pc * H * W, H * W) / static_cast<float>(H * W);
    });
    return;
  }
  parallel_for(0, N * C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(H * W, 1)), [&](int64_t b, int64_t e) {
    for (int64_t pc = b; pc < e; ++pc) {
      const float* src = x + pc * H * W;
      float* dst = y + pc * OH * OW;
      for (int64_t oh = 0; oh < OH; ++oh) {
        const int64_t hs = (oh * H) / OH, he = ((oh + 1) * H + OH - 1) / OH;
        for (int64_t ow = 0; ow < OW; ++ow) {
          const int64_t ws = (ow * W) / OW, we = ((ow + 1) * W + OW - 1) / OW;
          float acc = 0.f;
          for (int64_t ih = hs; ih < he; ++ih) acc += sum_contig(src + ih * W + ws, we - ws);
          dst[oh * OW + ow] = acc / static_cast<float>((he - hs) * (we - ws));
        }
      }
    }
  });
}

void softmax(const float* x, int64_t outer, int64_t axis, int64_t inner, bool log, float* y) {
  const vec::Kernels& k = vec::kernels();
  parallel_for(0, outer * inner, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(axis, 1)),
               [&](int64_t b, int64_t e) {
                 std::vector<float> col;  // strided axis (inner > 1): gathered into a row
                 if (inner > 1) col.resize(static_cast<size_t>(axis));
                 for (int64_t t = b; t < e; ++t) {
                   const int64_t o = t / inner, i = t % inner;
                   const float* src = x + o * axis * inner + i;
                   float* dst = y + o * axis * inner + i;
                   if (inner == 1) {
                     k.softmax_row(src, axis, log, dst);
                     continue;
                   }
                   for (int64_t a = 0; a < axis; ++a) col[a] = src[a * inner];
                   k.softmax_row(col.data(), axis, log, col.data());
                   for (int64_t a = 0; a < axis; ++a) dst[a * inner] = col[a];
                 }
               });
}

void layer_norm(const float* x, int64_t R, int64_t D, const float* w, const float* b, double eps, float* y) {
  const vec::Kernels& k = vec::kernels();
  parallel_for(0, R, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(D, 1)), [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) k.layer_norm_row(x + r * D, D, w, b, eps, y + r * D);
  });
}

void embedding(const int64_t* idx, int64_t n, const float* table, int64_t V, int64_t D, float* y,
               const char* where) {
  for (int64_t i = 0; i < n; ++i)
    AIMASS_CHECK(idx[i] >= 0 && idx[i] < V, ValueError, where, ": index ", idx[i], " at flat position ", i,
                 " is outside the valid range [0, ", V - 1, "] (num_embeddings=", V, ")");
  parallel_for(0, n, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(D, 1)), [&](int64_t b, int64_t e) {
    for (int64_t i = b; i < e; ++i) std::memcpy(y + i * D, table + idx[i] * D, D * sizeof(float));
  });
}

void channel_affine(const float* x, int64_t outer, int64_t C, int64_t plane, const float* scale,
                    const float* shift, float* y) {
  parallel_for(0, outer * C, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(plane, 1)), [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) {
      const float sc = scale[r % C], sh = shift[r % C];
      const float* s = x + r * plane;
      float* d = y + r * plane;
      for (int64_t i = 0; i < plane; ++i) d[i] = s[i] * sc + sh;
    }
  });
}

namespace {
template <BinOp OP>
inline float binop(float a, float b) {
  if constexpr (OP == BinOp::Add) return a + b;
  if constexpr (OP == BinOp::Sub) return a - b;
  if constexpr (OP == BinOp::Mul) return a * b;
  return a / b;
}

template <BinOp OP>
void binary_impl(const float* a, const std::vector<int64_t>& as, const float* b, const std::vector<int64_t>& bs,
                 const std::vector<int64_t>& shape, float* y) {
  const int r = static_cast<int>(shape.size());
  const int64_t last = shape[r - 1];
  int64_t outer = 1;
  for (int i = 0; i < r - 1; ++i) outer *= shape[i];
  const int64_t sa = as[r - 1], sb = bs[r - 1];
  parallel_for(0, outer, std::max<int64_t>(1, kElemGrain / std::max<int64_t>(last, 1)), [&](int64_t ob, int64_t oe) {
    for (int64_t o = ob; o < oe; ++o) {
      int64_t rem = o, oa = 0, obb = 0;
      for (int i = r - 2; i >= 0; --i) {
        const int64_t idx = rem % shape[i];
        rem /= shape[i];
        oa += idx * as[i];
        obb += idx * bs[i];
      }
      const float* pa = a + oa;
      const float* pb = b + obb;
      float* py = y + o * last;
      if (sa == 1 && sb == 1) {
        for (int64_t j = 0; j < last; ++j) py[j] = binop<OP>(pa[j], pb[j]);
      } else if (sa == 1 && sb == 0) {
        const float bv = *pb;
        for (int64_t j = 0; j < last; ++j) py[j] = binop<OP>(pa[j], bv);
      } else {
        for (int64_t j = 0; j < last; ++j) py[j] = binop<OP>(pa[j * sa], pb[j * sb]);
      }
    }
  });
}
}  // namespace

void binary(BinOp op, const float* a, const std::vector<int64_t>& as, const float* b, const std::vector<int64_t>& bs,
            const std::vector<int64_t>& shape, float* y) {
  switch (op) {
    case BinOp::Add: binary_impl<BinOp::Add>(a, as, b, bs, shape, y); break;
    case BinOp::Sub: binary_impl<BinOp::Sub>(a, as, b, bs, shape, y); break;
    case BinOp::Mul: binary_impl<BinOp::Mul>(a, as, b, bs, shape, y); break;
    case BinOp::Div: binary_impl<BinOp::Div>(a, as, b, bs, shape, y); break;
  }
}

}  // namespace aimass::runtime::ops

namespace aimass::runtime {

namespace {
constexpr int64_t kPackedMaxRowsDefault = 4096;
std::atomic<int64_t> g_packed_max_rows{-1};  // -1: not read from the environment yet
}

int64_t packed_max_rows() {
  int64_t v = g_packed_max_rows.load(std::memory_order_relaxed);
  if (v >= 0) return v;
  v = kPackedMaxRowsDefault;
  if (const char* e = std::getenv("AIMASS_PACKED_MAX_ROWS")) v = std::max<int64_t>(0, std::atoll(e));
  int64_t expected = -1;
  g_packed_max_rows.compare_exchange_strong(expected, v);
  return g_packed_max_rows.load();
}

int64_t set_packed_max_rows(int64_t rows) {
  AIMASS_CHECK(rows >= 0, ValueError, "packed_max_rows=", rows, " must be >= 0 (0 turns the packed kernel off)");
  const int64_t prev = packed_max_rows();
  g_packed_max_rows.store(rows);
  return prev;
}

}  // namespace aimass::runtime
