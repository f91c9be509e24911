// Fused quantized linear: packing, validation, kernel choice and the drivers
// that split work over the engine's thread pool. The kernels are in
// kernels_scalar.cc / kernels_avx2.cc / kernels_avx512.cc.
#include "aimass/qlinear.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "aimass/blas.h"
#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "qlinear/kernels.h"

namespace aimass::quant {

using detail::KernelTable;
using detail::WeightView;

// Shape thresholds for LinearKernel::Auto. Measured (bench/bench_qlinear.py crossover
// sweep) at N = K = 4096, 1 thread, on an AMD EPYC with AVX-512 VNNI under heavy load from
// other jobs (load 7-9 on 2 cores, so +-50% noise; docs/qlinear.md has the table); ms:
//   M              1     2     4     8     16
//   fp32         8.25  11.9  23.8  28.5  32.4   (torch / OpenBLAS sgemm)
//   i8 wo int16  0.87  1.05  1.70  6.71  9.42   i8 wo fp32 1.77 1.76 2.67 7.50 9.87
//   i8 dyn       0.73  0.54  0.90  1.34  1.80
//   i4 wo        1.14  1.44  3.84  8.19  11.0   i4 dyn 1.06 0.99 5.67 4.77 7.42
//  * weight-only has no (fp32) or a tiny (int16, max|x_row|/65534) activation error; it is
//    ~10x faster than fp32 below these thresholds, and the dynamic int8 GEMM overtakes it
//    from M ~ 2-4. int8 keeps weight-only up to M = 7 for accuracy.
//  * int4 weight-only approaches fp32 speed by M ~ 32, so it is never used there.
//  * dequantize + sgemm never wins while a SIMD kernel exists (it pays a full dequant).
//  * at the scalar level weight-only loses to dequantize + sgemm from M ~ 4.
//  * int4 weights on the int16 panels (groups of 128k or per-channel, int16 activations):
//    since the panel kernel (2026-12-05) weight-only is faster than dynamic_int8 up to M = 7
//    but at one point (interleaved, loaded machine, medians, 1 thread, us; M = 1, 2, 4, 6, 7):
//      2048 x 2048  wo 43 122 199 490 466   dyn 72 138 246 500 471
//      4096 x 4096  wo 248 541 1088 2005 1825  dyn 413 730 1324 1759 2939
//    and its activation error is ~258x smaller, so they keep weight-only up to M = 7 as int8
//    does. With fp32 activations (or groups that are not whole 128-blocks) the int4
//    weight-only kernel is ~3x slower and the old threshold stays.
constexpr int64_t kDynamicMinMInt8 = 8;
constexpr int64_t kDynamicMinMInt4 = 4;
constexpr int64_t kDynamicMinMInt4A16 = 8;
constexpr int64_t kScalarSgemmMinM = 4;
// Below this many rows the dynamic path reads int4 weights packed (see run_dynamic).
constexpr int64_t kInt4PackedDynamicMaxM = 8;
// fp32 elements of W dequantized at once by the sgemm fallback (16 MiB of scratch);
// large panels keep the BLAS efficient.
constexpr int64_t kSgemmScratch = int64_t{1} << 22;
// The dynamic kernels accumulate int32 over a whole row when per-channel; this bound
// keeps 4 * 255 * 127 * Kp / 64 below 2^31.
constexpr int64_t kDynamicMaxKp = int64_t{1} << 20;

struct PackedLinearImpl {
  WeightView view{};
  mutable std::vector<int8_t> w8;  // empty while only the VNNI blocks are kept (see rows())
  // int4 in 128-element nibble blocks (kernels.h); empty while only the panels w4p are kept
  // (rebuilt from them on first use of a kernel that reads blocks, see rows())
  mutable std::vector<uint8_t> w4;
  std::vector<float> scale;
  std::vector<int32_t> wsum;  // bits 8: row sums of the int8 weights (int16-activation path)
  // Built on first use of the dynamic path (int4 weights unpacked to int8, column sums).
  mutable std::once_flag dyn_once;
  mutable std::vector<int8_t> wq4;
  mutable std::vector<int32_t> colsum;
  mutable std::vector<float> corr;
  mutable AlignedBuffer wvnni;  // 64-byte (or huge-page) aligned VNNI blocks
  AlignedBuffer w4p;            // int4 column panels (kernels.h), see build_int4_panels
  mutable std::once_flag rows_once;
  mutable WeightView dyn_view{};

  WeightView dynamic_view() const {
    std::call_once(dyn_once, [this] {
      const int64_t N = view.N, Kp = view.Kp, G = view.G, ng = view.ng;
      const int8_t* wq = view.w8;  // null for int8 per-channel weights kept only as VNNI blocks
      if (view.bits == 4) {
        const uint8_t* w4b = rows().w4;  // the blocks, rebuilt if only the panels are kept
        wq4.assign(static_cast<size_t>(N * Kp), 0);
        for (int64_t n = 0; n < N; ++n) {
          const uint8_t* row = w4b + n * (Kp / 2);
          for (int64_t k = 0; k < view.K; ++k) {
            wq4[n * Kp + k] = static_cast<int8_t>(detail::int4_get(row, k));
          }
        }
        wq = wq4.data();
      }
      colsum.assign(static_cast<size_t>(N * ng), 0);
      corr.assign(static_cast<size_t>(N), 0.f);
      for (int64_t n = 0; n < N; ++n) {
        float c = 0.f;
        for (int64_t g = 0; g < ng; ++g) {
          int32_t s = 0;
          if (wq) {
            for (int64_t k = g * G; k < (g + 1) * G; ++k) s += wq[n * Kp + k];
          } else {
            s = wsum[n];  // per-channel int8: the one group is the whole row
          }
          colsum[n * ng + g] = s;
          c += 128.f * static_cast<float>(s) * scale[n * ng + g];
        }
        corr[n] = c;
      }
      dyn_view = view;
      dyn_view.wq = wq;
      dyn_view.colsum = colsum.data();
      dyn_view.corr = corr.data();
      // int4 per-channel: VNNI blocks of the unpacked weights (int8 has them from packing).
      if (view.bits == 4 && view.per_channel && cpu_has_vnni_blocks())
        dyn_view.wvnni = build_vnni_blocks(wq, Kp);
    });
    return dyn_view;
  }

  // The CPU can run the VNNI block kernels (built whenever it can, even if the level is
  // capped now: it may be raised later with set_simd_level).
  static bool cpu_has_vnni_blocks() {
    const CpuFeatures& f = cpu_features();
    return f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.avx512vnni &&
           detail::avx512_kernels().dynamic_panels != nullptr;
  }

  // The view with int8 rows w8 [N, Kp] (and wq) set. int8 per-channel weights on a VNNI CPU
  // are kept only as VNNI blocks (the kernels picked at that level read nothing else); the
  // rows are rebuilt from the blocks, once, when a kernel that reads rows runs (the
  // fp32-activation variant, a capped SIMD level, dequant_sgemm).
  WeightView rows() const {
    if (view.bits == 4) return int4_blocks();
    if (view.w8) return view;
    std::call_once(rows_once, [this] {
      const int64_t N = view.N, K = view.K, Kp = view.Kp;
      w8.assign(static_cast<size_t>(N * Kp), 0);
      const int8_t* base = view.wvnni;
      for (int64_t n = 0; n < N; ++n) {
        const int8_t* col = base + (n / 64) * 64 * Kp + (n % 64) * 4;
        int8_t* dst = w8.data() + n * Kp;
        for (int64_t k = 0; k < K; k += 4)
          std::memcpy(dst + k, col + k * 64, static_cast<size_t>(std::min<int64_t>(4, K - k)));
      }
    });
    WeightView v = view;
    v.w8 = v.wq = w8.data();
    return v;
  }

  // w4p from the block-ordered nibbles w4 and the scales, where the AVX2 / AVX-512
  // int16-activation kernels can read it (kernels.h: int4_panel_*). Built at pack time
  // (not on first use) so a first call costs what the others do.
  void build_int4_panels() {
    const int64_t N = view.N, Kp = view.Kp, nb = (N + 63) / 64;
    const int64_t bb = detail::int4_panel_block_bytes(Kp);
    w4p = AlignedBuffer(static_cast<size_t>(nb * bb));
    uint8_t* base = static_cast<uint8_t*>(w4p.data());
    std::memset(base, 0x88, w4p.size());  // nibbles u = 8 (w = 0); scales overwritten below
    for (int64_t b = 0; b < nb; ++b) {
      uint8_t* blk = base + b * bb;
      for (int64_t c = 0; c < Kp / 128; ++c) {
        float* sc = reinterpret_cast<float*>(blk + c * detail::kInt4PanelChunkBytes + 16 * detail::kInt4PanelStepBytes);
        const int64_t g = view.per_channel ? 0 : c * 128 / view.G;
        for (int64_t j = 0; j < 64; ++j) {
          const int64_t n = b * 64 + j;
          sc[j] = n < N ? scale[n * view.ng + g] : 0.f;
        }
      }
      // 8 k at a time: in the blocks they are one nibble of 8 bytes 4 apart (k % 8 == 0
      // keeps them in one 16-element run); the rows' padding past K holds nibble 8 already.
      for (int64_t j = 0; j < 64 && b * 64 + j < N; ++j) {
        const uint8_t* row = w4.data() + (b * 64 + j) * (Kp / 2);
        for (int64_t k = 0; k < Kp; k += 8) {
          const uint8_t* src = row + detail::int4_byte(k);
          const int sh = detail::int4_shift(k);
          uint32_t d = 0;
          for (int t = 0; t < 4; ++t) {
            const uint32_t lo = (src[4 * t] >> sh) & 15u, hi = (src[4 * (t + 4)] >> sh) & 15u;
            d |= (lo | hi << 4) << (8 * t);
          }
          std::memcpy(blk + detail::int4_panel_byte(j, k), &d, 4);
        }
      }
    }
    view.w4p = base;
  }

  // The view with the int4 blocks w4 set: where the CPU has AVX2 the weights are kept
  // only as panels w4p (the int16-activation kernels read nothing else) and the blocks are
  // rebuilt from them, once, when a kernel that reads blocks runs (fp32 activations,
  // dynamic_int8, dequant_sgemm, the scalar level).
  WeightView int4_blocks() const {
    if (view.w4) return view;
    std::call_once(rows_once, [this] {
      const int64_t N = view.N, K = view.K, Kp = view.Kp, bb = detail::int4_panel_block_bytes(Kp);
      w4.assign(static_cast<size_t>(N * Kp / 2), 0x88);  // padding decodes to 0
      for (int64_t n = 0; n < N; ++n) {
        const uint8_t* blk = view.w4p + (n / 64) * bb;
        uint8_t* row = w4.data() + n * (Kp / 2);
        for (int64_t k = 0; k < K; ++k) {
          const int u = (blk[detail::int4_panel_byte(n % 64, k)] >> detail::int4_panel_shift(k)) & 15;
          uint8_t& b = row[detail::int4_byte(k)];
          const int sh = detail::int4_shift(k);
          b = static_cast<uint8_t>((b & ~(0xF << sh)) | (u << sh));
        }
      }
    });
    WeightView v = view;
    v.w4 = w4.data();
    return v;
  }

  // wvnni from int8 rows wq [N, ld] (K valid columns) in the block layout of kernels.h.
  const int8_t* build_vnni_blocks(const int8_t* wq, int64_t ld) const {
    const int64_t N = view.N, K = view.K, Kp = view.Kp, nb = (N + 63) / 64;
    // Aligned: every kernel load is one whole cache line (malloc gives 16 bytes).
    wvnni = AlignedBuffer(static_cast<size_t>(nb * 64 * Kp));
    int8_t* base = static_cast<int8_t*>(wvnni.data());
    for (int64_t n = 0; n < N; ++n) {
      int8_t* col = base + (n / 64) * 64 * Kp + (n % 64) * 4;  // panel n%64/16, lane n%16
      const int8_t* src = wq + n * ld;
      for (int64_t k = 0; k < K; k += 4)
        std::memcpy(col + k * 64, src + k, static_cast<size_t>(std::min<int64_t>(4, K - k)));
    }
    return base;
  }
};

PackedLinear::PackedLinear(std::unique_ptr<PackedLinearImpl> impl) : impl_(std::move(impl)) {}
PackedLinear::~PackedLinear() = default;
int PackedLinear::bits() const { return impl_->view.bits; }
int64_t PackedLinear::out_features() const { return impl_->view.N; }
int64_t PackedLinear::in_features() const { return impl_->view.K; }
int64_t PackedLinear::group_size() const { return impl_->view.per_channel ? 0 : impl_->view.G; }
int64_t PackedLinear::nbytes() const {
  return static_cast<int64_t>(impl_->w8.size() + impl_->w4.size() + impl_->scale.size() * 4 + impl_->wsum.size() * 4 +
                              impl_->wq4.size() + impl_->colsum.size() * 4 + impl_->corr.size() * 4 +
                              impl_->wvnni.size() + impl_->w4p.size());
}

const char* linear_kernel_name(LinearKernel k) {
  switch (k) {
    case LinearKernel::WeightOnly: return "weight_only";
    case LinearKernel::DynamicInt8: return "dynamic_int8";
    case LinearKernel::DequantSgemm: return "dequant_sgemm";
    default: return "auto";
  }
}

const char* activation_precision_name(ActivationPrecision a) {
  return a == ActivationPrecision::FP32 ? "fp32" : "int16";
}

ActivationPrecision parse_activation_precision(const char* name) {
  const std::string s = name ? name : "";
  if (s == "int16") return ActivationPrecision::Int16;
  if (s == "fp32") return ActivationPrecision::FP32;
  throw ValueError("activation_precision must be 'int16' or 'fp32'; got '" + s + "'");
}

LinearKernel parse_linear_kernel(const char* name) {
  const std::string s = name ? name : "";
  if (s == "auto") return LinearKernel::Auto;
  if (s == "weight_only") return LinearKernel::WeightOnly;
  if (s == "dynamic_int8") return LinearKernel::DynamicInt8;
  if (s == "dequant_sgemm") return LinearKernel::DequantSgemm;
  throw ValueError("kernel must be one of 'auto', 'weight_only', 'dynamic_int8', 'dequant_sgemm'; got '" + s + "'");
}

namespace {

const KernelTable& table_for(SimdLevel level) {
  switch (level) {
    case SimdLevel::AVX512: return detail::avx512_kernels();
    case SimdLevel::AVX2: return detail::avx2_kernels();
    default: return detail::scalar_kernels();
  }
}

void check_shapes(int bits, int64_t N, int64_t K, int64_t group_size) {
  AIMASS_CHECK(bits == 8 || bits == 4, ValueError, "bits must be 8 or 4, got ", bits);
  AIMASS_CHECK(N > 0 && K > 0, ValueError, "weight shape must be positive, got [", N, ", ", K, "]");
  AIMASS_CHECK(group_size >= 0, ValueError, "group_size must be >= 0 (0 = per-channel), got ", group_size);
  AIMASS_CHECK(group_size == 0 || K % group_size == 0, ValueError, "group_size=", group_size,
               " must divide in_features K=", K);
}

inline int int4_canonical(const uint8_t* data, int64_t e) {
  const int v = (e & 1) ? (data[e >> 1] >> 4) : (data[e >> 1] & 15);
  return v >= 8 ? v - 16 : v;
}

// The int16-activation weight-only kernels: int8 per-channel weights; lane sums of the
// VNNI kernel stay below 2^31 while 255 * 127 * Kp does (Kp <= 65536).
constexpr int64_t kInt16MaxKp = int64_t{1} << 16;
// int4: groups of whole 128-blocks (or per-channel), on levels with the kernel (all three).
bool int16_supported(const WeightView& v) {
  if (v.Kp > kInt16MaxKp) return false;
  if (v.bits == 8) return v.per_channel;
  // the AVX2 / AVX-512 kernels read the panels (always built where those levels can run)
  return (v.per_channel || v.G % 128 == 0) && table_for(simd_level()).weight_only_int4_a16 != nullptr &&
         (simd_level() == SimdLevel::Scalar || v.w4p != nullptr);
}

bool dynamic_supported(const WeightView& v) {
  return (v.per_channel || v.G % 64 == 0) && v.Kp <= kDynamicMaxKp;
}

}  // namespace

std::shared_ptr<PackedLinear> pack_linear(int bits, int64_t N, int64_t K, int64_t group_size, const void* data,
                                          const float* scale) {
  check_shapes(bits, N, K, group_size);
  AIMASS_CHECK(data != nullptr && scale != nullptr, ValueError, "pack_linear: data and scale must not be null");
  auto impl = std::make_unique<PackedLinearImpl>();
  WeightView& v = impl->view;
  v.bits = bits;
  v.N = N;
  v.K = K;
  v.Kp = (K + 127) / 128 * 128;
  v.per_channel = group_size == 0 || group_size == K;
  v.G = v.per_channel ? K : group_size;
  v.ng = K / v.G;
  v.Gk = v.per_channel ? v.Kp : v.G;
  v.ngk = v.per_channel ? 1 : v.ng;
  const int64_t ns = N * v.ng;
  for (int64_t i = 0; i < ns; ++i)
    AIMASS_CHECK(std::isfinite(scale[i]) && scale[i] > 0.f, ValueError, "scale[", i, "]=", scale[i],
                 " must be finite and > 0 (symmetric quantization)");
  impl->scale.assign(scale, scale + ns);
  // int8 per-channel on a VNNI CPU: only the VNNI blocks are kept (rows built on demand).
  const bool blocks_only = bits == 8 && v.per_channel && PackedLinearImpl::cpu_has_vnni_blocks();
  if (bits == 8) {
    const int8_t* d = static_cast<const int8_t*>(data);
    for (int64_t n = 0; n < N; ++n) {
      const int8_t* src = d + n * K;
      for (int64_t k = 0; k < K; ++k)
        AIMASS_CHECK(src[k] != -128, ValueError, "data[", n, ", ", k,
                     "] = -128 is outside the symmetric int8 range [-127, 127]");
    }
    if (!blocks_only) {
      impl->w8.assign(static_cast<size_t>(N * v.Kp), 0);
      for (int64_t n = 0; n < N; ++n) std::memcpy(impl->w8.data() + n * v.Kp, d + n * K, static_cast<size_t>(K));
    }
    impl->wsum.assign(static_cast<size_t>(N), 0);
    for (int64_t n = 0; n < N; ++n) {
      int32_t acc = 0;  // |sum| <= 127 * K
      for (int64_t k = 0; k < K; ++k) acc += d[n * K + k];
      impl->wsum[n] = acc;
    }
  } else {
    const uint8_t* d = static_cast<const uint8_t*>(data);
    impl->w4.assign(static_cast<size_t>(N * v.Kp / 2), 0x88);  // padding decodes to 0
    for (int64_t n = 0; n < N; ++n) {
      uint8_t* row = impl->w4.data() + n * (v.Kp / 2);
      for (int64_t k = 0; k < K; ++k) {
        const int q = int4_canonical(d, n * K + k);
        AIMASS_CHECK(q != -8, ValueError, "data element [", n, ", ", k,
                     "] is the nibble -8, outside the symmetric int4 range [-7, 7]");
        uint8_t& b = row[detail::int4_byte(k)];
        const int sh = detail::int4_shift(k);
        b = static_cast<uint8_t>((b & ~(0xF << sh)) | ((q + 8) << sh));
      }
    }
  }
  v.w8 = impl->w8.empty() ? nullptr : impl->w8.data();
  v.w4 = impl->w4.empty() ? nullptr : impl->w4.data();
  v.scale = impl->scale.data();
  v.wsum = impl->wsum.empty() ? nullptr : impl->wsum.data();
  if (blocks_only) v.wvnni = impl->build_vnni_blocks(static_cast<const int8_t*>(data), K);
  if (bits == 4 && (v.per_channel || v.G % 128 == 0) && v.Kp <= kInt16MaxKp && cpu_features().avx2 &&
      cpu_features().fma) {
    impl->build_int4_panels();
    // panels only (the blocks are rebuilt on demand, see int4_blocks)
    std::vector<uint8_t>().swap(impl->w4);
    v.w4 = nullptr;
  }
  return std::make_shared<PackedLinear>(std::move(impl));
}

void dequantize_linear_weight(int bits, int64_t N, int64_t K, int64_t group_size, const void* data,
                              const float* scale, float* out) {
  check_shapes(bits, N, K, group_size);
  const int64_t G = group_size == 0 ? K : group_size, ng = K / G;
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < K; ++k) {
      const int q = bits == 8 ? static_cast<const int8_t*>(data)[n * K + k]
                              : int4_canonical(static_cast<const uint8_t*>(data), n * K + k);
      out[n * K + k] = static_cast<float>(q) * scale[n * ng + k / G];
    }
}

namespace {

LinearKernel choose_kernel(const PackedLinear& w, int64_t M, ActivationPrecision activations) {
  const WeightView& v = w.impl().view;
  const SimdLevel level = simd_level();
  if (level == SimdLevel::Scalar) return M >= kScalarSgemmMinM ? LinearKernel::DequantSgemm : LinearKernel::WeightOnly;
  int64_t min_dynamic = v.bits == 8 ? kDynamicMinMInt8 : kDynamicMinMInt4;
  if (v.bits == 4 && activations == ActivationPrecision::Int16 && int16_supported(v)) min_dynamic = kDynamicMinMInt4A16;
  if (M < min_dynamic) return LinearKernel::WeightOnly;
  return dynamic_supported(v) ? LinearKernel::DynamicInt8 : LinearKernel::DequantSgemm;
}

}  // namespace

LinearKernel choose_linear_kernel(const PackedLinear& w, int64_t M) {
  return choose_kernel(w, M, ActivationPrecision::Int16);
}

namespace {

// Splits N over the pool in more chunks than threads (multiples of 8 rows, at least
// ~64K multiply-adds each) that the threads claim dynamically. With one static chunk per
// thread a call waits for the slowest thread, and at batch 1 (0.1-0.3 ms per call) the
// worker's wake-up from the pool's condition variable (tens of microseconds on a VM) or
// a preemption is a large part of that: 2 threads gave only 1.3x. Chunks claimed
// dynamically let the caller start at once and the worker take what is left.
// `align`: chunk bounds fall on multiples of it (the kernels' tile width).
template <class Fn>
void parallel_rows(int64_t N, int64_t Kp, int64_t M, const Fn& fn, int64_t align = 8) {
  const int threads = num_threads();
  const int64_t min_rows =
      std::max<int64_t>(align, (int64_t{1} << 16) / (Kp * std::max<int64_t>(M, 1)) / align * align);
  const int64_t max_chunks = std::max<int64_t>(1, N / min_rows);
  const int nchunks = static_cast<int>(threads <= 1 ? 1 : std::min<int64_t>(max_chunks, 8 * threads));
  if (nchunks <= 1) {
    fn(int64_t{0}, N);
    return;
  }
  parallel_chunks(nchunks, [&](int c, int nc) {
    // chunk bounds on multiples of the tile keep the tiles whole
    const int64_t b = N * c / nc / align * align, e = c + 1 == nc ? N : N * (c + 1) / nc / align * align;
    if (e > b) fn(b, e);
  });
}

// Weight-only int8 with int16 activations: quantize the rows (2 * Kp bytes each, in
// the level's layout), then split N over the pool.
void run_weight_only_int16(const PackedLinearImpl& p, const float* x, int64_t M, float* y) {
  const WeightView& v = p.view;
  const KernelTable& t = table_for(simd_level());
  std::vector<uint8_t> qa(static_cast<size_t>(M * 2 * v.Kp));
  std::vector<float> sx(static_cast<size_t>(M));
  if (M <= 16) {
    t.quant_rows16(x, v.K, M, v.K, v.Kp, qa.data(), sx.data());  // a few microseconds: no dispatch
  } else {
    parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      t.quant_rows16(x + b * v.K, v.K, e - b, v.K, v.Kp, qa.data() + b * 2 * v.Kp, sx.data() + b);
    });
  }
  if (t.weight_only_int8_a16_panels && v.wvnni) {
    parallel_rows(v.N, v.Kp, M, [&](int64_t b, int64_t e) {
      t.weight_only_int8_a16_panels(v, qa.data(), sx.data(), M, y, v.N, b, e);
    }, 64);
    return;
  }
  AIMASS_CHECK(t.weight_only_int8_a16 != nullptr, Error,
               "internal: the int16 weight-only kernel of this SIMD level needs the VNNI blocks, which are missing");
  const WeightView rv = p.rows();
  parallel_rows(v.N, v.Kp, M, [&](int64_t b, int64_t e) {
    t.weight_only_int8_a16(rv, qa.data(), sx.data(), M, y, v.N, b, e);
  });
}

// Weight-only int4 with int16 activations (layout: kernels.h, quant_rows16_int4).
void run_weight_only_int4_a16(const PackedLinearImpl& p, const float* x, int64_t M, float* y) {
  // the SIMD kernels read the panels; the scalar reference reads the nibble blocks
  const WeightView v = simd_level() == SimdLevel::Scalar ? p.rows() : p.view;
  const KernelTable& t = table_for(simd_level());
  const int64_t rb = detail::int4_a16_row_bytes(v.Kp);
  std::vector<uint8_t> qa(static_cast<size_t>(M * rb));
  std::vector<float> sx(static_cast<size_t>(M));
  if (M <= 16) {
    t.quant_rows16_int4(x, v.K, M, v.K, v.Kp, qa.data(), sx.data());
  } else {
    parallel_for(0, M, 16, [&](int64_t b, int64_t e) {
      t.quant_rows16_int4(x + b * v.K, v.K, e - b, v.K, v.Kp, qa.data() + b * rb, sx.data() + b);
    });
  }
  // the SIMD kernels work on 64-column blocks of the panels
  parallel_rows(v.N, v.Kp, M, [&](int64_t b, int64_t e) {
    t.weight_only_int4_a16(v, qa.data(), sx.data(), M, y, v.N, b, e);
  }, simd_level() == SimdLevel::Scalar ? 8 : 64);
}

void run_weight_only(const PackedLinearImpl& p, const float* x, int64_t M, float* y) {
  const WeightView v = p.rows();
  const KernelTable* t = &table_for(simd_level());
  const int chunk = v.bits == 8 ? t->wo_chunk_int8 : t->wo_chunk_int4;
  if (!v.per_channel && v.G % chunk != 0) t = &detail::scalar_kernels();
  const bool simd = t != &detail::scalar_kernels();
  const float* xs = x;
  int64_t ldx = v.K;
  std::vector<float> xpad;
  // Per-channel SIMD kernels, and int4 ones with groups smaller than a block, read whole
  // 128-element blocks of x: give them a zero-padded copy.
  const bool whole_blocks = v.per_channel || (v.bits == 4 && v.G % 128 != 0);
  if (simd && whole_blocks && v.Kp != v.K) {
    xpad.assign(static_cast<size_t>(M * v.Kp), 0.f);
    for (int64_t m = 0; m < M; ++m) std::memcpy(xpad.data() + m * v.Kp, x + m * v.K, v.K * sizeof(float));
    xs = xpad.data();
    ldx = v.Kp;
  }
  const auto fn = v.bits == 8 ? t->weight_only_int8 : t->weight_only_int4;
  parallel_rows(v.N, v.Kp, M, [&](int64_t b, int64_t e) { fn(v, xs, ldx, M, y, v.N, b, e); });
}

// int4 weights on a level with a packed-int4 dynamic kernel: quantize x with the level's
// kernel, then reorder each 128-block to the nibble order and sum each group.
void run_dynamic_int4(const PackedLinearImpl& p, const KernelTable& t, const float* x, int64_t M, float* y) {
  const WeightView v = p.rows();  // the nibble blocks
  std::vector<int8_t> qx(static_cast<size_t>(M * v.Kp)), qxp(static_cast<size_t>(M * v.Kp));
  std::vector<float> sx(static_cast<size_t>(M));
  std::vector<int32_t> qsum(static_cast<size_t>(M * v.ngk));
  // quant_rows of a VNNI level stores q + 128 as uint8; xor 0x80 gives q back.
  const int8_t flip = static_cast<int8_t>(t.quant_rows == detail::scalar_kernels().quant_rows ? 0 : 0x80);
  parallel_for(0, M, 8, [&](int64_t b, int64_t e) {
    t.quant_rows(x + b * v.K, v.K, e - b, v.K, v.Kp, qx.data() + b * v.Kp, sx.data() + b);
    for (int64_t m = b; m < e; ++m) {
      const int8_t* q = qx.data() + m * v.Kp;
      int8_t* o = qxp.data() + m * v.Kp;
      for (int64_t k0 = 0; k0 < v.Kp; k0 += 128)
        for (int t4 = 0; t4 < 4; ++t4)
          for (int d = 0; d < 16; ++d) {
            o[k0 + 4 * d + t4] = static_cast<int8_t>(q[k0 + 32 * t4 + d] ^ flip);
            o[k0 + 64 + 4 * d + t4] = static_cast<int8_t>(q[k0 + 32 * t4 + 16 + d] ^ flip);
          }
      for (int64_t g = 0; g < v.ngk; ++g) {
        int32_t s = 0;
        for (int64_t k = g * v.Gk; k < (g + 1) * v.Gk; ++k) s += static_cast<int8_t>(q[k] ^ flip);
        qsum[m * v.ngk + g] = s;
      }
    }
  });
  parallel_rows(v.N, v.Kp, M, [&](int64_t b, int64_t e) {
    t.dynamic_int4(v, qxp.data(), qsum.data(), sx.data(), M, y, v.N, b, e);
  });
}

// Returns true when it also applied the bias and `epi` (if given) (the VNNI panels path: per
// block of 64 columns right after the GEMM, and no scan for non-finite rows - quant_rows gives
// such a row sx = NaN, so its outputs are NaN already); false: the caller applies them.
bool run_dynamic(const PackedLinearImpl& p, const float* x, int64_t M, float* y, const float* bias = nullptr,
                 const LinearEpilogue* epi = nullptr) {
  {
    const KernelTable& t = table_for(simd_level());
    const WeightView& pv = p.view;
    // Reading packed int4 halves the weight traffic, which wins for few rows (M = 1:
    // 0.31 ms vs 0.77 ms unpacked, N = K = 4096); per row it does more work than the
    // int8-copy kernel (M = 8: 2.5 vs 1.9 ms), so larger batches build the copy.
    if (pv.bits == 4 && t.dynamic_int4 && M < kInt4PackedDynamicMaxM && (pv.per_channel || pv.G % 128 == 0) &&
        pv.Kp <= kDynamicMaxKp) {
      run_dynamic_int4(p, t, x, M, y);
      return false;
    }
  }
  const WeightView v = p.dynamic_view();
  AIMASS_CHECK(dynamic_supported(v), ValueError, "kernel='dynamic_int8' needs per-channel weights or a group_size "
               "that is a multiple of 64 (got ", v.G, ") and K <= ", kDynamicMaxKp, "; use kernel='auto'");
  const KernelTable& t = table_for(simd_level());
  // quant_rows writes every byte of every row (zeros past K): no zero fill (1 MiB at BERT-mini's f2, batch 8)
  const std::unique_ptr<int8_t[]> qx_buf(new int8_t[static_cast<size_t>(M * v.Kp)]);
  const std::unique_ptr<float[]> sx_buf(new float[static_cast<size_t>(M)]);
  int8_t* const qxp = qx_buf.get();
  float* const sxp = sx_buf.get();
  if (t.dynamic_panels && v.wvnni) {
    // Split N in 64-column blocks: each thread reuses its weight blocks over all rows. The
    // kernel adds the bias in its register epilogue. `epi` runs on each chunk of kEpiRows rows
    // right after the GEMM wrote it, while it is in L1 (one pass instead of a GEMM pass and an
    // epilogue pass over L2); the 64-column weight block stays in L2 across the chunks.
    WeightView vb = v;
    vb.bias = bias;
    const int64_t nb = (v.N + 63) / 64;
    const bool fused = epi != nullptr && *epi;
    constexpr int64_t kEpiRows = 96;  // a multiple of the VNNI tile's 6 rows
    // More chunks than threads (up to 4 each): a worker the OS has not scheduled yet holds
    // only its first chunk, the others are taken by whoever is free (with one chunk per
    // thread the caller did a late worker's half alone; BERT-mini has 4-16 blocks).
    // With fewer column blocks than that (N = 256: 4 blocks) and many rows, the rows split
    // too, in parts of whole kEpiRows: BERT-mini's N = 256 layers at batch 8 (1024 rows) ran
    // 4 chunks on 2 threads, and a worker that started late left the caller 3 of them (1.4x).
    // When the whole weight fits in L2 next to the rows (<= 512 KiB: N = 256 at K <= 2048), the
    // split is by rows only: each thread reads its part of the quantized rows once, instead of
    // every column block reading all of it (f2 of BERT-mini, K = 1024: 1 MiB of int8 rows).
    // Below 2 x kEpiRows rows (BERT-mini at batch 1: 128 rows; its N = 256 layers have 4 blocks)
    // the rows split in parts of whole 6-row VNNI tiles, at least kMinPartRows each.
    const int64_t want = 4 * static_cast<int64_t>(num_threads());
    const bool rows_only = nb < want && v.N * v.Kp <= (int64_t{512} << 10) && M >= 2 * kEpiRows;
    const int64_t row_grain = M >= 2 * kEpiRows ? kEpiRows : 6;
    constexpr int64_t kMinPartRows = 48;
    const int64_t max_parts = M >= 2 * kEpiRows ? M / kEpiRows : std::max<int64_t>(1, M / kMinPartRows);
    const int64_t ncol = rows_only ? 1 : std::min<int64_t>(nb, want);
    const int64_t mparts = rows_only ? std::min(want, max_parts)
                           : nb >= want ? 1
                                        : std::max<int64_t>(1, std::min((want + nb - 1) / nb, max_parts));
    const int nchunks = static_cast<int>(ncol * mparts);
    // The activation quantization runs in the same pool job as the GEMM: every chunk first
    // claims blocks of rows to quantize until none is left, then waits for the blocks others
    // claimed (a claimed block is being quantized by a running thread, so the wait ends). One
    // hand-off per layer instead of two, and the quantization uses both threads even when it
    // is short (128 rows of 256: it ran on the caller alone, as one chunk of a parallel_for).
    const int64_t qrows = std::max<int64_t>(4, (int64_t{1} << 13) / std::max<int64_t>(v.K, 1));
    const int64_t nqb = (M + qrows - 1) / qrows;
    std::atomic<int64_t> q_next{0}, q_done{0};
    parallel_chunks(nchunks, [&](int c, int) {
      for (int64_t i; (i = q_next.fetch_add(1, std::memory_order_relaxed)) < nqb;) {
        const int64_t b = i * qrows, e = std::min(M, b + qrows);
        t.quant_rows(x + b * v.K, v.K, e - b, v.K, v.Kp, qxp + b * v.Kp, sxp + b);
        q_done.fetch_add(1, std::memory_order_release);
      }
      for (int spins = 0; q_done.load(std::memory_order_acquire) < nqb; ++spins) {
        if (spins >= 4096) std::this_thread::yield();  // its holder may be descheduled (loaded machine)
        else cpu_relax();
      }
      const int64_t cc = c / mparts, mp = c % mparts;
      const int64_t b = nb * cc / ncol, e = nb * (cc + 1) / ncol;
      const int64_t mb = (M * mp / mparts) / row_grain * row_grain,
                    me = mp + 1 == mparts ? M : (M * (mp + 1) / mparts) / row_grain * row_grain;
      if (e <= b || me <= mb) return;
      const int64_t n0 = b * 64, n1 = std::min(e * 64, v.N);
      if (!fused) {
        t.dynamic_panels(vb, qxp + mb * v.Kp, sxp + mb, me - mb, y + mb * v.N, v.N, n0, n1);
        return;
      }
      for (int64_t m0 = mb; m0 < me; m0 += kEpiRows) {
        const int64_t mr = std::min(kEpiRows, me - m0);
        float* yc = y + m0 * v.N;
        t.dynamic_panels(vb, qxp + m0 * v.Kp, sxp + m0, mr, yc, v.N, n0, n1);
        (*epi)(yc, mr, v.N, n0, n1);
      }
    });
    return true;
  }
  // >= 32K values per chunk (~10 us): a smaller split costs more in pool hand-offs than it saves.
  parallel_for(0, M, std::max<int64_t>(16, (int64_t{1} << 15) / std::max<int64_t>(v.K, 1)), [&](int64_t b, int64_t e) {
    t.quant_rows(x + b * v.K, v.K, e - b, v.K, v.Kp, qxp + b * v.Kp, sxp + b);
  });
  WeightView rv = v;  // the row kernels read int8 rows (rebuilt once if only blocks are kept)
  if (!rv.wq) rv.w8 = rv.wq = p.rows().w8;
  const int64_t grain = std::max<int64_t>(16, std::min<int64_t>(256, (v.N / 32) / 4 * 4));
  parallel_for(0, v.N, grain, [&](int64_t b, int64_t e) { t.dynamic(rv, qxp, sxp, M, y, v.N, b, e); });
  return false;
}

void run_dequant_sgemm(const PackedLinearImpl& p, const float* x, int64_t M, float* y) {
  const WeightView v = p.rows();
  const int64_t panel = std::min(v.N, std::max<int64_t>(64, kSgemmScratch / v.K));
  std::vector<float> wbuf(static_cast<size_t>(panel * v.K));
  for (int64_t n0 = 0; n0 < v.N; n0 += panel) {
    const int64_t nb = std::min(panel, v.N - n0);
    // Dequantize on the calling thread so the engine's pool and OpenBLAS's threads do not
    // alternate on the same cores every panel (the sgemm is the parallel part).
    {
      const int64_t b = 0, e = nb;
      for (int64_t r = b; r < e; ++r) {
        const int64_t n = n0 + r;
        float* out = wbuf.data() + r * v.K;
        const float* sr = v.scale + n * v.ng;
        for (int64_t g = 0; g < v.ng; ++g) {
          const float sg = sr[g];
          const int64_t k0 = g * v.G, k1 = k0 + v.G;
          if (v.bits == 8) {
            const int8_t* wr = v.w8 + n * v.Kp;
            for (int64_t k = k0; k < k1; ++k) out[k] = static_cast<float>(wr[k]) * sg;
          } else {
            const uint8_t* wr = v.w4 + n * (v.Kp / 2);
            for (int64_t k = k0; k < k1; ++k) {
              out[k] = static_cast<float>(detail::int4_get(wr, k)) * sg;
            }
          }
        }
      }
    }
    sgemm(false, true, M, nb, v.K, 1.f, x, v.K, wbuf.data(), v.K, 0.f, y + n0, v.N);
  }
}

// The contract of every path (docs/qlinear.md): a row of x holding NaN or +-inf gives an
// all-NaN output row. The int16 / int8 activation paths cannot represent such a row (its
// scale max|x_row| is not finite) and give NaN; the fp32 paths would give +-inf or NaN
// depending on the weights. One rule for all, so the answer never depends on the kernel
// chosen by batch size or CPU. The scan reads x once (M*K, vs the M*N*K of the product).
void nan_rows_of_nonfinite_x(const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint32_t bad = 0;
    for (int64_t k = 0; k < K; ++k) {  // exponent all ones: inf or NaN (vectorizes)
      uint32_t u;
      std::memcpy(&u, xr + k, 4);
      bad |= static_cast<uint32_t>((u & 0x7f800000u) == 0x7f800000u);
    }
    if (bad) std::fill(y + m * N, y + (m + 1) * N, std::numeric_limits<float>::quiet_NaN());
  }
}

}  // namespace

void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y) {
  linear(w, x, M, bias_or_null, y, LinearKernel::Auto);
}

void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y,
            const LinearEpilogue& epi) {
  AIMASS_CHECK(M >= 0, ValueError, "linear: M (rows of x) must be >= 0, got ", M);
  if (M == 0) return;
  AIMASS_CHECK(x != nullptr && y != nullptr, ValueError, "linear: x and y must not be null");
  if (plan_linear(w, M).kernel == LinearKernel::DynamicInt8 && run_dynamic(w.impl(), x, M, y, bias_or_null, &epi))
    return;
  if (plan_linear(w, M).kernel == LinearKernel::DynamicInt8) {  // the other dynamic paths (already run)
    const int64_t N = w.impl().view.N;
    if (bias_or_null)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = 0; n < N; ++n) y[m * N + n] += bias_or_null[n];
    nan_rows_of_nonfinite_x(x, M, w.impl().view.K, N, y);
  } else {
    linear(w, x, M, bias_or_null, y, LinearKernel::Auto);
  }
  if (epi) epi(y, M, w.impl().view.N, 0, w.impl().view.N);
}

LinearPlan plan_linear(const PackedLinear& w, int64_t M, LinearKernel kernel, ActivationPrecision activations) {
  if (kernel == LinearKernel::Auto) kernel = choose_kernel(w, M, activations);
  switch (kernel) {
    case LinearKernel::WeightOnly:
      return {kernel, activations == ActivationPrecision::Int16 && int16_supported(w.impl().view) ? "int16" : "fp32"};
    case LinearKernel::DynamicInt8: return {kernel, "int8"};
    default: return {LinearKernel::DequantSgemm, "fp32"};
  }
}

void linear(const PackedLinear& w, const float* x, int64_t M, const float* bias_or_null, float* y,
            LinearKernel kernel, ActivationPrecision activations) {
  AIMASS_CHECK(M >= 0, ValueError, "linear: M (rows of x) must be >= 0, got ", M);
  if (M == 0) return;
  AIMASS_CHECK(x != nullptr && y != nullptr, ValueError, "linear: x and y must not be null");
  const PackedLinearImpl& p = w.impl();
  const LinearPlan plan = plan_linear(w, M, kernel, activations);
  switch (plan.kernel) {
    case LinearKernel::WeightOnly:
      if (plan.activations[0] != 'i') run_weight_only(p, x, M, y);
      else if (p.view.bits == 8) run_weight_only_int16(p, x, M, y);
      else run_weight_only_int4_a16(p, x, M, y);
      break;
    case LinearKernel::DynamicInt8:
      if (run_dynamic(p, x, M, y, bias_or_null)) return;  // bias applied, non-finite rows NaN already
      break;
    default: run_dequant_sgemm(p, x, M, y); break;
  }
  if (bias_or_null) {
    const int64_t N = p.view.N;
    for (int64_t m = 0; m < M; ++m) {
      float* yr = y + m * N;
      for (int64_t n = 0; n < N; ++n) yr[n] += bias_or_null[n];
    }
  }
  nan_rows_of_nonfinite_x(x, M, p.view.K, p.view.N, y);
}

}  // namespace aimass::quant
