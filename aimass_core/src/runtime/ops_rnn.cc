// Recurrent layers (nn.LSTM / nn.GRU semantics, batch_first, unidirectional, zero
// initial state): per layer, the input projection of every timestep is one GEMM
// (rows*S x gates*H), then each step adds h @ W_hh^T (one small GEMM) and applies
// the gates (torch order: LSTM i, f, g, o; GRU r, z, n). The op's output is the
// last layer's hidden state at every step, [S, H] per row (what nn.LSTM returns first).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "aimass/blas.h"
#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "runtime/ext_ops.h"

namespace aimass::runtime {
namespace {
using namespace ext;

inline float sigm(float v) { return 1.f / (1.f + std::exp(-v)); }

struct RnnLayer {
  const float *w_ih = nullptr, *w_hh = nullptr, *b_ih = nullptr, *b_hh = nullptr;
  int64_t in = 0;
};

class Rnn : public ExtKernel {
 public:
  bool gru = false;
  int64_t S = 0, H = 0, G = 4;  // gates
  std::vector<RnnLayer> layers;
  std::vector<float> gi, gh, h, c, mid, bsum;  // grown on first use, reused

  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const int64_t GH = G * H;
    gi.resize(static_cast<size_t>(rows * S * GH));
    gh.resize(static_cast<size_t>(rows * GH));
    h.resize(static_cast<size_t>(rows * H));
    c.resize(static_cast<size_t>(rows * H));
    if (layers.size() > 1) mid.resize(static_cast<size_t>(rows * S * H));
    const float* x = static_cast<const float*>(in[0]);
    float* y = static_cast<float*>(out);
    for (size_t l = 0; l < layers.size(); ++l) {
      const RnnLayer& L = layers[l];
      // layers alternate between mid and y so the last one lands in y
      float* dst = ((layers.size() - 1 - l) % 2 == 0) ? y : mid.data();
      // input projection for all timesteps at once (+ b_ih, and b_hh for LSTM)
      sgemm(false, true, rows * S, GH, L.in, 1.f, x, L.in, L.w_ih, L.in, 0.f, gi.data(), GH);
      parallel_for(0, rows * S, std::max<int64_t>(1, 4096 / GH), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          float* g = gi.data() + r * GH;
          for (int64_t j = 0; j < GH; ++j)
            g[j] += (L.b_ih ? L.b_ih[j] : 0.f) + (!gru && L.b_hh ? L.b_hh[j] : 0.f);
        }
      });
      std::fill(h.begin(), h.end(), 0.f);
      std::fill(c.begin(), c.end(), 0.f);
      for (int64_t t = 0; t < S; ++t) {
        sgemm(false, true, rows, GH, H, 1.f, h.data(), H, L.w_hh, H, 0.f, gh.data(), GH);
        for (int64_t r = 0; r < rows; ++r) {
          const float* a = gi.data() + (r * S + t) * GH;
          const float* b = gh.data() + r * GH;
          float* hr = h.data() + r * H;
          float* cr = c.data() + r * H;
          float* o = dst + (r * S + t) * H;
          if (!gru) {
            for (int64_t j = 0; j < H; ++j) {
              const float ig = sigm(a[j] + b[j]), fg = sigm(a[H + j] + b[H + j]);
              const float gg = std::tanh(a[2 * H + j] + b[2 * H + j]), og = sigm(a[3 * H + j] + b[3 * H + j]);
              cr[j] = fg * cr[j] + ig * gg;
              hr[j] = og * std::tanh(cr[j]);
              o[j] = hr[j];
            }
          } else {
            const float* bh = L.b_hh;
            for (int64_t j = 0; j < H; ++j) {
              const float rg = sigm(a[j] + b[j] + (bh ? bh[j] : 0.f));
              const float zg = sigm(a[H + j] + b[H + j] + (bh ? bh[H + j] : 0.f));
              const float ng = std::tanh(a[2 * H + j] + rg * (b[2 * H + j] + (bh ? bh[2 * H + j] : 0.f)));
              hr[j] = (1.f - zg) * ng + zg * hr[j];
              o[j] = hr[j];
            }
          }
        }
      }
      x = dst;
    }
  }
};

std::unique_ptr<ExtKernel> build_rnn(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                     ExtValue& out) {
  AIMASS_CHECK(in.size() == 1 && in[0].dtype == ValueType::Float32, ValueError, where(n),
               " takes one float32 input [batch, seq, features]");
  AIMASS_CHECK(in[0].row.size() == 2, ValueError, where(n), ": input row must be [seq, features], got ",
               shape_str(in[0].row));
  auto k = std::make_unique<Rnn>();
  k->gru = n.op == "gru";
  k->G = k->gru ? 3 : 4;
  k->S = in[0].row[0];
  k->H = attr_int(n, "hidden_size", 0, true);
  const int64_t nl = attr_int(n, "num_layers", 1);
  AIMASS_CHECK(k->H >= 1 && nl >= 1 && nl <= 64, ValueError, where(n), ": hidden_size ", k->H, " / num_layers ", nl,
               " out of range");
  const int64_t GH = checked::mul<ValueError>(k->G, k->H, where(n));
  int64_t feat = in[0].row[1];
  for (int64_t l = 0; l < nl; ++l) {
    RnnLayer L;
    const std::string s = std::to_string(l);
    L.in = feat;
    L.w_ih = param_f32(m, n, ("w_ih_l" + s).c_str(), {GH, feat}, true);
    L.w_hh = param_f32(m, n, ("w_hh_l" + s).c_str(), {GH, k->H}, true);
    L.b_ih = param_f32(m, n, ("b_ih_l" + s).c_str(), {GH}, false);
    L.b_hh = param_f32(m, n, ("b_hh_l" + s).c_str(), {GH}, false);
    k->layers.push_back(L);
    feat = k->H;
  }
  checked::mul<ValueError>(k->S, GH, where(n));
  out.row = {k->S, k->H};
  return k;
}

}  // namespace

namespace ext {
std::unique_ptr<ExtKernel> build_rnn_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                        ExtValue& out, WeightCache&) {
  if (n.op == "lstm" || n.op == "gru") return build_rnn(m, n, in, out);
  return nullptr;
}
}  // namespace ext
}  // namespace aimass::runtime
