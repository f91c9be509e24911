// C++ tests of the runtime's extension ops on hand-written graphs: fused attention
// (causal) against a naive reference at two sequence lengths of one executor, the
// multi-head packed-qkv layout with an additive mask at every SIMD level and thread count,
// matmul + permute, and shape errors naming the node.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "aimass/cpu_features.h"
#include "aimass/error.h"
#include "aimass/parallel.h"
#include "aimass/runtime.h"
#include <unistd.h>

namespace rt = aimass::runtime;

namespace {

std::string esc(const std::string& s) {
  std::string o;
  for (char c : s) o += c == '"' ? std::string("\\\"") : std::string(1, c);
  return o;
}

// An .aimass file without tensors: graph and signature JSON as given.
std::string write_graph(const std::string& name, const std::string& graph, const std::string& sig) {
  std::string header = R"({"__metadata__":{"aimass.format_version":"1","aimass.producer":"test","aimass.graph":")" +
                       esc(graph) + R"(","aimass.signature":")" + esc(sig) + R"("}})";
  while (header.size() % 8) header += ' ';
  std::string bytes(8, '\0');
  uint64_t n = header.size();
  std::memcpy(&bytes[0], &n, 8);
  bytes += header;
  std::string path = ::testing::TempDir() + std::to_string(::getpid()) + "_" + name;
  std::ofstream(path, std::ios::binary).write(bytes.data(), bytes.size());
  return path;
}

// q, k, v [B, S, D] -> causal attention, naive
void ref_attention(const float* q, const float* k, const float* v, int B, int S, int D, float* o) {
  for (int b = 0; b < B; ++b)
    for (int i = 0; i < S; ++i) {
      std::vector<double> p(S, 0);
      double mx = -1e300, sum = 0;
      for (int j = 0; j <= i; ++j) {
        double s = 0;
        for (int d = 0; d < D; ++d) s += q[(b * S + i) * D + d] * k[(b * S + j) * D + d];
        p[j] = s / std::sqrt(double(D));
        mx = std::max(mx, p[j]);
      }
      for (int j = 0; j <= i; ++j) sum += (p[j] = std::exp(p[j] - mx));
      for (int d = 0; d < D; ++d) {
        double acc = 0;
        for (int j = 0; j <= i; ++j) acc += p[j] / sum * v[(b * S + j) * D + d];
        o[(b * S + i) * D + d] = static_cast<float>(acc);
      }
    }
}

const char* kSdpaGraph =
    R"({"nodes":[{"op":"sdpa","name":"att","inputs":["q","k","v"],"outputs":["o"],"attrs":{"causal":1}}]})";
const char* kSdpaSig =
    R"({"inputs":[{"name":"q","dtype":"float32","shape":[-1,-1,4]},{"name":"k","dtype":"float32","shape":[-1,-1,4]},)"
    R"({"name":"v","dtype":"float32","shape":[-1,-1,4]}],"outputs":[{"name":"o","dtype":"float32","shape":[-1,-1,4]}]})";

}  // namespace

TEST(RuntimeExt, CausalAttentionAtTwoLengths) {
  auto m = rt::Model::load(write_graph("sdpa.aimass", kSdpaGraph, kSdpaSig));
  EXPECT_TRUE(rt::has_dynamic_seq(*m));
  rt::Executor ex(m, {2, 5});
  for (int S : {5, 70, 3}) {  // 70: more than one 64-row query block
    const int B = 2, D = 4;
    std::vector<float> q(B * S * D), k(q.size()), v(q.size()), o(q.size()), r(q.size());
    for (size_t i = 0; i < q.size(); ++i) {
      q[i] = std::sin(0.37f * i);
      k[i] = std::cos(0.11f * i);
      v[i] = 0.01f * static_cast<float>(i % 17);
    }
    ex.set_seq_len(S);
    EXPECT_EQ(ex.input_row_bytes(0), S * D * 4);
    const void* in[] = {q.data(), k.data(), v.data()};
    void* out[] = {o.data()};
    ex.run(B, in, out);
    ref_attention(q.data(), k.data(), v.data(), B, S, D, r.data());
    for (size_t i = 0; i < o.size(); ++i) ASSERT_NEAR(o[i], r[i], 1e-5) << "S=" << S << " i=" << i;
  }
}

// BERT's layout: one [S, 3*H*D] input holding q | k | v, H heads, an additive [B, 1, 1, S]
// mask input (-inf masks a key). D = 40 and S = 150: partial key and value panels of the
// packed kernels, two query blocks; 1, 2 and 8 threads (8 > B * H items: the queries are
// split further), every SIMD level, against a double reference.
TEST(RuntimeExt, PackedMultiHeadAttentionWithAdditiveMask) {
  const int H = 3, D = 40, E = H * D;
  const char* g =
      R"({"nodes":[{"op":"sdpa","name":"att","inputs":["qkv","mask"],"outputs":["o"],)"
      R"("attrs":{"heads":3,"packed":1,"mask_kind":"add"}}]})";
  const char* sig = R"({"inputs":[{"name":"qkv","dtype":"float32","shape":[-1,-1,360]},)"
                    R"({"name":"mask","dtype":"float32","shape":[-1,1,1,-1]}],)"
                    R"("outputs":[{"name":"o","dtype":"float32","shape":[-1,-1,120]}]})";
  auto m = rt::Model::load(write_graph("sdpa_packed.aimass", g, sig));
  const aimass::SimdLevel best = aimass::simd_level();
  const int old_threads = aimass::num_threads();
  for (int S : {150, 7}) {
    for (int B : {1, 2}) {
      std::vector<float> qkv(static_cast<size_t>(B) * S * 3 * E), mask(static_cast<size_t>(B) * S), want(B * S * E);
      for (size_t i = 0; i < qkv.size(); ++i) qkv[i] = std::sin(0.37f * i) + 0.1f * std::cos(1.3f * i);
      for (int b = 0; b < B; ++b)
        for (int j = 0; j < S; ++j)
          mask[b * S + j] = j % 5 == 3 ? -std::numeric_limits<float>::infinity() : 0.05f * (j % 7);
      for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
          for (int i = 0; i < S; ++i) {
            const float* q = &qkv[(b * S + i) * 3 * E + h * D];
            std::vector<double> p(S);
            double mx = -1e300, sum = 0;
            for (int j = 0; j < S; ++j) {
              const float* k = &qkv[(b * S + j) * 3 * E + E + h * D];
              double s = 0;
              for (int d = 0; d < D; ++d) s += double(q[d]) * k[d];
              p[j] = s / std::sqrt(double(D)) + mask[b * S + j];
              mx = std::max(mx, p[j]);
            }
            for (int j = 0; j < S; ++j) sum += (p[j] = std::exp(p[j] - mx));
            for (int d = 0; d < D; ++d) {
              double acc = 0;
              for (int j = 0; j < S; ++j) acc += p[j] / sum * qkv[(b * S + j) * 3 * E + 2 * E + h * D + d];
              want[(b * S + i) * E + h * D + d] = static_cast<float>(acc);
            }
          }
      for (int threads : {1, 2, 8}) {
        aimass::set_num_threads(threads);
        for (int lvl = 0; lvl <= static_cast<int>(best); ++lvl) {
          aimass::set_simd_level(static_cast<aimass::SimdLevel>(lvl));
          rt::Executor ex(m, {B, S});
          std::vector<float> o(want.size(), -7.f);
          const void* in[] = {qkv.data(), mask.data()};
          void* out[] = {o.data()};
          ex.run(B, in, out);
          for (size_t i = 0; i < o.size(); ++i)
            ASSERT_NEAR(o[i], want[i], 2e-5 * (1 + std::fabs(want[i])))
                << "S=" << S << " B=" << B << " threads=" << threads << " level=" << lvl << " i=" << i;
        }
        aimass::set_simd_level(best);
      }
    }
  }
  aimass::set_num_threads(old_threads);
}

// AIMASS_PROFILE_STEPS=1: every plan times its steps and prints the table when it goes.
TEST(RuntimeExt, StepProfilePrintsEachStepWhenThePlanGoes) {
  auto m = rt::Model::load(write_graph("sdpa_prof.aimass", kSdpaGraph, kSdpaSig));
  std::vector<float> q(2 * 5 * 4, 0.5f), o(q.size());
  const void* in[] = {q.data(), q.data(), q.data()};
  void* out[] = {o.data()};
  ::setenv("AIMASS_PROFILE_STEPS", "1", 1);
  ::testing::internal::CaptureStderr();
  {
    rt::Executor ex(m, {2, 5});
    ex.run(2, in, out);
    ex.run(1, in, out);
  }
  const std::string err = ::testing::internal::GetCapturedStderr();
  ::unsetenv("AIMASS_PROFILE_STEPS");
  EXPECT_NE(err.find("aimass step profile (1 steps"), std::string::npos) << err;
  EXPECT_NE(err.find("node 'att' (sdpa)"), std::string::npos) << err;
  EXPECT_NE(err.find("calls      2"), std::string::npos) << err;
  ::testing::internal::CaptureStderr();
  {
    rt::Executor ex(m, {2, 5});  // off again: nothing printed
    ex.run(2, in, out);
  }
  EXPECT_EQ(::testing::internal::GetCapturedStderr(), "");
}

TEST(RuntimeExt, MatmulOfPermutedActivations) {
  // y[b] = x[b]^T @ x[b] through permute + matmul; x row [3, 2] -> y row [2, 2]
  const char* g =
      R"({"nodes":[{"op":"permute","name":"t","inputs":["x"],"outputs":["xt"],"attrs":{"perm":[0,2,1]}},)"
      R"({"op":"matmul","name":"mm","inputs":["xt","x"],"outputs":["y"],"attrs":{}}]})";
  const char* sig = R"({"inputs":[{"name":"x","dtype":"float32","shape":[-1,3,2]}],)"
                    R"("outputs":[{"name":"y","dtype":"float32","shape":[-1,2,2]}]})";
  auto m = rt::Model::load(write_graph("mm.aimass", g, sig));
  rt::Executor ex(m, {2});
  std::vector<float> x = {1, 2, 3, 4, 5, 6, -1, 0, 0, 1, 2, 2}, y(8);
  const void* in[] = {x.data()};
  void* out[] = {y.data()};
  ex.run(2, in, out);
  const float want[8] = {35, 44, 44, 56, 5, 4, 4, 5};
  for (int i = 0; i < 8; ++i) EXPECT_FLOAT_EQ(y[i], want[i]) << i;
}

TEST(RuntimeExt, BadShapesNameTheNode) {
  const char* g =
      R"({"nodes":[{"op":"slice","name":"cut","inputs":["x"],"outputs":["y"],"attrs":{"dim":1,"start":5}}]})";
  const char* sig = R"({"inputs":[{"name":"x","dtype":"float32","shape":[-1,3]}],)"
                    R"("outputs":[{"name":"y","dtype":"float32","shape":[-1,1]}]})";
  auto m = rt::Model::load(write_graph("cut.aimass", g, sig));
  try {
    rt::Executor ex(m, {1});
    FAIL() << "empty slice accepted";
  } catch (const aimass::ValueError& e) {
    EXPECT_NE(std::string(e.what()).find("'cut'"), std::string::npos) << e.what();
  }
  const char* g2 =
      R"({"nodes":[{"op":"sdpa","name":"att","inputs":["q","k","v"],"outputs":["o"],"attrs":{"heads":3}}]})";
  auto m2 = rt::Model::load(write_graph("heads.aimass", g2, kSdpaSig));
  EXPECT_THROW(rt::Executor(m2, {1}), aimass::ValueError);  // 4 features do not split into 3 heads
  rt::Executor ok(rt::Model::load(write_graph("sdpa2.aimass", kSdpaGraph, kSdpaSig)), {1});
  EXPECT_THROW(ok.set_seq_len(0), aimass::ValueError);
}
