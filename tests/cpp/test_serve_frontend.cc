// The native front end of `aimass serve --http native` (aimass/serve.h Frontend) in C++: hot requests
// answered through a version's Batcher, every other request forwarded byte for byte to an upstream
// (here a small fake of the uvicorn app) and its answer relayed in order, with pipelining, a chunked
// upstream answer, HEAD, an upstream that closes, an unreachable upstream (502), and retirement
// (version_busy) across a routing-table swap.
#include <gtest/gtest.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <cstring>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "aimass/batcher.h"
#include "aimass/error.h"
#include "aimass/runtime.h"
#include "aimass/serve.h"
#include "serve/wire.h"
#include "loopback_client.h"
#include "tiny_linear_model.h"

using namespace aimass::serve;
namespace rt = aimass::runtime;

namespace {

std::string write_model() { return aimass_test::write_linear_model("serve_frontend.aimass"); }

int listen_any(int& port) {
  int s = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in a{};
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  EXPECT_EQ(::bind(s, reinterpret_cast<sockaddr*>(&a), sizeof a), 0);
  EXPECT_EQ(::listen(s, 16), 0);
  socklen_t al = sizeof a;
  ::getsockname(s, reinterpret_cast<sockaddr*>(&a), &al);
  port = ntohs(a.sin_port);
  return s;
}

using aimass_test::connect_to;
using aimass_test::send_all;

// The fake app: answers each request on a connection in order. /chunked: a chunked body; /close: an
// answer with "connection: close", then closes; HEAD: a head that announces 5 bytes; else a JSON body
// naming the method, target and body length. It records every request head it saw.
struct FakeUpstream {
  int lfd = -1, port = 0;
  std::thread th;
  std::atomic<bool> stop{false};
  std::atomic<int> requests{0};
  FakeUpstream() {
    lfd = listen_any(port);
    th = std::thread([this] { run(); });
  }
  ~FakeUpstream() {
    stop = true;
    ::shutdown(lfd, SHUT_RDWR);
    ::close(lfd);
    th.join();
  }
  void run() {
    std::vector<std::thread> conns;
    while (!stop) {
      int c = ::accept(lfd, nullptr, nullptr);
      if (c < 0) break;
      conns.emplace_back([this, c] { serve_conn(c); });
    }
    for (auto& t : conns) t.join();
  }
  void serve_conn(int c) {
    timeval tv{1, 0};
    ::setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    std::string buf;
    char tmp[65536];
    HttpLimits lim;
    while (!stop) {
      HttpRequest req;
      ParseResult pr = parse_request(buf.data(), buf.size(), lim, req);
      if (pr.status == ParseStatus::Incomplete) {
        ssize_t r = ::recv(c, tmp, sizeof tmp, 0);
        if (r == 0) break;
        if (r < 0) continue;
        buf.append(tmp, static_cast<size_t>(r));
        continue;
      }
      if (pr.status == ParseStatus::Error) break;
      requests++;
      std::string target(req.target), method(req.method), out;
      bool close = false;
      if (target == "/chunked") {
        out = "HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n4\r\nabcd\r\n3;x=1\r\nefg\r\n0\r\n\r\n";
      } else if (target == "/close") {
        out = "HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok";
        close = true;
      } else if (method == "HEAD") {
        out = "HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n";
      } else {
        std::string body = "{\"method\":\"" + method + "\",\"target\":\"" + target + "\",\"len\":" +
                           std::to_string(req.body.size()) + "}";
        out = "HTTP/1.1 404 Not Found\r\ncontent-type: application/json\r\ncontent-length: " +
              std::to_string(body.size()) + "\r\n\r\n" + body;
      }
      buf.erase(0, req.consumed);
      send_all(c, out);
      if (close) break;
    }
    ::close(c);
  }
};

// Reads one response with a content-length or chunked body; returns it whole ("" when the
// connection ended first). head_only: a HEAD answer.
std::string read_response(int s, std::string& buf, bool head_only = false) {
  char tmp[65536];
  for (;;) {
    size_t he = buf.find("\r\n\r\n");
    if (he != std::string::npos) {
      size_t total = std::string::npos;
      std::string head = buf.substr(0, he + 4);
      size_t cl = head.find("content-length: ");
      if (head_only || head.compare(9, 1, "1") == 0) {
        total = he + 4;
      } else if (cl != std::string::npos) {
        total = he + 4 + std::stoul(head.substr(cl + 16));
      } else if (head.find("chunked") != std::string::npos) {
        size_t end = buf.find("\r\n0\r\n\r\n", he);
        if (end != std::string::npos) total = end + 7;
      }
      if (total != std::string::npos && buf.size() >= total) {
        std::string r = buf.substr(0, total);
        buf.erase(0, total);
        return r;
      }
    }
    ssize_t r = ::recv(s, tmp, sizeof tmp, 0);
    if (r <= 0) return "";
    buf.append(tmp, static_cast<size_t>(r));
  }
}

std::string post(const std::string& target, const std::string& body, const std::string& extra = "") {
  return "POST " + target + " HTTP/1.1\r\nHost: t\r\n" + extra + "Content-Length: " + std::to_string(body.size()) +
         "\r\n\r\n" + body;
}

struct Served {
  std::shared_ptr<rt::Model> model = rt::Model::load(write_model());
  std::shared_ptr<rt::Batcher> batcher =
      std::make_shared<rt::Batcher>(std::make_shared<rt::Executor>(model, rt::ExecutorOptions{}),
                                    rt::BatcherOptions{8, 200, 64});
  std::shared_ptr<Routes> routes(int64_t key) {
    auto r = std::make_shared<Routes>();
    RouteModel m;
    m.name = "m";
    m.default_version = 3;
    auto v = std::make_shared<RouteVersion>();
    v->key = key;
    v->version = 3;
    v->batcher = batcher;
    m.versions[3] = v;
    m.labels["stable"] = 3;
    r->models["m"] = m;
    r->predict_model = "m";
    return r;
  }
};

}  // namespace

TEST(ServeFrontend, AnswersHotRequestsAndRelaysTheRestInOrder) {
  FakeUpstream up;
  Served sv;
  FrontendOptions o;
  o.upstream_port = up.port;
  Frontend f(o, {0.001, 0.01, 0.1});
  f.set_routes(sv.routes(1));
  std::thread loop([&] { f.serve(); });
  int s = connect_to(f.port());
  std::string v2 = R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]})";
  send_all(s, post("/predict", R"({"input": [1, 2, 3]})") + "GET /a?q=1 HTTP/1.1\r\nHost: t\r\n\r\n" +
                  post("/predict", R"({"input": [1, 2]})") + "GET /chunked HTTP/1.1\r\nHost: t\r\n\r\n" +
                  "HEAD /h HTTP/1.1\r\nHost: t\r\n\r\n" + post("/v2/models/m/infer", v2) +
                  post("/v1/models/m/labels/stable:predict", R"({"instances": [[1, 2, 3], [0, 0, 0]]})") +
                  post("/v2/models/m/versions/4/infer", v2) + "GET /close HTTP/1.1\r\nHost: t\r\n\r\n");
  std::string buf;
  // y = relu([1*1 - 2*2 + 0.5*3 + 0.25, 0 + 2 - 3 - 0.5]) = [0, 0]; x = 0 -> [0.25, 0]
  std::string r = read_response(s, buf);
  EXPECT_NE(r.find("HTTP/1.1 200"), std::string::npos) << r;
  EXPECT_NE(r.find("{\"output\":[[0.0,0.0]]}"), std::string::npos) << r;
  r = read_response(s, buf);
  EXPECT_NE(r.find("\"target\":\"/a?q=1\""), std::string::npos) << r;  // forwarded as sent
  r = read_response(s, buf);
  EXPECT_NE(r.find("\"target\":\"/predict\",\"len\":17"), std::string::npos) << r;  // undecodable: forwarded
  r = read_response(s, buf);
  EXPECT_NE(r.find("4\r\nabcd\r\n3;x=1\r\nefg\r\n0\r\n\r\n"), std::string::npos) << r;  // chunked, relayed whole
  r = read_response(s, buf, true);
  EXPECT_NE(r.find("content-length: 5"), std::string::npos) << r;
  r = read_response(s, buf);
  EXPECT_NE(r.find("\"model_name\":\"m\",\"model_version\":\"3\""), std::string::npos) << r;
  EXPECT_NE(r.find("\"data\":[0.0,0.0]"), std::string::npos) << r;
  r = read_response(s, buf);
  EXPECT_NE(r.find("{\"predictions\":[[0.0,0.0],[0.25,0.0]]}"), std::string::npos) << r;
  r = read_response(s, buf);
  EXPECT_NE(r.find("\"target\":\"/v2/models/m/versions/4/infer\""), std::string::npos) << r;  // not loaded
  r = read_response(s, buf);
  EXPECT_NE(r.find("connection: close"), std::string::npos) << r;
  char c;
  EXPECT_EQ(::recv(s, &c, 1, 0), 0);  // the upstream closed: so does the client's connection
  ::close(s);
  EXPECT_EQ(f.native_answers(), 3u);
  EXPECT_EQ(f.forwarded(), 6u);
  auto counts = f.counts();
  uint64_t ok = 0;
  for (const auto& k : counts) ok += k.code == 200 && k.model == "m" && k.version == 3 ? k.n : 0;
  EXPECT_EQ(ok, 3u);
  f.stop();
  loop.join();
}

TEST(ServeFrontend, UnreachableUpstreamIs502AndRetirementWaitsForTheLoop) {
  int dead_port;
  int dead = listen_any(dead_port);
  ::close(dead);  // nothing listens there now
  Served sv;
  FrontendOptions o;
  o.upstream_port = dead_port;
  Frontend f(o, {});
  f.set_routes(sv.routes(7));
  EXPECT_TRUE(f.version_busy(7));  // routed
  std::thread loop([&] { f.serve(); });
  int s = connect_to(f.port());
  send_all(s, "GET /v2/health/ready HTTP/1.1\r\nHost: t\r\n\r\n");
  std::string buf, r = read_response(s, buf);
  EXPECT_NE(r.find("HTTP/1.1 502"), std::string::npos) << r;
  ::close(s);
  f.set_routes(std::make_shared<Routes>());
  // dropped from the table: busy until the loop has taken a turn with the new table, then idle
  for (int i = 0; i < 2000 && f.version_busy(7); ++i) std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_FALSE(f.version_busy(7));
  EXPECT_FALSE(f.version_busy(12345));  // never routed
  f.stop();
  loop.join();
}

TEST(ServeFrontend, FloatLayoutIsOrjsons) {
  std::string s;
  for (float v :
       {1.0f, 0.1f, 1e-7f, 1.5e-7f, 123456789.0f, 1e16f, -0.0f, 1e-5f, 0.00015f, 1e15f, 1e12f, 1e13f, 3.4e38f}) {
    append_f32_json(s, v);
    s += ',';
  }
  EXPECT_EQ(s, "1.0,0.1,1e-7,1.5e-7,123456790.0,1e16,-0.0,0.00001,0.00015,1e15,1000000000000.0,1e13,3.4e38,");
}

TEST(ServeFrontend, ConcurrentConnectionsBatchThroughTheQueue) {
  FakeUpstream up;
  Served sv;
  FrontendOptions o;
  o.upstream_port = up.port;
  Frontend f(o, {0.001});
  f.set_routes(sv.routes(1));
  std::thread loop([&] { f.serve(); });
  std::atomic<int> ok{0};
  std::vector<std::thread> clients;
  for (int t = 0; t < 12; ++t)
    clients.emplace_back([&, t] {
      int s = connect_to(f.port());
      std::string buf;
      for (int k = 0; k < 20; ++k) {
        // x = [t, 0, 0] -> y = relu([t + 0.25, -0.5]) = [t + 0.25, 0]
        send_all(s, post("/predict", "{\"input\": [" + std::to_string(t) + ", 0, 0]}"));
        std::string r = read_response(s, buf);
        std::string want = "{\"output\":[[" + std::to_string(t) + ".25,0.0]]}";
        ok += r.find("HTTP/1.1 200") == 0 && r.find(want) != std::string::npos;
      }
      ::close(s);
    });
  for (auto& c : clients) c.join();
  EXPECT_EQ(ok.load(), 12 * 20);
  EXPECT_EQ(f.inflight(), 0);
  f.stop();
  loop.join();
}

TEST(ServeFrontend, BatcherErrorsAreAnsweredNativelyWithPythonsWords) {
  FakeUpstream up;
  Served sv;
  FrontendOptions o;
  o.upstream_port = up.port;
  o.deadline_us = 0;  // --deadline-ms 0: every request's deadline has passed when it would run
  Frontend f(o, {0.001});
  f.set_routes(sv.routes(1));
  std::thread loop([&] { f.serve(); });
  int s = connect_to(f.port());
  std::string buf;
  send_all(s, post("/predict", R"({"input": [1, 2, 3]})"));
  std::string r = read_response(s, buf);
  EXPECT_EQ(r.find("HTTP/1.1 504"), 0u) << r;
  EXPECT_NE(r.find("{\"error\": \"deadline passed before model 'm' ran the request: "), std::string::npos) << r;
  sv.batcher->close();  // a closed Session still routed: 503 naming the version
  send_all(s,
           post("/v2/models/m/infer", R"({"inputs":[{"name":"x","datatype":"FP32","shape":[1,3],"data":[1,2,3]}]})"));
  r = read_response(s, buf);
  EXPECT_EQ(r.find("HTTP/1.1 503"), 0u) << r;
  EXPECT_NE(r.find("{\"error\": \"model 'm' version 3 was closed: "), std::string::npos) << r;
  ::close(s);
  auto errs = f.take_errors();
  ASSERT_EQ(errs.size(), 2u);
  EXPECT_EQ(errs[0].status, 504);
  EXPECT_EQ(errs[0].type, "TimeoutError");
  EXPECT_EQ(errs[1].type, "ClosedError");
  EXPECT_EQ(errs[1].path, "/v2/models/m/infer");
  EXPECT_EQ(up.requests.load(), 0);  // none reached the app: it must not run them again
  EXPECT_EQ(f.inflight(), 0);
  f.stop();
  loop.join();
}

// The one JSON string escaper (serve/wire.h): json.dumps's bytes (ensure_ascii) for the {"error": ...}
// bodies and orjson's for the hot answers, as Python 3.11 json.dumps(s)[1:-1] and orjson.dumps(s)[1:-1]
// write them; bytes that are not UTF-8 become U+FFFD and the body stays valid JSON.
TEST(ServeFrontend, JsonEscapeWritesPythonsBytes) {
  struct Case {
    std::string in, ascii, utf8;
  };
  const Case cases[] = {
      {"plain", "plain", "plain"},
      {"q\"b\\s", "q\\\"b\\\\s", "q\\\"b\\\\s"},
      {std::string("c\n\r\t\b\f\0\x1f\x7f", 9), "c\\n\\r\\t\\b\\f\\u0000\\u001f\\u007f",
       "c\\n\\r\\t\\b\\f\\u0000\\u001f\x7f"},
      {"caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80", "caf\\u00e9 \\u20ac \\ud83d\\ude00",
       "caf\xc3\xa9 \xe2\x82\xac \xf0\x9f\x98\x80"},
      // a stray continuation byte, a lead cut short by a quote, an overlong '/', a surrogate, past U+10FFFF
      {"a\x80" "b\xc3\"\xc0\xaf\xed\xa0\x80\xf4\x90\x80\x80",
       "a\\ufffdb\\ufffd\\\"\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd\\ufffd",
       "a\xef\xbf\xbd" "b\xef\xbf\xbd\\\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"
       "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},
      {"\xf0\x9f\x98", "\\ufffd\\ufffd\\ufffd", "\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd"},  // cut short at the end
  };
  for (const auto& c : cases) {
    std::string a, u;
    wire::json_escape(a, c.in, true);
    wire::json_escape(u, c.in, false);
    EXPECT_EQ(a, c.ascii) << c.in;
    EXPECT_EQ(u, c.utf8) << c.in;
  }
}

// A front end with no upstream needs both local hooks (else a typed error); run_inline false answers
// through the batcher's queue with the same bytes as inline.
TEST(ServeFrontend, NoUpstreamNeedsItsHooksAndQueuedRunsAnswerTheSame) {
  FrontendOptions bad;
  bad.upstream_port = 0;
  EXPECT_THROW(Frontend(bad, {}), aimass::ValueError);
  bad.local_other = [](const HttpRequest&, std::string_view, LocalAnswer& a) { a.status = 404; };
  EXPECT_THROW(Frontend(bad, {}), aimass::ValueError);  // local_decode missing too
  FakeUpstream up;
  Served sv;
  std::string answers[2];
  uint64_t inline_after_queued = 0;
  for (int inl = 0; inl < 2; ++inl) {
    FrontendOptions o;
    o.upstream_port = up.port;
    o.run_inline = inl == 1;
    Frontend f(o, {});
    f.set_routes(sv.routes(1));
    std::thread loop([&] { f.serve(); });
    int s = connect_to(f.port());
    send_all(s, post("/predict", R"({"input": [[0, 0, 0], [1, 0, 0]]})") +
                    post("/v1/models/m:predict", R"({"instances": [[0.5, 0.25, 1]]})"));
    std::string buf;
    answers[inl] = read_response(s, buf);
    answers[inl] += read_response(s, buf);
    ::close(s);
    f.stop();
    loop.join();
    if (inl == 0) inline_after_queued = sv.batcher->stats().inline_runs;
  }
  EXPECT_NE(answers[0].find("{\"output\":[[0.25,0.0],[1.25,0.0]]}"), std::string::npos) << answers[0];
  EXPECT_EQ(answers[0], answers[1]);
  EXPECT_EQ(inline_after_queued, 0u);  // the queued front end ran nothing on its loop's thread
}
