// The native floor server (aimass/serve.h) end to end on loopback, in C++ so that the sanitizer
// builds (AIMASS_SANITIZE) check its event loop, pipelining, the completion thread and teardown:
// right answers inline and queued, 32 connections at once, clients that vanish mid-request or
// before their answer, and mutated bytes.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "aimass/serve.h"
#include "loopback_client.h"
#include "tiny_linear_model.h"

using namespace aimass::serve;

namespace {

using aimass_test::kB;
using aimass_test::kW;

std::string write_model() { return aimass_test::write_linear_model("serve_floor.aimass"); }

std::vector<float> reference(const std::vector<float>& x) {
  std::vector<float> y;
  for (size_t r = 0; r < x.size() / 3; ++r)
    for (int j = 0; j < 2; ++j) {
      float acc = kB[j];
      for (int k = 0; k < 3; ++k) acc += x[r * 3 + k] * kW[j * 3 + k];
      y.push_back(acc > 0 ? acc : 0);
    }
  return y;
}

std::string v2bin(const std::vector<float>& x) {
  std::string head = R"({"inputs":[{"name":"x","datatype":"FP32","shape":[)" + std::to_string(x.size() / 3) +
                     R"(,3],"parameters":{"binary_data_size":)" + std::to_string(x.size() * 4) +
                     R"(}}],"parameters":{"binary_data_output":true}})";
  std::string body = head + std::string(reinterpret_cast<const char*>(x.data()), x.size() * 4);
  return "POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: " + std::to_string(body.size()) +
         "\r\nInference-Header-Content-Length: " + std::to_string(head.size()) + "\r\n\r\n" + body;
}

using aimass_test::connect_to;
using aimass_test::send_all;

// Reads one response: status and the binary output floats (empty for JSON bodies).
bool read_response(int s, std::string& buf, int& status, std::vector<float>& out) {
  char tmp[65536];
  size_t he;
  while ((he = buf.find("\r\n\r\n")) == std::string::npos) {
    ssize_t r = ::recv(s, tmp, sizeof tmp, 0);
    if (r <= 0) return false;
    buf.append(tmp, static_cast<size_t>(r));
  }
  status = std::atoi(buf.c_str() + 9);
  auto hv = [&](const char* name) -> long {
    size_t p = buf.find(name);
    return p == std::string::npos || p > he ? -1 : std::atol(buf.c_str() + p + std::strlen(name));
  };
  long cl = hv("content-length: "), ih = hv("inference-header-content-length: ");
  while (buf.size() < he + 4 + static_cast<size_t>(cl)) {
    ssize_t r = ::recv(s, tmp, sizeof tmp, 0);
    if (r <= 0) return false;
    buf.append(tmp, static_cast<size_t>(r));
  }
  out.clear();
  if (ih >= 0) {
    size_t n = (static_cast<size_t>(cl) - static_cast<size_t>(ih)) / 4;
    out.resize(n);
    std::memcpy(out.data(), buf.data() + he + 4 + ih, n * 4);
  }
  buf.erase(0, he + 4 + static_cast<size_t>(cl));
  return true;
}

void expect_near(const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size());
  for (size_t i = 0; i < got.size(); ++i) EXPECT_NEAR(got[i], want[i], 1e-5f) << i;
}

class ServeFloor : public ::testing::TestWithParam<bool> {};

}  // namespace

TEST_P(ServeFloor, AnswersPipelinedConcurrentAndHostileClients) {
  FloorOptions o;
  o.model_name = "m";
  o.run_inline = GetParam();
  o.limits.max_body_bytes = 4096;
  o.limits.max_header_bytes = 1024;
  FloorServer srv(write_model(), o);
  std::thread loop([&] { srv.serve(); });
  const int port = srv.port();

  // 32 connections at once, 3 pipelined requests each (2 rows per request); odd ones hang up unread
  std::vector<int> socks;
  std::vector<std::vector<float>> xs;
  for (int i = 0; i < 32; ++i) {
    xs.push_back({float(i), -1.f, 0.5f, 2.f, float(-i), 1.f});
    socks.push_back(connect_to(port));
    send_all(socks.back(), v2bin(xs.back()) + v2bin(xs.back()) + v2bin(xs.back()));
  }
  for (int i = 0; i < 32; ++i) {
    if (i % 2) {
      ::close(socks[i]);
      continue;
    }
    std::string buf;
    for (int k = 0; k < 3; ++k) {
      int status = 0;
      std::vector<float> y;
      ASSERT_TRUE(read_response(socks[i], buf, status, y)) << i;
      EXPECT_EQ(status, 200);
      expect_near(y, reference(xs[i]));
    }
    ::close(socks[i]);
  }
  if (!GetParam()) EXPECT_EQ(srv.inline_runs(), 0u);

  // mutated requests: each gets an answer or a close, and some clients vanish first
  std::mt19937 rng(3);
  const std::string seeds[] = {v2bin({1, 2, 3}), "POST /predict HTTP/1.1\r\nContent-Length: 16\r\n\r\n{\"input\":[1,2,3]}",
                               "GET /v2/health/live HTTP/1.1\r\n\r\n"};
  for (int t = 0; t < 300; ++t) {
    std::string r = seeds[rng() % 3];
    for (int e = 0, n = static_cast<int>(rng() % 5); e < n; ++e) {
      size_t at = rng() % r.size();
      if (rng() % 2) r[at] = static_cast<char>(rng());
      else r.erase(at, 1 + rng() % 5);
    }
    int s = connect_to(port);
    send_all(s, r);
    if (rng() % 3) {
      ::shutdown(s, SHUT_WR);
      char tmp[4096];
      while (::recv(s, tmp, sizeof tmp, 0) > 0) {
      }
    }
    ::close(s);
  }
  // still serving
  int s = connect_to(port);
  send_all(s, v2bin({0.5f, 0.25f, 1}));
  std::string buf;
  int status = 0;
  std::vector<float> y;
  ASSERT_TRUE(read_response(s, buf, status, y));
  EXPECT_EQ(status, 200);
  expect_near(y, reference({0.5f, 0.25f, 1}));
  ::close(s);
  srv.stop();
  loop.join();
}

INSTANTIATE_TEST_SUITE_P(InlineAndQueued, ServeFloor, ::testing::Values(true, false));
