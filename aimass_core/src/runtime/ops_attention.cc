// Fused scaled-dot-product attention: per (batch row, head), K and V are packed once into
// the packed GEMM's panel layout (packed_gemm.h: K^T as [key panel][d][32], V as
// [dv panel][key][32]); then per block of query rows: scores = (scale * Q) K^T, mask
// (additive, boolean, key padding and/or causal), softmax, then P V, both products on the
// packed register-tile kernels of the SIMD level (scalar reference included), with the
// block's scores in L1/L2 throughout. BLAS sgemm, used before, re-packed both operands of
// each of these small products (BERT: 128 x 128 scores, D = 64) on every call. Two layouts:
//   heads = 0: q [.., Sq, D], k [.., Sk, D], v [.., Sk, Dv] (torch F.scaled_dot_product_attention)
//   heads = H: q [Sq, H*D], k [Sk, H*D], v [Sk, H*Dv], out [Sq, H*Dv] (nn.MultiheadAttention
//              without the head split/merge copies).
// Softmax follows torch: a NaN score makes its row NaN; a row whose every key is
// masked gives NaN in the math path and is reported the same way here.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "aimass/error.h"
#include "aimass/memory.h"
#include "aimass/parallel.h"
#include "runtime/ext_ops.h"
#include "runtime/packed_gemm.h"
#include "runtime/vec_kernels.h"

namespace aimass::runtime {
namespace {
using namespace ext;

enum class MaskKind { None, Add, Bool, KeyPadding };

// vp[panel][j][32] <- v[j][panel * 32 ..] (row stride ldv), columns past Dv zero.
void pack_values(const float* v, int64_t ldv, int64_t Sk, int64_t Dv, float* vp) {
  const int64_t P = packed::num_panels(Dv);
  for (int64_t p = 0; p < P; ++p) {
    float* dst = vp + p * Sk * packed::kPanel;
    const int64_t c0 = p * packed::kPanel, nc = std::min(packed::kPanel, Dv - c0);
    for (int64_t j = 0; j < Sk; ++j) {
      std::copy(v + j * ldv + c0, v + j * ldv + c0 + nc, dst + j * packed::kPanel);
      if (nc < packed::kPanel) std::fill(dst + j * packed::kPanel + nc, dst + (j + 1) * packed::kPanel, 0.f);
    }
  }
}

class Sdpa : public ExtKernel {
 public:
  int64_t heads = 0;  // 0: head dims are leading row dims
  bool packed = false;  // heads > 0 and one input [S, 3*H*D] holding q, k, v side by side
  int64_t hcount = 1;  // heads per batch row
  std::vector<int64_t> hdims;  // heads == 0: the leading row dims
  int64_t Sq = 0, Sk = 0, D = 0, Dv = 0;
  float scale = 1.f;
  bool causal = false;
  MaskKind mask = MaskKind::None;
  int mask_input = -1;                // graph input index of the mask, or -1
  const float* mask_const = nullptr;  // stored mask
  std::vector<int64_t> mask_full;     // full shape, [0] = -1 when batched

  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const float* q = static_cast<const float*>(in[0]);
    const float* k = packed ? q + heads * D : static_cast<const float*>(in[1]);
    const float* v = packed ? q + 2 * heads * D : static_cast<const float*>(in[2]);
    float* o = static_cast<float*>(out);
    const float* mbase = mask_input >= 0 ? static_cast<const float*>(in[mask_input]) : mask_const;
    // Mask strides against [R, hdims.., Sq, Sk] (heads == 0) or [R, H, Sq, Sk].
    std::vector<int64_t> target{rows};
    if (heads) target.push_back(heads);
    else target.insert(target.end(), hdims.begin(), hdims.end());
    target.push_back(Sq);
    target.push_back(Sk);
    std::vector<int64_t> mst(target.size(), 0);
    if (mask == MaskKind::Add || mask == MaskKind::Bool) {
      int64_t acc = 1;
      for (size_t j = 0; j < mask_full.size(); ++j) {
        const size_t s = mask_full.size() - 1 - j, d = target.size() - 1 - j;
        const int64_t dd = mask_full[s] < 0 ? rows : mask_full[s];
        mst[d] = dd == 1 ? 0 : acc;
        acc *= dd;
      }
    }
    const int64_t lq = packed ? 3 * heads * D : heads ? heads * D : D, lk = packed ? lq : heads ? heads * D : D,
                  lv = packed ? lq : heads ? heads * Dv : Dv, lo = heads ? heads * Dv : Dv;
    const vec::Kernels& vk = vec::kernels();
    const packed::PanelsExFn panels = packed::panels_ex_kernel();
    // Query rows per block: the block's scores (<= kBlock x Sk) stay in L2 between the two
    // products (long key sequences get shorter blocks: at most 4 MiB of scores per thread).
    // Blocks of equal size; more of them when there are fewer (batch row, head) items than
    // threads.
    const int64_t kBlock = std::max<int64_t>(12, std::min<int64_t>(128, (int64_t{1} << 20) / Sk));
    const int64_t items = rows * hcount;
    int64_t qblocks = (Sq + kBlock - 1) / kBlock;
    const int64_t nt = num_threads();
    if (items < nt) qblocks = std::max(qblocks, std::min((Sq + 23) / 24, (nt + items - 1) / items));
    const int64_t qb = (Sq + qblocks - 1) / qblocks;
    const int64_t kt_n = packed::num_panels(Sk) * D * packed::kPanel, vp_n = packed::num_panels(Dv) * Sk * packed::kPanel;
    const packed::Epilogue none{};
    // More chunks than threads (up to 4 each), contiguous so a chunk's blocks of one item share
    // its packed K and V: a late worker holds only its first chunk.
    const int64_t tasks = items * qblocks;
    const int nchunks = static_cast<int>(std::min<int64_t>(tasks, 4 * nt));
    parallel_chunks(nchunks, [&](int c, int nc) {
      const int64_t t0 = tasks * c / nc, t1 = tasks * (c + 1) / nc;
      // 64-byte aligned: the panel kernels use aligned loads of the panels
      float* kt = thread_scratch(0, static_cast<size_t>(kt_n + vp_n + qb * (D + Sk + Dv) + 64));
      float* vpk = kt + ((kt_n + 15) & ~int64_t{15});
      float* Q = vpk + ((vp_n + 15) & ~int64_t{15});
      float* S = Q + ((qb * D + 15) & ~int64_t{15});
      float* O = S + ((qb * Sk + 15) & ~int64_t{15});
      int64_t packed_item = -1;  // K and V of this item are in kt / vpk
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t item = t / qblocks, blk = t % qblocks;
        const int64_t r = item / hcount, h = item % hcount;
        const float *qp, *kp, *vp;
        float* op;
        if (heads) {
          qp = q + r * Sq * lq + h * D;
          kp = k + r * Sk * lk + h * D;
          vp = v + r * Sk * lv + h * Dv;
          op = o + r * Sq * lo + h * Dv;
        } else {
          qp = q + item * Sq * D;
          kp = k + item * Sk * D;
          vp = v + item * Sk * Dv;
          op = o + item * Sq * Dv;
        }
        if (item != packed_item) {
          vk.pack_keys(kp, lk, Sk, D, kt);
          pack_values(vp, lv, Sk, Dv, vpk);
          packed_item = item;
        }
        const float* mrow0 = nullptr;
        int64_t ms_i = 0, ms_j = 0;
        if (mask == MaskKind::KeyPadding) {
          mrow0 = mbase + r * Sk;
          ms_j = 1;
        } else if (mask != MaskKind::None) {
          int64_t off = r * mst[0];
          if (heads) {
            off += h * mst[1];
          } else {
            int64_t rem = h;
            for (int d = static_cast<int>(hdims.size()) - 1; d >= 0; --d) {
              off += (rem % hdims[d]) * mst[1 + d];
              rem /= hdims[d];
            }
          }
          mrow0 = mbase + off;
          ms_i = mst[target.size() - 2];
          ms_j = mst[target.size() - 1];
        }
        const float ninf = -std::numeric_limits<float>::infinity();
        const int64_t i0 = blk * qb, i1 = std::min(Sq, i0 + qb), mrows = i1 - i0;
        if (mrows <= 0) continue;
        for (int64_t i = i0; i < i1; ++i) {  // scale folded into the copy of q
          const float* src = qp + i * lq;
          float* dst = Q + (i - i0) * D;
          for (int64_t d = 0; d < D; ++d) dst[d] = src[d] * scale;
        }
        panels(Q, mrows, D, kt, nullptr, 0, packed::num_panels(Sk), Sk, none, S);
        for (int64_t i = i0; i < i1; ++i) {
          float* s = S + (i - i0) * Sk;
          if (!causal && (mask == MaskKind::None || (mask == MaskKind::Add && ms_j == 1))) {
            if (mask == MaskKind::Add) vk.softmax_add_row(s, mrow0 + i * ms_i, Sk);  // one pass fewer
            else vk.softmax_row(s, Sk, false, s);
            continue;
          }
          if (mask == MaskKind::Add) {
            const float* mr = mrow0 + i * ms_i;
            for (int64_t j = 0; j < Sk; ++j) s[j] += mr[j * ms_j];
          } else if (mask == MaskKind::Bool) {
            const float* mr = mrow0 + i * ms_i;
            for (int64_t j = 0; j < Sk; ++j)
              if (mr[j * ms_j] == 0.f) s[j] = ninf;
          } else if (mask == MaskKind::KeyPadding) {
            for (int64_t j = 0; j < Sk; ++j)
              if (mrow0[j] != 0.f) s[j] = ninf;
          }
          if (causal)
            for (int64_t j = i + 1; j < Sk; ++j) s[j] = ninf;
          vk.softmax_row(s, Sk, false, s);
        }
        float* dst = lo == Dv ? op + i0 * lo : O;
        panels(S, mrows, Sk, vpk, nullptr, 0, packed::num_panels(Dv), Dv, none, dst);
        if (dst == O)
          for (int64_t i = i0; i < i1; ++i) std::copy(O + (i - i0) * Dv, O + (i - i0 + 1) * Dv, op + i * lo);
      }
    });
  }
};

std::unique_ptr<ExtKernel> build_sdpa(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                      ExtValue& out) {
  for (const auto& v : in)
    AIMASS_CHECK(v.dtype == ValueType::Float32, TypeError, where(n), ": inputs must be float32");
  auto k = std::make_unique<Sdpa>();
  k->heads = attr_int(n, "heads", 0);
  k->causal = attr_int(n, "causal", 0) != 0;
  k->packed = attr_int(n, "packed", 0) != 0;
  const size_t nqkv = k->packed ? 1 : 3;
  AIMASS_CHECK(in.size() == nqkv || in.size() == nqkv + 1, ValueError, where(n), " takes ",
               k->packed ? "the packed qkv" : "q, k, v", " and an optional mask input");
  AIMASS_CHECK(!k->packed || k->heads > 0, ValueError, where(n), ": packed qkv needs heads");
  std::vector<int64_t> q = in[0].row, kk, v;
  if (k->packed) {
    AIMASS_CHECK(q.size() == 2 && q[1] % (3 * k->heads) == 0, ValueError, where(n), ": packed qkv row ",
                 shape_str(q), " must be [S, 3*heads*dim]");
    q[1] /= 3;
    kk = v = q;
  } else {
    kk = in[1].row;
    v = in[2].row;
  }
  if (k->heads > 0) {
    AIMASS_CHECK(q.size() == 2 && kk.size() == 2 && v.size() == 2, ValueError, where(n),
                 ": with heads, q/k/v rows must be [S, heads*dim]");
    AIMASS_CHECK(q[1] % k->heads == 0 && v[1] % k->heads == 0 && q[1] == kk[1], ValueError, where(n), ": q ",
                 shape_str(q), ", k ", shape_str(kk), ", v ", shape_str(v), " do not split into ", k->heads,
                 " heads");
    AIMASS_CHECK(kk[0] == v[0], ValueError, where(n), ": k and v have different lengths");
    k->Sq = q[0];
    k->Sk = kk[0];
    k->D = q[1] / k->heads;
    k->Dv = v[1] / k->heads;
    k->hcount = k->heads;
    out.row = {k->Sq, k->heads * k->Dv};
  } else {
    AIMASS_CHECK(q.size() >= 2 && kk.size() == q.size() && v.size() == q.size(), ValueError, where(n),
                 ": q/k/v must have the same rank >= 3 (batch included)");
    const size_t r = q.size();
    for (size_t i = 0; i + 2 < r; ++i)
      AIMASS_CHECK(q[i] == kk[i] && q[i] == v[i], ValueError, where(n), ": q ", shape_str(q), ", k ",
                   shape_str(kk), ", v ", shape_str(v), " differ in their leading dims");
    AIMASS_CHECK(q[r - 1] == kk[r - 1] && kk[r - 2] == v[r - 2], ValueError, where(n), ": q ", shape_str(q),
                 ", k ", shape_str(kk), ", v ", shape_str(v), " do not fit together");
    k->hdims.assign(q.begin(), q.end() - 2);
    for (auto d : k->hdims) k->hcount *= d;
    k->Sq = q[r - 2];
    k->Sk = kk[r - 2];
    k->D = q[r - 1];
    k->Dv = v[r - 1];
    out.row = q;
    out.row[r - 1] = k->Dv;
  }
  AIMASS_CHECK(k->D > 0 && k->Sk > 0, ValueError, where(n), ": empty attention");
  k->scale = static_cast<float>(has_attr(n, "scale") ? attr_num(n, "scale", 0) : 1.0 / std::sqrt(double(k->D)));
  const std::string mk = attr_str(n, "mask_kind", in.size() > nqkv || n.params.count("mask") ? "add" : "none");
  if (mk == "none") k->mask = MaskKind::None;
  else if (mk == "add") k->mask = MaskKind::Add;
  else if (mk == "bool") k->mask = MaskKind::Bool;
  else if (mk == "key_padding") k->mask = MaskKind::KeyPadding;
  else throw ValueError(detail::concat(where(n), ": mask_kind '", mk, "' must be none, add, bool or key_padding"));
  if (k->mask != MaskKind::None) {
    if (in.size() == nqkv + 1) {
      k->mask_input = static_cast<int>(nqkv);
      k->mask_full = in[nqkv].row;
      k->mask_full.insert(k->mask_full.begin(), -1);
    } else {
      k->mask_const = param_f32(m, n, "mask", {}, true, &k->mask_full);
      AIMASS_CHECK(k->mask != MaskKind::KeyPadding, ValueError, where(n), ": a key padding mask must be an input");
    }
    if (k->mask == MaskKind::KeyPadding) {
      AIMASS_CHECK(k->mask_full.size() == 2 && k->mask_full[1] == k->Sk, ValueError, where(n),
                   ": key padding mask must be [batch, ", k->Sk, "], got ", shape_str(k->mask_full));
    } else {
      const size_t trank = (k->heads ? 2 : k->hdims.size() + 1) + 2;
      AIMASS_CHECK(k->mask_full.size() <= trank, ValueError, where(n), ": mask ", shape_str(k->mask_full),
                   " has more dims than the attention");
      std::vector<int64_t> target{-1};
      if (k->heads) target.push_back(k->heads);
      else target.insert(target.end(), k->hdims.begin(), k->hdims.end());
      target.push_back(k->Sq);
      target.push_back(k->Sk);
      for (size_t j = 0; j < k->mask_full.size(); ++j) {
        const int64_t d = k->mask_full[k->mask_full.size() - 1 - j], t = target[trank - 1 - j];
        AIMASS_CHECK(d == 1 || d == t || (t == -1 && d == -1), ValueError, where(n), ": mask ",
                     shape_str(k->mask_full), " does not broadcast to the scores ", shape_str(target));
      }
    }
  } else {
    AIMASS_CHECK(in.size() == nqkv, ValueError, where(n), ": a mask input needs mask_kind");
  }
  return k;
}

}  // namespace

namespace ext {
std::unique_ptr<ExtKernel> build_attention_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                              ExtValue& out, WeightCache&) {
  if (n.op == "sdpa") return build_sdpa(m, n, in, out);
  return nullptr;
}
}  // namespace ext
}  // namespace aimass::runtime
