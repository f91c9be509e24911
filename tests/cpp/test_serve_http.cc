// HTTP/1.1 request parser of the native serve path (aimass/serve.h).
#include <gtest/gtest.h>

#include <cstring>
#include <random>
#include <string>

#include "aimass/serve.h"

using namespace aimass::serve;

namespace {
ParseResult parse(const std::string& s, HttpRequest& r, HttpLimits lim = {}) {
  return parse_request(s.data(), s.size(), lim, r);
}
}  // namespace

TEST(ServeHttp, ParsesRequestWithBody) {
  std::string s = "POST /v2/models/m/infer?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
                  "Inference-Header-Content-Length:  3 \r\n\r\nhelloGET";
  HttpRequest r;
  ParseResult p = parse(s, r);
  ASSERT_EQ(p.status, ParseStatus::Ok) << p.error;
  EXPECT_EQ(r.method, "POST");
  EXPECT_EQ(r.target, "/v2/models/m/infer?x=1");
  EXPECT_EQ(r.body, "hello");
  EXPECT_EQ(r.header("inference-header-content-length"), "3");
  EXPECT_EQ(r.header("HOST"), "a");
  EXPECT_FALSE(r.has_header("x-missing"));
  EXPECT_TRUE(r.keep_alive);
  EXPECT_EQ(r.consumed, s.size() - 3);  // the next pipelined request starts at "GET"
}

TEST(ServeHttp, IncompleteUntilHeadAndBodyArrive) {
  std::string s = "POST /p HTTP/1.1\r\nContent-Length: 4\r\n\r\nabcd";
  for (size_t n = 0; n < s.size(); ++n) {
    HttpRequest r;
    EXPECT_EQ(parse_request(s.data(), n, {}, r).status, ParseStatus::Incomplete) << n;
  }
  HttpRequest r;
  EXPECT_EQ(parse(s, r).status, ParseStatus::Ok);
}

TEST(ServeHttp, ConnectionAndVersion) {
  HttpRequest r;
  ASSERT_EQ(parse("GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n", r).status, ParseStatus::Ok);
  EXPECT_FALSE(r.keep_alive);
  ASSERT_EQ(parse("GET / HTTP/1.0\r\n\r\n", r).status, ParseStatus::Ok);
  EXPECT_FALSE(r.keep_alive);
  ASSERT_EQ(parse("GET / HTTP/1.0\r\nconnection: Keep-Alive\r\n\r\n", r).status, ParseStatus::Ok);
  EXPECT_TRUE(r.keep_alive);
  ASSERT_EQ(parse("GET / HTTP/1.1\n\n", r).status, ParseStatus::Ok);  // bare LF line ends
  EXPECT_EQ(parse("GET / HTTP/2.0\r\n\r\n", r).http_status, 505);
}

TEST(ServeHttp, MalformedIs400) {
  for (const char* bad : {"GET\r\n\r\n", "GET /\r\n\r\n", "GET / HTTP/1.1 x\r\n\r\n", "GET  / HTTP/1.1\r\n\r\n",
                          "G(T / HTTP/1.1\r\n\r\n", "GET x HTTP/1.1\r\n\r\n", "GET / HTTQ/1.1\r\n\r\n",
                          "GET / HTTP/1.1\r\nNoColon\r\n\r\n", "GET / HTTP/1.1\r\n: v\r\n\r\n",
                          "GET / HTTP/1.1\r\nBad Name: v\r\n\r\n", "GET / HTTP/1.1\r\nA: b\r\n folded\r\n\r\n",
                          "POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                          "POST / HTTP/1.1\r\nContent-Length: 1x\r\n\r\n",
                          "POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n",
                          "POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                          "GET / HTTP/1.1\r\nA: b\x01\r\n\r\n"}) {
    HttpRequest r;
    ParseResult p = parse(bad, r);
    EXPECT_EQ(p.status, ParseStatus::Error) << bad;
    EXPECT_EQ(p.http_status, 400) << bad;
    EXPECT_FALSE(p.error.empty());
  }
  HttpRequest r;  // garbage is refused before a whole head has arrived
  EXPECT_EQ(parse(std::string("\x16\x03\x01\x02\x00", 5), r).http_status, 400);
}

TEST(ServeHttp, Limits) {
  HttpLimits lim;
  lim.max_header_bytes = 100;
  lim.max_headers = 3;
  lim.max_body_bytes = 10;
  HttpRequest r;
  EXPECT_EQ(parse("POST / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", r, lim).http_status, 413);
  EXPECT_EQ(parse("POST / HTTP/1.1\r\nContent-Length: 10\r\n\r\n0123456789", r, lim).status, ParseStatus::Ok);
  EXPECT_EQ(parse("GET / HTTP/1.1\r\nA: " + std::string(200, 'a'), r, lim).http_status, 431);
  EXPECT_EQ(parse("GET / HTTP/1.1\r\nA: 1\r\nB: 2\r\nC: 3\r\nD: 4\r\n\r\n", r, lim).http_status, 431);
  EXPECT_EQ(parse("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", r, lim).http_status, 501);
}

TEST(ServeHttp, RandomBytesNeverCrash) {
  std::mt19937 rng(7);
  const std::string seed = "POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 3\r\nConnection: close\r\n\r\nabc";
  for (int t = 0; t < 20000; ++t) {
    std::string s = seed;
    int edits = 1 + static_cast<int>(rng() % 8);
    for (int e = 0; e < edits; ++e) {
      size_t at = rng() % (s.size() + 1);
      switch (rng() % 3) {
        case 0: if (at < s.size()) s[at] = static_cast<char>(rng()); break;
        case 1: s.insert(at, 1, static_cast<char>(rng())); break;
        default: if (at < s.size()) s.erase(at, 1 + rng() % 4); break;
      }
    }
    HttpRequest r;
    ParseResult p = parse(s, r);
    if (p.status == ParseStatus::Ok) {
      EXPECT_LE(r.consumed, s.size());
      EXPECT_LE(r.body.data() + r.body.size(), s.data() + s.size());
    } else if (p.status == ParseStatus::Error) {
      EXPECT_TRUE(p.http_status == 400 || p.http_status == 413 || p.http_status == 431 || p.http_status == 501 ||
                  p.http_status == 505);
    }
  }
}

TEST(ServeJsonNumbers, ReadsRectangularNumberBodies) {
  std::vector<double> v;
  std::vector<int64_t> shape;
  std::string b = "{ \"input\" : [[1, -2.5e1], [0.125, 3]] }";
  ASSERT_TRUE(read_number_body(b.data(), b.size(), "input", v, shape));
  EXPECT_EQ(shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(v, (std::vector<double>{1, -25, 0.125, 3}));
  for (const char* bad : {"{\"input\": []}", "{\"input\": [[1], [2, 3]]}", "{\"input\": [1, [2]]}",
                          "{\"input\": [01]}", "{\"input\": [1.]}", "{\"input\": [nan]}", "{\"input\": [1e999]}",
                          "{\"input\": [1]} x", "{\"inputs\": [1]}", "{\"input\": [1], \"b\": 1}", "{\"input\": 1}"}) {
    EXPECT_FALSE(read_number_body(bad, std::strlen(bad), "input", v, shape)) << bad;
    EXPECT_TRUE(v.empty() && shape.empty()) << bad;
  }
}

TEST(ServeJsonNumbers, RandomBytesNeverCrash) {
  std::mt19937 rng(11);
  const std::string seed = "{\"input\": [[0.5, -1e-3, 2], [3, 4.25, 5E+2]]}";
  std::vector<double> v;
  std::vector<int64_t> shape;
  for (int t = 0; t < 20000; ++t) {
    std::string s = seed;
    for (int e = 0, n = 1 + static_cast<int>(rng() % 6); e < n; ++e) {
      size_t at = rng() % (s.size() + 1);
      if (rng() % 2 && at < s.size()) s[at] = "[],0123456789.eE+- x\"{}"[rng() % 23];
      else s.insert(at, 1, static_cast<char>(rng()));
    }
    if (read_number_body(s.data(), s.size(), "input", v, shape)) {
      int64_t n = 1;
      for (int64_t d : shape) n *= d;
      EXPECT_EQ(n, static_cast<int64_t>(v.size())) << s;
    }
  }
}

TEST(ServeJsonNumbers, V2InputsAndMutations) {
  std::vector<V2JsonInput> in;
  const std::string seed =
      "{\"inputs\": [{\"name\": \"x\", \"datatype\": \"FP32\", \"shape\": [2, 2], \"data\": [[1, 2], [3, 4.5]]},"
      " {\"data\": [7], \"shape\": [1], \"datatype\": \"FP32\", \"name\": \"y\"}]}";
  ASSERT_TRUE(read_v2_json_inputs(seed.data(), seed.size(), in));
  ASSERT_EQ(in.size(), 2u);
  EXPECT_EQ(in[0].name, "x");
  EXPECT_EQ(in[0].shape, (std::vector<int64_t>{2, 2}));
  EXPECT_EQ(in[0].values, (std::vector<double>{1, 2, 3, 4.5}));
  EXPECT_EQ(in[1].name, "y");
  EXPECT_EQ(in[1].data_shape, (std::vector<int64_t>{1}));
  std::mt19937 rng(13);
  for (int t = 0; t < 20000; ++t) {
    std::string s = seed;
    for (int e = 0, n = 1 + static_cast<int>(rng() % 6); e < n; ++e) {
      size_t at = rng() % (s.size() + 1);
      if (rng() % 2 && at < s.size()) s[at] = "[]{},:0123456789.eE+- x\"\\"[rng() % 25];
      else s.insert(at, 1, static_cast<char>(rng()));
    }
    if (read_v2_json_inputs(s.data(), s.size(), in)) {
      for (const auto& i : in) {
        int64_t n = 1;
        for (int64_t d : i.data_shape) n *= d;
        EXPECT_EQ(n, static_cast<int64_t>(i.values.size())) << s;
        EXPECT_EQ(i.datatype, "FP32");
      }
    } else {
      EXPECT_TRUE(in.empty());
    }
  }
}
