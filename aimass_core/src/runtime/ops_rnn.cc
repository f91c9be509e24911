// Recurrent layers (nn.LSTM / nn.GRU semantics, batch_first, uni- or bidirectional,
// zero initial state): per layer and direction, the input projection of every timestep
// is one packed GEMM (rows*S x gates*H, the biases in its epilogue; OpenBLAS's sgemm spent as
// long re-packing x as multiplying at seq 64; at batch 1 most of it rides along the steps, see
// run()), then each step adds h @ W_hh^T (the packed small-M kernel) and applies the gates
// (torch order: LSTM i, f, g, o; GRU r, z, n). The op's output is the last layer's hidden state at every step, [S, D*H] per row (what nn.LSTM
// returns first; D = 2 when bidirectional: the forward state in [0, H), the reverse
// one, which runs from the last step to the first, in [H, 2H)).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <sched.h>
#include <vector>

#include "aimass/checked.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "runtime/ext_ops.h"
#include "runtime/ops.h"
#include "runtime/packed_gemm.h"
#include "runtime/vec_kernels.h"

namespace aimass::runtime {
namespace {
using namespace ext;

// Gate-interleaved, packed recurrent weights (built once per plan): row n of W_hh /
// W_ih (gate k, unit j) moves to column (j / kUnits) * G kUnits + k * kUnits + j % kUnits
// (vec_kernels.h): LSTM's packed panel g holds every gate of hidden units [8g, 8g + 8); GRU's 3
// panels 3b..3b+2 hold every gate of units [32b, 32b + 32) (4 groups of 24 columns: GRU in
// LSTM's 4-gate panels read a quarter of zero padding in W_hh every step; 1 thread at GRU 512
// was 0.93x onnxruntime). A step is then, per chunk of such blocks, one packed small-M GEMM
// over their panels and the fused gate/cell update of the same units: no full-width gate
// buffer pass, and the chunks are independent within a step (threads split the hidden dim).
struct RnnLayer {
  int64_t in = 0;
  // packed permuted W_ih (zero rows as padding) with b_ih (+ b_hh for LSTM) as its bias: the input
  // projection of every timestep is one packed GEMM with the bias in its epilogue
  std::shared_ptr<ops::PackedLinear> wih;
  std::shared_ptr<ops::PackedLinear> whh;  // packed permuted W_hh (+ b_hh for GRU)
  bool whh_finite = false;  // no inf/NaN in W_hh: the first step's h @ W_hh^T (h = 0) is exactly 0
};

class Rnn : public ExtKernel {
 public:
  bool gru = false;
  int64_t S = 0, H = 0, G = 4;  // gates
  int64_t D = 1;                // directions
  int64_t groups = 0, NP = 0;   // unit groups, padded gate width (npanels * kPanel)
  int64_t npanels = 0;          // packed panels: ceil(groups * G kUnits / kPanel)
  int64_t block = 1;            // unit groups per whole panels (LSTM 1 group = 1 panel, GRU 4 = 3)
  int64_t blocks() const { return (groups + block - 1) / block; }
  // unit groups and panels of blocks [b0, b1)
  int64_t group_of(int64_t b) const { return std::min(b * block, groups); }
  int64_t panel_of(int64_t b) const { return std::min(b * block * G * vec::kUnits / packed::kPanel, npanels); }
  std::vector<std::shared_ptr<const RnnLayer>> layers;  // [layer * D + direction], shared by the plans
  std::vector<float> gi, gh, c, mid;  // grown on first use, reused
  std::vector<float> hs, cs;           // h (and, threaded, c) after each step: (S + 1) x rows x H
  struct Scratch {                     // a thread's own outputs of a chunk in the threaded loop
    std::vector<float> gh, c, h, o, v;
  };
  std::vector<Scratch> priv;

  // The time loop of one layer and direction on the pool: nc chunks a step (each its units of
  // every step, so that a thread keeps the same slice of W_hh in its cache), one participant per
  // thread, own chunk first. A chunk computes into its thread's scratch and is committed (copied
  // to hs / cs / the output / gi) by the first run of it that finishes: its inputs (hs[step],
  // cs[step], gi's rows) are written once and never again, so a chunk can run twice. That lets a
  // thread that waits on a chunk whose runner is late (descheduled: milliseconds on a loaded
  // machine, where a barrier per step then stalled both) run it itself, and go on alone until the
  // other thread is back. A chunk nobody has claimed is simply taken, as before.
  template <class OutOf, class VShare, class Chunk>
  void run_threaded(int64_t rows, int nc, int64_t ostr, const OutOf& out_of, const VShare& v_share,
                    const Chunk& chunk) {
    using clk = std::chrono::steady_clock;
    constexpr int64_t kR = packed::kWalkRows;
    const int np = std::min(nc, num_threads());
    if (static_cast<int>(priv.size()) < np) priv.resize(static_cast<size_t>(np));
    for (Scratch& sc : priv) {
      sc.gh.resize(static_cast<size_t>(rows * NP));
      sc.c.resize(static_cast<size_t>(rows * H));
      sc.h.resize(static_cast<size_t>(rows * H));
      sc.o.resize(static_cast<size_t>(rows * H));
      sc.v.resize(static_cast<size_t>(kR * NP));
    }
    std::fill(cs.begin(), cs.begin() + rows * H, 0.f);
    const size_t n = static_cast<size_t>(S) * static_cast<size_t>(nc);
    std::unique_ptr<std::atomic<int>[]> claimed(new std::atomic<int>[n]()), owner(new std::atomic<int>[n]()),
        done(new std::atomic<int>[n]());
    std::atomic<bool> failed{false};
    // AIMASS_RNN_TAKEOVER_US (read per run): a fixed wait before a late chunk runs here too, 0 as
    // soon as one is seen running elsewhere (every chunk then often runs twice: tests), negative
    // never (the old barrier's behaviour, for A/B runs); unset: 3x the thread's own chunk time + 30 us
    int64_t fixed_us = -2;
    if (const char* e = std::getenv("AIMASS_RNN_TAKEOVER_US")) fixed_us = std::max<int64_t>(std::atoll(e), -1);
    // runs chunk ci of `step` into `me`; commits it unless another run of it did first
    auto run_chunk = [&](int64_t step, int ci, Scratch& me) {
      const int64_t b0 = blocks() * ci / nc, b1 = blocks() * (ci + 1) / nc;
      const int64_t j0 = std::min(group_of(b0) * vec::kUnits, H), j1 = std::min(group_of(b1) * vec::kUnits, H);
      const size_t i = static_cast<size_t>(step * nc + ci);
      if (b1 > b0) {
        if (!gru)
          for (int64_t r = 0; r < rows; ++r)
            std::copy(cs.data() + (step * rows + r) * H + j0, cs.data() + (step * rows + r) * H + j1,
                      me.c.data() + r * H + j0);
        chunk(step, b0, b1, ci, nc, me.gh.data(), me.c.data(), me.h.data(), me.o.data(), H, me.v.data());
      }
      int e = 0;
      if (!owner[i].compare_exchange_strong(e, 1)) return;
      float* ob = out_of(step);
      for (int64_t r = 0; r < rows; ++r) {
        const float* hr = me.h.data() + r * H;
        std::copy(hr + j0, hr + j1, hs.data() + ((step + 1) * rows + r) * H + j0);
        std::copy(me.o.data() + r * H + j0, me.o.data() + r * H + j1, ob + r * ostr + j0);
        if (!gru)
          std::copy(me.c.data() + r * H + j0, me.c.data() + r * H + j1, cs.data() + ((step + 1) * rows + r) * H + j0);
      }
      int64_t q0, q1, vr;
      v_share(step, ci, nc, q0, q1, vr);
      for (int64_t r = 0; q1 > q0 && r < kR; ++r)
        std::copy(me.v.data() + r * NP + q0 * packed::kPanel, me.v.data() + r * NP + q1 * packed::kPanel,
                  gi.data() + (vr + r) * NP + q0 * packed::kPanel);
      done[i].store(1, std::memory_order_release);
    };
    auto guarded = [&](int64_t step, int ci, Scratch& me) {
      try {
        run_chunk(step, ci, me);
      } catch (...) {
        failed.store(true);  // the others stop at their next look; the pool rethrows on the caller
        throw;
      }
    };
    parallel_chunks(np, [&](int p, int) {
      Scratch& me = priv[static_cast<size_t>(p)];
      clk::duration own = std::chrono::microseconds(20);  // this thread's last chunk time
      for (int64_t step = 0; step < S; ++step) {
        bool waiting = false;
        clk::time_point since{};
        for (int64_t spins = 0;; ++spins) {
          if (failed.load(std::memory_order_relaxed)) return;
          bool all = true, ran = false;
          for (int k = 0; k < nc; ++k) {
            const int ci = (p + k) % nc;  // its own chunk first, then any not yet claimed
            const size_t i = static_cast<size_t>(step * nc + ci);
            if (done[i].load(std::memory_order_acquire)) continue;
            all = false;
            int e = 0;
            if (claimed[i].load(std::memory_order_relaxed) == 0 && claimed[i].compare_exchange_strong(e, 1)) {
              const auto t0 = clk::now();
              guarded(step, ci, me);
              own = clk::now() - t0;
              ran = true;
            }
          }
          if (all) break;
          if (ran) {
            waiting = false;
            continue;
          }
          // the rest of the step runs on other threads: poll; past a few of its own chunk
          // times, the runner is taken to be descheduled and its chunks run here too
          cpu_relax();
          if ((spins & 15) != 15) continue;
          const auto now = clk::now();
          if (waiting && (spins & 1023) == 1023 && now - since > std::chrono::microseconds(200)) sched_yield();
          if (!waiting) {
            waiting = true;
            since = now;
          } else if (fixed_us != -1 && now - since > (fixed_us >= 0 ? std::chrono::microseconds(fixed_us)
                                                                    : 3 * own + std::chrono::microseconds(30))) {
            for (int ci = 0; ci < nc; ++ci)
              if (!done[static_cast<size_t>(step * nc + ci)].load(std::memory_order_acquire)) guarded(step, ci, me);
            waiting = false;
          }
        }
      }
    });
  }

  void run(int64_t rows, const std::vector<const void*>& in, void* out) override {
    const vec::Kernels& vk = vec::kernels();
    gi.resize(static_cast<size_t>(rows * S * NP));
    gh.resize(static_cast<size_t>(rows * NP));
    c.resize(static_cast<size_t>(rows * H));
    hs.resize(static_cast<size_t>((S + 1) * rows * H));
    const int64_t nl = static_cast<int64_t>(layers.size()) / D, DH = D * H;
    if (nl > 1) mid.resize(static_cast<size_t>(rows * S * DH));
    const float* x = static_cast<const float*>(in[0]);
    float* y = static_cast<float*>(out);
    // Threads over unit groups where a step has enough work to pay a pool wake-up; one
    // chunk per thread, so each keeps (mostly) the same slice of W_hh in its cache.
    const int64_t step_macs = rows * NP * H;
    const int nchunks = step_macs < (int64_t{1} << 17)
                            ? 1
                            : static_cast<int>(std::min<int64_t>(blocks(), static_cast<int64_t>(num_threads())));
    // Batch 1 runs the single-row kernel (packed_gemm.h): 5-7% less CPU time a run than the
    // blocked panels kernel at LSTM 2x512 (1 thread, AMD EPYC), which splits K in blocks (partial
    // sums through y), streams one panel at a time and took one call per panel on reversed steps.
    // AIMASS_RNN_GEMV=0 restores that kernel (an A/B switch, read per run so a bench can compare
    // both in one process).
    int mode = 1;
    if (const char* e = std::getenv("AIMASS_RNN_GEMV")) mode = std::atoi(e);
    bool skip0 = true;  // AIMASS_RNN_SKIP0=0: multiply the first step's zero state too (A/B)
    if (const char* e = std::getenv("AIMASS_RNN_SKIP0")) skip0 = std::atoi(e) != 0;
    const packed::GemvWalkFn walk = rows == 1 && mode > 0 ? packed::gemv_walk_kernel() : nullptr;
    // Batch 1: a layer's input projection of the rows still ahead rides along its steps
    // (packed_gemm.h gemv_walk_gemm: the FMA-bound GEMM fills the L3-bound walk's idle FMA units).
    // In step order (the reverse direction runs from the last row), rows come in blocks of kR: block
    // 0 and the rows past the last full block are one GEMM up front; the V panels of block b >= 1
    // are spread over the kR steps before it, [(b - 1) kR, b kR), each thread taking its share of a
    // step's panels. LSTM 2x512 seq 64 (AMD EPYC, whole op): 8.6 -> 7.5 ms at 1 thread, 4.2 -> 3.7 ms
    // at 2. AIMASS_RNN_FUSE=0: the whole projection up front (A/B).
    constexpr int64_t kR = packed::kWalkRows;
    bool fuse = true;
    if (const char* e = std::getenv("AIMASS_RNN_FUSE")) fuse = std::atoi(e) != 0;
    const packed::GemvWalkGemmFn walk_gemm = walk && fuse ? packed::gemv_walk_gemm_kernel() : nullptr;
    const int64_t nblk = walk_gemm && S >= 2 * kR ? S / kR : 0;  // full blocks, when two or more
    for (int64_t l = 0; l < nl; ++l) {
      // layers alternate between mid and y so the last one lands in y
      float* dst = ((nl - 1 - l) % 2 == 0) ? y : mid.data();
      for (int64_t dir = 0; dir < D; ++dir) {
        const RnnLayer& L = *layers[l * D + dir];
        // input projection for all timesteps at once (or the rows that do not ride along), in the
        // permuted gate layout
        auto project = [&](int64_t r0, int64_t r1) {
          if (r1 > r0)
            packed::linear(x + r0 * L.in, r1 - r0, L.in, L.wih->w, L.wih->b, NP, packed::Epilogue{},
                           gi.data() + r0 * NP);
        };
        // first row of block b in step order (rows == 1 when nblk > 0)
        auto block_row = [&](int64_t b) { return dir == 0 ? b * kR : S - (b + 1) * kR; };
        if (nblk == 0) {
          project(0, rows * S);
        } else if (dir == 0) {
          project(0, kR);
          project(nblk * kR, S);
        } else {
          project(0, S - nblk * kR);
          project(S - kR, S);
        }
        std::fill(c.begin(), c.end(), 0.f);
        std::fill(hs.begin(), hs.begin() + rows * H, 0.f);  // h before step 0
        const ops::PackedLinear& P = *L.whh;
        // Step `step` reads h from hs[step] and writes hs[step + 1] (one slot per step: a step's
        // inputs are never overwritten, see the threaded loop below).
        // ci of nc: this chunk's share of the step's V panels [q0, q1), for the rows from vr
        auto v_share = [&](int64_t step, int ci, int nc, int64_t& q0, int64_t& q1, int64_t& vr) {
          q0 = q1 = vr = 0;
          if (step < (nblk - 1) * kR) {
            const int64_t j = step % kR, qa = npanels * j / kR, qb = npanels * (j + 1) / kR;
            q0 = qa + (qb - qa) * ci / nc;
            q1 = qa + (qb - qa) * (ci + 1) / nc;
            vr = block_row(step / kR + 1);
          }
        };
        // One chunk of a step: units of blocks [b0, b1). Outputs: the gate sums ghb (rows x NP),
        // the cell state cb (rows x H, updated in place), h into hn (rows x H), the layer output
        // into ob (row stride ostr) and the V rows into vb (kR x NP, row vr first).
        auto chunk = [&](int64_t step, int64_t b0, int64_t b1, int ci, int nc, float* ghb, float* cb, float* hn,
                         float* ob, int64_t ostr, float* vb) {
          const int64_t g0 = group_of(b0), g1 = group_of(b1), p0 = panel_of(b0), p1 = panel_of(b1);
          const int64_t t = dir == 0 ? step : S - 1 - step;
          const float* hp = hs.data() + step * rows * H;
          int64_t q0, q1, vr;
          v_share(step, ci, nc, q0, q1, vr);
          auto walk_with_v = [&](int64_t pe) {
            walk_gemm(hp, H, P.w, P.b, p0, pe, (step & 1) != 0, ghb, x + vr * L.in, L.in, L.wih->w, L.wih->b, q0, q1,
                      vb, NP);
          };
          // Odd steps walk the panels last to first. A thread's W_hh slice is at least as large
          // as its L2 at LSTM 2x512 (4 MiB a layer, 2 MiB a thread at 2 threads), and a sweep
          // in one direction evicts each panel just before the next step reads it again: in
          // alternate directions the next step starts on the panels the last one left in L2.
          if (step == 0 && L.whh_finite && skip0) {
            // h = 0: the product is 0 (+ GRU's b_hh), skip a full read of W_hh (1/S of the steps)
            for (int64_t r = 0; r < rows; ++r)
              for (int64_t g = p0; g < p1; ++g) {
                float* z = ghb + r * NP + g * packed::kPanel;
                if (P.b) std::copy(P.b + g * packed::kPanel, P.b + (g + 1) * packed::kPanel, z);
                else std::fill(z, z + packed::kPanel, 0.f);
              }
            if (q1 > q0) walk_with_v(p0);  // no W panels: the V share alone
          } else if (q1 > q0) {
            walk_with_v(p1);
          } else if (walk) {
            // one row: the single-row kernel (no K blocks, one call per step)
            walk(hp, H, P.w, P.b, p0, p1, (step & 1) != 0, ghb);
          } else if (step & 1) {
            for (int64_t g = p1; g-- > p0;) vk.panels(hp, rows, H, P.w, P.b, g, g + 1, NP, false, ghb);
          } else {
            vk.panels(hp, rows, H, P.w, P.b, p0, p1, NP, false, ghb);
          }
          for (int64_t r = 0; r < rows; ++r) {
            const float* a = gi.data() + (r * S + t) * NP;
            const float* b = ghb + r * NP;
            float* o = ob + r * ostr;
            if (gru) vk.gru_cells(a, b, g0, g1, H, hp + r * H, hn + r * H, o);
            else vk.lstm_cells(a, b, g0, g1, H, cb + r * H, hn + r * H, o);
          }
        };
        auto out_of = [&](int64_t step) { return dst + (dir == 0 ? step : S - 1 - step) * DH + dir * H; };
        if (nchunks > 1) cs.resize(static_cast<size_t>((S + 1) * rows * H));
        if (nchunks <= 1) {
          for (int64_t step = 0; step < S; ++step) {
            int64_t q0, q1, vr;
            v_share(step, 0, 1, q0, q1, vr);
            chunk(step, 0, blocks(), 0, 1, gh.data(), c.data(), hs.data() + (step + 1) * rows * H, out_of(step),
                  S * DH, gi.data() + vr * NP);
          }
        } else {
          run_threaded(rows, nchunks, S * DH, out_of, v_share, chunk);
        }
      }
      x = dst;
    }
  }
};

// Row (gate k of G, unit j) of a [G*H, cols] matrix to its permuted row.
inline int64_t perm_row(int64_t G, int64_t k, int64_t j) {
  return (j / vec::kUnits) * G * vec::kUnits + k * vec::kUnits + j % vec::kUnits;
}

std::unique_ptr<ExtKernel> build_rnn(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                     ExtValue& out, WeightCache& cache) {
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
  const int64_t bidir = attr_int(n, "bidirectional", 0);
  AIMASS_CHECK(k->H >= 1 && nl >= 1 && nl <= 64, ValueError, where(n), ": hidden_size ", k->H, " / num_layers ", nl,
               " out of range");
  AIMASS_CHECK(bidir == 0 || bidir == 1, ValueError, where(n), ": bidirectional must be 0 or 1, got ", bidir);
  k->D = bidir ? 2 : 1;
  const int64_t GH = checked::mul<ValueError>(k->G, k->H, where(n));
  k->groups = (k->H + vec::kUnits - 1) / vec::kUnits;
  // LSTM: 4 gates x 8 units fill a panel; GRU: 4 groups of 3 gates x 8 units fill 3 panels
  k->block = k->gru ? packed::kPanel / vec::kUnits : 1;
  k->npanels = (checked::mul<ValueError>(k->groups, k->G * vec::kUnits, where(n)) + packed::kPanel - 1) / packed::kPanel;
  k->NP = checked::mul<ValueError>(k->npanels, packed::kPanel, where(n));
  int64_t feat = in[0].row[1];
  for (int64_t l = 0; l < nl; ++l) {
    for (int64_t dir = 0; dir < k->D; ++dir) {
      const std::string s = std::to_string(l) + (dir ? "_reverse" : "");
      const float* w_ih = param_f32(m, n, ("w_ih_l" + s).c_str(), {GH, feat}, true);
      const float* w_hh = param_f32(m, n, ("w_hh_l" + s).c_str(), {GH, k->H}, true);
      const float* b_ih = param_f32(m, n, ("b_ih_l" + s).c_str(), {GH}, false);
      const float* b_hh = param_f32(m, n, ("b_hh_l" + s).c_str(), {GH}, false);
      std::shared_ptr<void>& slot = cache.items["rnn:" + n.name + "/l" + s];
      if (!slot) {
        auto L = std::make_shared<RnnLayer>();
        const int64_t H = k->H, NP = k->NP;
        L->in = feat;
        std::vector<float> wih(static_cast<size_t>(NP * feat), 0.f), bias_in(static_cast<size_t>(NP), 0.f);
        std::vector<float> whh(static_cast<size_t>(NP * H), 0.f), bhh(static_cast<size_t>(NP), 0.f);
        for (int64_t g = 0; g < k->G; ++g)
          for (int64_t j = 0; j < H; ++j) {
            const int64_t src = g * H + j, dstr = perm_row(k->G, g, j);
            std::copy(w_ih + src * feat, w_ih + (src + 1) * feat, wih.begin() + dstr * feat);
            std::copy(w_hh + src * H, w_hh + (src + 1) * H, whh.begin() + dstr * H);
            bias_in[dstr] = (b_ih ? b_ih[src] : 0.f) + (!k->gru && b_hh ? b_hh[src] : 0.f);
            bhh[dstr] = b_hh ? b_hh[src] : 0.f;
          }
        L->wih = std::make_shared<ops::PackedLinear>(wih.data(), bias_in.data(), NP, feat);
        L->whh_finite = std::all_of(w_hh, w_hh + GH * H, [](float v) { return std::isfinite(v); });
        L->whh = std::make_shared<ops::PackedLinear>(whh.data(), k->gru && b_hh ? bhh.data() : nullptr, NP, H);
        slot = L;
      }
      k->layers.push_back(std::static_pointer_cast<const RnnLayer>(slot));
    }
    feat = checked::mul<ValueError>(k->D, k->H, where(n));
  }
  checked::mul<ValueError>(k->S, k->NP, where(n));
  out.row = {k->S, k->D * k->H};
  return k;
}

}  // namespace

namespace ext {
std::unique_ptr<ExtKernel> build_rnn_op(const Model& m, const Node& n, const std::vector<ExtValue>& in,
                                        ExtValue& out, WeightCache& cache) {
  if (n.op == "lstm" || n.op == "gru") return build_rnn(m, n, in, out, cache);
  return nullptr;
}
}  // namespace ext
}  // namespace aimass::runtime
